"""A lean amqtt Session for the hub: same states and events, no per-session state machine.

amqtt builds a ``transitions.Machine`` for every session (about 15 KiB and a tenth of the
CPU of a connect). The broker only ever calls ``connect()``, ``disconnect()``,
``is_connected()`` and reads ``state``; this class provides exactly those, with the same
rules (connect from "new" or "disconnected", disconnect from anywhere) and the same
on-enter callbacks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from amqtt.session import Session
from transitions.core import MachineError

from hub.wire import ack, publish_packet

if TYPE_CHECKING:
    from hub.broker.connection import Connection
    from hub.broker.surface import Message
    from hub.broker.surface import Session as AmqttSession

INFLIGHT_WINDOW = 32  # QoS 1/2 PUBLISHes out to one subscriber and not yet acknowledged
QUEUE_LIMIT = 1000  # QoS 1/2 messages waiting for room in the window; past it new ones drop
_PUBREL = 6
_T = TypeVar("_T")


class SessionStates:
    """The three states of an MQTT session and the two events that move between them."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"

    def connect(self) -> bool:
        if self.state == "connected":
            # What transitions raises, and what amqtt's take-over loop catches.
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"
        self._session._on_enter_disconnected()
        return True


class SlimQueue(Generic[_T]):
    """The part of ``asyncio.Queue`` amqtt uses, for one consumer, in ~100 bytes, not ~3 KiB.

    Each connection holds four of these (two on the session, two on its handler), and
    amqtt's message loop waits on them all the time: their size is memory per device.
    """

    __slots__ = ("_items", "_waiters", "notify")

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self._items: deque[_T] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        self.notify = notify  # called after each put: the hub's message loop waits on that

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: _T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._wake()
        if self.notify is not None:
            self.notify()

    async def put(self, item: _T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> _T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._take()

    def _take(self) -> _T:
        assert self._items is not None  # noqa: S101
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an empty deque is still 760 bytes: most queues hold one item
        return item

    async def get(self) -> _T:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif self._items:
                    self._wake()  # it was woken for an item it will not take: pass it on
                raise
        return self._take()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class SlimEvent:
    """``asyncio.Event`` for amqtt's handler flags, without its eager 760-byte deque."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class Writer(Protocol):
    """What the outbox writes a connection's packets to (amqtt's StreamWriterAdapter)."""

    def write(self, data: bytes) -> None: ...


class _Out:
    """One acknowledged delivery: its PUBLISH until PUBACK/PUBREC, then (QoS 2) PUBREL."""

    __slots__ = ("packet_id", "payload", "qos", "released", "retain", "topic")

    def __init__(self, topic: bytes, payload: bytes, qos: int, retain: bool) -> None:
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.packet_id = 0
        self.released = False  # PUBREC received, PUBREL sent: waiting for PUBCOMP


class Outbox:
    """One session's QoS 1/2 deliveries: a bounded window in flight, then a bounded queue.

    MQTT 3.1.1 redelivers only when a persistent session reconnects [MQTT-4.4.0-1], so while
    connected there are no timers, retries or tasks (stock amqtt gave each copy a task that
    failed with TimeoutError after 5 s and lost the message). A subscriber that does not
    acknowledge holds ``window`` copies; later ones queue (in order [MQTT-4.6.0-6]) up to
    ``limit`` and past that are dropped and counted in ``dropped``.
    """

    __slots__ = ("_inflight", "_limit", "_next_id", "_queue", "_window", "_writer", "dropped")

    def __init__(self, window: int = INFLIGHT_WINDOW, limit: int = QUEUE_LIMIT) -> None:
        self._inflight: dict[int, _Out] = {}  # packet id -> delivery, in the order sent
        self._queue: deque[_Out] = deque()
        self._window = window
        self._limit = limit
        self._next_id = 0
        self._writer: Writer | None = None
        self.dropped = 0

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def offer(self, topic: bytes, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Send now if connected with room in the window, else queue; False when dropped."""
        item = _Out(topic, payload, qos, retain)
        writer = self._writer
        if writer is not None and not self._queue and len(self._inflight) < self._window:
            self._send(item, writer)
            return True
        if len(self._queue) >= self._limit:
            self.dropped += 1
            return False
        self._queue.append(item)
        return True

    def attach(self, writer: Writer) -> None:
        """A connection for this session: what was in flight goes again, PUBLISH with DUP or
        PUBREL, same packet ids and order [MQTT-4.4.0-1, 3.3.1-1]; then the queue moves."""
        self._writer = writer
        for packet_id, item in self._inflight.items():
            if item.released:
                writer.write(ack(_PUBREL, packet_id))
            else:
                writer.write(publish_packet(item.topic, item.payload, item.qos, packet_id,
                                            retain=item.retain, dup=True))
        self._fill()

    def detach(self, writer: Writer) -> None:
        """The connection ended: keep everything for the next one (a persistent session)."""
        if self._writer is writer:
            self._writer = None

    def puback(self, packet_id: int) -> bool:
        """QoS 1 acknowledged; False for a packet id not awaiting PUBACK."""
        item = self._inflight.get(packet_id)
        if item is None or item.qos != 1:
            return False
        del self._inflight[packet_id]
        self._fill()
        return True

    def pubrec(self, packet_id: int) -> bool:
        """QoS 2 received: answer PUBREL and forget the payload [MQTT-4.3.3-1]."""
        item = self._inflight.get(packet_id)
        if item is None or item.qos != 2:
            return False
        item.released, item.payload = True, b""
        if self._writer is not None:
            self._writer.write(ack(_PUBREL, packet_id))
        return True

    def pubcomp(self, packet_id: int) -> bool:
        """QoS 2 complete: the packet id is free again."""
        item = self._inflight.get(packet_id)
        if item is None or not item.released:
            return False
        del self._inflight[packet_id]
        self._fill()
        return True

    def _fill(self) -> None:
        writer = self._writer
        while writer is not None and self._queue and len(self._inflight) < self._window:
            self._send(self._queue.popleft(), writer)

    def _send(self, item: _Out, writer: Writer) -> None:
        packet_id = self._next_id
        while True:  # at most ``window`` ids are taken: this ends quickly
            packet_id = packet_id % 65535 + 1
            if packet_id not in self._inflight:
                break
        self._next_id = item.packet_id = packet_id
        self._inflight[packet_id] = item
        writer.write(publish_packet(item.topic, item.payload, item.qos, packet_id,
                                    retain=item.retain))


