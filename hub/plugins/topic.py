"""The topic plugin: per-device ACL on publish and subscribe, deny by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from amqtt.plugins.base import BaseTopicPlugin

from hub.plugins.shared import decision_of, peer_of, runtime_for

if TYPE_CHECKING:
    from amqtt.broker import BrokerContext

    from hub.broker.surface import Action, Session


class FleetTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """``{device_id}``/``{group}`` ACL from hub.toml; the username is never consulted."""

    @dataclass
    class Config:
        config: str = "hub.toml"

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.runtime, _ = runtime_for(context, self.config.config)

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | str | None = None) -> bool | None:
        if topic is None or action is None:
            return False
        decision = decision_of(session)
        identity = decision.identity if decision is not None and decision.accepted else None
        peer = peer_of(session) if identity is not None and session is not None else ""
        return self.runtime.topic_allowed(identity, peer, topic,
                                          str(getattr(action, "value", action)))
