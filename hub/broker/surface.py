"""amqtt 0.12.1's objects as the hub touches them: one Protocol per kind, named, not untyped.

amqtt ships no type information (to mypy each of its classes is untyped), so every override
and helper that takes one of its objects names here the members it relies on. The objects in
practice: amqtt's ``Session`` (fleet-hub's :class:`hub.broker.session.HubSession`; a stock
``Session`` under a stock amqtt running our plugins), ``BrokerProtocolHandler``
(:class:`hub.broker.handler.HubHandler`), ``StreamReaderAdapter``, ``StreamWriterAdapter``,
``ApplicationMessage`` and ``RetainedApplicationMessage``. Annotations only: nothing here runs
per message.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from hub.broker.connection import Connection
    from hub.broker.session import Outbox

__all__ = ["Action", "Done", "Handler", "Message", "Reader", "Retained", "Session",
           "SessionEntry", "SessionTable", "Transitions", "Writer"]

_T_co = TypeVar("_T_co", covariant=True)


class Reader(Protocol):
    """amqtt's ``StreamReaderAdapter``: the hub reads the asyncio stream under it."""

    _reader: asyncio.StreamReader


class Writer(Protocol):
    """amqtt's ``WriterAdapter`` (``StreamWriterAdapter`` in practice); amqtt's packets'
    ``to_stream`` write and drain it."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...

    def get_peer_info(self) -> tuple[str, int] | None: ...

    def get_ssl_info(self) -> ssl.SSLObject | None: ...


class Transitions(Protocol):
    """A session's state (:class:`hub.broker.session.SessionStates`, or amqtt's machine)."""

    state: str

    def is_connected(self) -> bool: ...

    def connect(self) -> bool: ...

    def disconnect(self) -> bool: ...


class Session(Protocol):
    """amqtt's ``Session``: the fields of the CONNECT it came from and its state.

    ``connection`` and ``outbox`` are :class:`hub.broker.session.HubSession`'s (absent from a
    stock session: read them with ``getattr(session, name, None)``).
    """

    client_id: str
    clean_session: bool
    will_flag: bool
    will_topic: str | None
    username: str | None
    password: str | bytes | None
    remote_address: str
    remote_port: int
    keep_alive: int
    parent: int
    attributes: dict[str, object]
    transitions: Transitions
    connection: Connection | None
    outbox: Outbox | None

    def clear_queues(self) -> None: ...


class Handler(Protocol):
    """amqtt's ``BrokerProtocolHandler`` as the broker, the router and a kick use it."""

    writer: Writer | None

    async def handle_connection_closed(self) -> None: ...


# amqtt's ``Broker._sessions`` values: the session and the handler of its live connection.
SessionEntry = tuple[Session, Handler | None]


class SessionTable(Protocol):
    """amqtt's ``Broker`` as a kick sees it: its session table and its clean-up."""

    _sessions: dict[str, SessionEntry]

    async def _cleanup_session(self, client_id: str) -> None: ...


class Action(Protocol):
    """amqtt's ``Action`` enum (publish, subscribe, receive)."""

    @property
    def value(self) -> str: ...


class _Publish(Protocol):
    """amqtt's ``PublishPacket``: only its RETAIN flag is read."""

    retain_flag: bool


class Message(Protocol):
    """amqtt's ``IncomingApplicationMessage`` of a QoS 2 PUBLISH, at PUBREL."""

    topic: str
    data: bytes | bytearray
    qos: int
    publish_packet: _Publish | None


class Retained(Protocol):
    """amqtt's ``RetainedApplicationMessage``: one topic's retained message."""

    data: bytes | bytearray
    qos: int | None


class Done(Protocol[_T_co]):
    """A finished future as amqtt's message-loop methods read it (:class:`Ready`)."""

    def result(self) -> _T_co: ...
