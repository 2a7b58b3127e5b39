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
from typing import Any

from amqtt.session import Session
from transitions.core import MachineError


class SessionStates:
    """The three states of an MQTT session and the two events that move between them."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Any) -> None:
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


class SlimQueue:
    """The part of ``asyncio.Queue`` amqtt uses, for one consumer, in ~100 bytes, not ~3 KiB.

    Each connection holds four of these (two on the session, two on its handler), and
    amqtt's message loop waits on them all the time: their size is memory per device.
    """

    __slots__ = ("_items", "_waiters", "notify")

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self._items: deque[Any] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        self.notify = notify  # called after each put: the hub's message loop waits on that

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._wake()
        if self.notify is not None:
            self.notify()

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._take()

    def _take(self) -> Any:
        assert self._items is not None  # noqa: S101
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an empty deque is still 760 bytes: most queues hold one item
        return item

    async def get(self) -> Any:
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


class HubSession(Session):  # type: ignore[misc]
    """amqtt's Session with :class:`SessionStates` and slim queues."""

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages = SlimQueue()
        self.delivered_message_queue = SlimQueue()

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)


def install() -> None:
    """Make amqtt build HubSessions; only ``fleet-hub``'s own process calls this."""
    import amqtt.broker  # noqa: PLC0415
    import amqtt.mqtt.protocol.broker_handler as handler_module  # noqa: PLC0415

    handler_module.Session = HubSession
    amqtt.broker.Session = HubSession
