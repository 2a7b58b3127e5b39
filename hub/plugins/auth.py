"""The authentication plugin: certificate identity, revocation, client id, password."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from amqtt.plugins.base import BaseAuthPlugin

from hub.broker.connection import Connection
from hub.plugins.shared import admit, decision_of, ensure_started, peer_of, release, runtime_for

if TYPE_CHECKING:
    from amqtt.broker import BrokerContext

    from hub.broker.surface import Session


class FleetAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admits a client only on a valid, unrevoked device certificate that names its client id.

    Under ``fleet-hub`` the broker authenticates before touching any session; under a stock
    amqtt this plugin does the same checks but amqtt has already changed session state by then.
    """

    @dataclass
    class Config:
        config: str = "hub.toml"  # path of the hub's TOML configuration

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.runtime, self.owned = runtime_for(context, self.config.config)

    async def on_broker_pre_start(self) -> None:
        if self.owned:
            await ensure_started(self.runtime)

    async def authenticate(self, *, session: Session) -> bool | None:
        if not self.runtime.started:
            await ensure_started(self.runtime)
        decision = await admit(self.runtime, session)
        return decision.accepted

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        """Stock amqtt only: track the session so a revocation can close it."""
        if not self.owned:
            return
        decision = decision_of(client_session)
        if decision is None or not decision.accepted or decision.identity is None:
            return
        broker = self.context._broker_instance
        entry = broker._sessions.get(client_id)
        writer = entry[1].writer if entry is not None and entry[1] is not None else None
        # The one kick path (hub/broker/connection.py), as under fleet-hub.
        self.runtime.gatekeeper.attach(Connection(decision.identity, peer_of(client_session),
                                                  client_session, writer, broker))

    async def on_broker_client_disconnected(self, *, client_id: str,
                                            client_session: Session) -> None:
        if self.owned:
            self.runtime.gatekeeper.detach(client_id)

    async def close(self) -> None:
        if self.owned:
            await release(self.context, self.runtime)
