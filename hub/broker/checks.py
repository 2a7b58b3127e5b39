"""The per-connection state and checks under the hub's handler: topic ACL cache, [limits].

:class:`CheckedHandler` is amqtt's broker handler with what every packet path of
:class:`hub.broker.handler.HubHandler` consults: the topic a PUBLISH may use (valid, allowed;
cached per connection until the registry or the ACL changes), the device's publish budget,
the per-connection audit of limit hits and violations, and the single future the broker's
message loop sleeps on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Protocol

from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from hub.broker import session as hub_session
from hub.broker.connect import audit_violation
from hub.limits import PublishBudget, PublishBudgets
from hub.wire import MAX_REMAINING, puback

if TYPE_CHECKING:
    from hub.broker.connection import Connection
    from hub.broker.router import Router
    from hub.broker.surface import Session
    from hub.runtime import HubRuntime

log = logging.getLogger("hub.handler")

ACL_CACHE_SIZE = 256  # distinct topics one connection publishes to, remembered
DENIED = ""  # cache value: the topic is valid but this device may not publish to it


class Hub(Protocol):
    """What a handler needs of its broker (:class:`hub.broker.core.HubBroker`)."""

    hub_runtime: HubRuntime
    router: Router
    publish_budgets: PublishBudgets

    def topic_allowed(self, session: Session | None, topic: str, action: str) -> bool: ...

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None: ...

def audit_session(runtime: HubRuntime, session: Session, event: str, reason: str) -> None:
    """One audit row about a connected device (the identity its CONNECT was admitted with)."""
    connection: Connection | None = getattr(session, "connection", None)
    if connection is None:
        runtime.audit.record(event, device_id=session.client_id,
                             peer=f"{session.remote_address}:{session.remote_port}",
                             reason=reason)
        return
    runtime.audit.record(event, device_id=connection.identity.device_id,
                         serial=connection.identity.serial_hex, peer=connection.peer,
                         reason=reason)




class CheckedHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker handler with the hub's per-connection state and checks.

    ``hub`` (set by the broker before ``start``) provides the runtime, the router and the
    budgets; without it (unit tests) nothing is audited and every PUBLISH takes amqtt's path.
    """

    # The hub's own per-connection state lives in slots, so the instance __dict__ holds only
    # amqtt's attributes: CPython shares one dict's keys between instances of a class only up
    # to 30 keys, and past that every connection's dict is a full table (296 -> 1,584 bytes).
    __slots__ = ("_budget", "_epoch_acl", "_epoch_snapshot", "_expired", "_keepalive_s",
                 "_last_read", "_limits_noted", "_max_packet", "_max_topic", "_tasks",
                 "_topics", "_wake", "end_packet", "ended", "finished", "hub")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # amqtt's, in __dict__
        self._pending_subscriptions: hub_session.SlimQueue[object] = hub_session.SlimQueue(  # type: ignore[misc]
            self.poke)
        # amqtt's, in __dict__
        self._pending_unsubscriptions: hub_session.SlimQueue[object] = hub_session.SlimQueue(  # type: ignore[misc]
            self.poke)
        self._reader_stopped = hub_session.SlimEvent()  # type: ignore[misc]  # amqtt's, in __dict__
        self.hub: Hub | None = None
        self._topics: dict[bytes, str] = {}
        self._epoch_snapshot: object = None
        self._epoch_acl: object = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Future[None] | None = None
        self.ended = False  # DISCONNECT received or connection lost: the message loop ends
        self.finished = hub_session.SlimEvent()  # the broker is done with this connection
        self.end_packet: DisconnectPacket | None = None
        self._keepalive_s: float | None = None
        self._last_read = 0.0
        self._expired = False
        # [limits], set when the reader starts (hub/limits.py); the budget on the first PUBLISH.
        self._max_packet = MAX_REMAINING
        self._max_topic = MAX_REMAINING
        self._budget: PublishBudget | None = None
        self._limits_noted: tuple[str, ...] = ()  # audited on this connection already

    # -- the broker's message loop sleeps on one future, woken by any news ---------------------

    def poke(self) -> None:
        """Something arrived for the broker's message loop (a SUBSCRIBE, a delivery, the end)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def sleep(self) -> asyncio.Future[None]:
        self._wake = self._loop.create_future()
        return self._wake

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        # Stock only resolves a waiter it then forgets: an end that comes before the broker's
        # message loop starts would leave the session "connected" for ever.
        if not self.ended:
            self.ended, self.end_packet = True, disconnect
        await super().handle_disconnect(disconnect)
        self.poke()

    @property
    def _client_id(self) -> str:
        return str(self.session.client_id) if self.session is not None else "?"

    def _allowed_topic(self, hub: Hub, raw: bytes) -> str | None:
        """The topic as text if it may be published, ``DENIED``, or None if invalid."""
        runtime = hub.hub_runtime
        # A new registry snapshot (a device changed group) or a reloaded ACL: decide afresh.
        snapshot, acl = runtime.watcher.snapshot, runtime.acl
        if snapshot is not self._epoch_snapshot or acl is not self._epoch_acl:
            self._topics.clear()
            self._epoch_snapshot, self._epoch_acl = snapshot, acl
        cached = self._topics.get(raw)
        if cached is not None:
            return cached
        if len(raw) > self._max_topic:
            self.note_limit("topic-too-long")
            return None
        try:
            topic = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None  # [MQTT-1.5.3-1]
        if topic[:1] == "$":
            self.deny_sys(topic)
            return None
        if not topic or "+" in topic or "#" in topic or "\x00" in topic or topic[0] == "$":
            return None
        result = topic if hub.topic_allowed(self.session, topic, "publish") else DENIED
        if len(self._topics) >= ACL_CACHE_SIZE:
            self._topics.clear()
        self._topics[raw] = result
        return result

    def _violation(self, what: str) -> None:
        """A protocol violation: logged (no traceback) and audited; the reader then closes."""
        log.info("%s: protocol violation: %s; closing", self._client_id, what)
        session = self.session
        if self.hub is None or session is None:
            return
        connection: Connection | None = getattr(session, "connection", None)
        audit_violation(self.hub.hub_runtime, what,
                        connection.identity if connection is not None else None,
                        connection.peer if connection is not None else
                        f"{session.remote_address}:{session.remote_port}")

    # -- [limits] ------------------------------------------------------------------------------

    def _load_limits(self) -> None:
        if self.hub is not None:
            limits = self.hub.hub_runtime.config.limits
            self._max_packet, self._max_topic = limits.max_packet_bytes, limits.max_topic_bytes

    def note_limit(self, reason: str) -> None:
        """A [limits] value was hit: counted every time, audited once per connection."""
        if self.hub is None or self.session is None:
            return
        runtime = self.hub.hub_runtime
        runtime.metrics.limit_hit(reason)
        if reason not in self._limits_noted:
            self._limits_noted += (reason,)
            audit_session(runtime, self.session, "limit", reason)

    def deny_sys(self, topic: str) -> None:
        """A PUBLISH to a ``$`` topic, closed to devices: on the record like any ACL refusal
        (it used to close the connection without one). The caller closes."""
        log.info("%s published to %s; closing", self._client_id, topic)
        if self.hub is not None and self.session is not None:
            self.hub.hub_runtime.metrics.acl_denied("publish")
            audit_session(self.hub.hub_runtime, self.session, "acl-deny", f"publish {topic}")

    def _new_budget(self, hub: Hub) -> PublishBudget:
        """The device's publish budget (per device: a reconnect does not refill it)."""
        connection: Connection | None = getattr(self.session, "connection", None)
        device = connection.identity.device_id if connection is not None else self._client_id
        self._budget = hub.publish_budgets.get(device, self._loop.time())
        return self._budget

    def _rate_limited(self, packet_id: int | None) -> bool:
        """Over publish_rate or publish_bytes_rate: False to close ("disconnect"), else the
        message is dropped, a QoS 1 one still acknowledged (MQTT 3.1.1 has no negative
        PUBACK; without it a well-behaved device would resend it for ever)."""
        self.note_limit("rate-limited")
        hub = self.hub
        if hub is not None and hub.hub_runtime.config.limits.on_rate_limit == "disconnect":
            log.info("%s: over its publish rate; closing", self._client_id)
            return False
        if packet_id is not None:
            self.writer.write(puback(packet_id))
        return True

    def limit_qos2(self, topic: str, payload_size: int) -> bool | None:
        """[limits] for a QoS 2 message at delivery (after PUBREL): True to route it, False
        to drop it, None to close the connection."""
        if self.hub is None:
            return True
        topic_size = len(topic.encode())
        if topic_size > self._max_topic:
            self.note_limit("topic-too-long")
            return None
        budget = self._budget or self._new_budget(self.hub)
        budget.refill(self._loop.time())
        if budget.take(topic_size + 4 + payload_size):  # its remaining length
            return True
        return False if self._rate_limited(None) else None

    def _track(self, task: asyncio.Task[None]) -> None:
        """Keep a reference while it runs (and cancel it with the connection), not after."""
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
