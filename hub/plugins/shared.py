"""What both plugins share: the hub runtime they work for (the broker's own, or one built
from hub.toml) and the decision on a CONNECT, kept on the amqtt session.

Only a stock amqtt asks the plugins anything: ``fleet-hub``'s broker calls the gatekeeper
and the ACL itself (hub.broker) and keeps its decisions in a typed record, not here.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from hub.config import load_config
from hub.gatekeeper import Decision
from hub.runtime import HubRuntime

if TYPE_CHECKING:
    from hub.broker.surface import Session

# The one session attribute of ours: a stock amqtt's session has nowhere else to keep it.
DECISION = "fleet_hub.decision"

# Stock amqtt mode: both plugins of one broker share one runtime, keyed by broker identity.
_STANDALONE: dict[tuple[int, str], HubRuntime] = {}
_STARTING: dict[int, asyncio.Lock] = {}


def runtime_for(context: object, config_path: str) -> tuple[HubRuntime, bool]:
    """The runtime and whether this plugin owns it (True only under a stock amqtt)."""
    broker = getattr(context, "_broker_instance", None)
    provided = getattr(broker, "hub_runtime", None)
    if isinstance(provided, HubRuntime):
        return provided, False
    key = (id(broker), str(Path(config_path).resolve()))
    runtime = _STANDALONE.get(key)
    if runtime is None:
        runtime = HubRuntime(load_config(config_path))
        _STANDALONE[key] = runtime
    return runtime, True


async def ensure_started(runtime: HubRuntime) -> None:
    lock = _STARTING.setdefault(id(runtime), asyncio.Lock())
    async with lock:
        if not runtime.started:
            await runtime.start()


async def release(context: object, runtime: HubRuntime) -> None:
    broker = getattr(context, "_broker_instance", None)
    for key, value in list(_STANDALONE.items()):
        if value is runtime and key[0] == id(broker):
            del _STANDALONE[key]
            await runtime.stop()


async def admit(runtime: HubRuntime, session: Session) -> Decision:
    """Decide on a stock amqtt Session carrying *this* connection's TLS object; the decision
    is kept on the session for the topic plugin and the tracking of the connection."""
    ssl_object = getattr(session, "ssl_object", None)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    will_topic = session.will_topic if getattr(session, "will_flag", False) else None
    decision = await runtime.gatekeeper.admit(der, session.client_id or "",
                                              wire_password(session.password), peer_of(session),
                                              will_topic=will_topic, acl=runtime.acl)
    session.attributes[DECISION] = decision
    return decision


def decision_of(session: Session | None) -> Decision | None:
    """The decision :func:`admit` kept on *session*; None for one it never saw."""
    decision = session.attributes.get(DECISION) if session is not None else None
    return decision if isinstance(decision, Decision) else None


def peer_of(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


def wire_password(value: str | bytes | None) -> str | bytes | None:
    """The CONNECT password as the bytes the client sent, as far as amqtt lets us know them.

    Bytes pass as they are. amqtt's own CONNECT decoder (a stock amqtt running our plugins)
    decodes the password, binary data in MQTT 3.1.1 (§3.1.3.5), as UTF-8 and, when that fails,
    hands over ``str(raw)``, i.e. the text ``b'\\xff...'``: a device whose secret were that
    text would be admitted with bytes it never had. Such a string is turned back into
    the raw bytes, which the gatekeeper then refuses as not UTF-8. A client that really sends
    that text as its password is refused too: the two cannot be told apart here.
    """
    if not isinstance(value, str) or len(value) < 3 or value[:2] not in ("b'", 'b"'):
        return value
    with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
        raw = ast.literal_eval(value)
        if isinstance(raw, bytes):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw  # only amqtt's stand-in for bytes that are not UTF-8 looks like this
    return value
