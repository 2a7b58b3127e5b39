"""A lean amqtt Session for the hub: same states and events, no per-session state machine.

amqtt builds a ``transitions.Machine`` for every session (about 15 KiB and a tenth of the
CPU of a connect). The broker only ever calls ``connect()``, ``disconnect()``,
``is_connected()`` and reads ``state``; this class provides exactly those, with the same
rules (connect from "new" or "disconnected", disconnect from anywhere) and the same
on-enter callbacks.
"""

from __future__ import annotations

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


class HubSession(Session):  # type: ignore[misc]
    """amqtt's Session with :class:`SessionStates` in place of a transitions.Machine."""

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)


def install() -> None:
    """Make amqtt build HubSessions; only ``fleet-hub``'s own process calls this."""
    import amqtt.broker  # noqa: PLC0415
    import amqtt.mqtt.protocol.broker_handler as handler_module  # noqa: PLC0415

    handler_module.Session = HubSession
    amqtt.broker.Session = HubSession