def outbox_of(session: AmqttSession, writer: Writer | None = None) -> Outbox:
    """The session's outbox, made on its first QoS 1/2 delivery (most devices never get one);
    a new one is attached to *writer*, the live connection's, when there is one."""
    box: Outbox | None = getattr(session, "outbox", None)
    if box is None:
        box = session.outbox = Outbox()
        if writer is not None:
            box.attach(writer)
    return box


class HubSession(Session):  # type: ignore[misc]
    """amqtt's Session with :class:`SessionStates`, slim queues, an :class:`Outbox` and the
    record of the connection it was last admitted on (``attributes`` stays empty)."""

    # Ours in slots: amqtt's Session already sets 29 attributes, and CPython shares an
    # instance dict's keys only up to 30 (past that each session's dict is 1,584 bytes, not 296).
    __slots__ = ("connection", "outbox")

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages: SlimQueue[Message] = SlimQueue()  # type: ignore[misc]  # amqtt's, in __dict__
        self.delivered_message_queue: SlimQueue[Message] = SlimQueue()  # type: ignore[misc]  # amqtt's, in __dict__
        self.outbox: Outbox | None = None
        self.connection: Connection | None = None

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)  # type: ignore[misc]  # amqtt's, in __dict__


def install() -> None:
    """Make amqtt build HubSessions; only ``fleet-hub``'s own process calls this."""
    import amqtt.broker  # noqa: PLC0415
    import amqtt.mqtt.protocol.broker_handler as handler_module  # noqa: PLC0415

    handler_module.Session = HubSession
    amqtt.broker.Session = HubSession
