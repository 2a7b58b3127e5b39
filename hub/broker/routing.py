"""amqtt's broker after CONNECT: subscriptions, retained messages and broadcasts on the topic tree.

The layer of :class:`hub.broker.core.HubBroker` that replaces amqtt's filter table and
broadcast loop with :class:`hub.broker.delivery.Delivery` and :class:`hub.broker.router.Router`;
each override a short adapter. Moved out of core.py whole, unchanged.
"""

from __future__ import annotations

from typing import Any

from amqtt.broker import Broker

from hub.broker.delivery import Delivery
from hub.broker.router import Router

__all__ = ["Ready", "RoutingBroker"]


class RoutingBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with delivery on the topic tree; HubBroker sets ``router`` and
    ``delivery`` in its ``__init__``."""

    router: Router
    delivery: Delivery

    # -- after CONNECT --------------------------------------------------------------------------

    def topic_allowed(self, session: Any, topic: str, action: str) -> bool:
        return self.delivery.topic_allowed(session, topic, action)

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        # Same check the topic plugin makes, without a task per message (hot path).
        return self.delivery.topic_allowed(session, topic, str(action.value))

    async def _publish_session_retained_messages(self, session: Any) -> None:
        """Nothing to do: messages queued while away wait in the session's outbox, which the
        handler's start resends and moves (stock awaited each acknowledgement here)."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        self.delivery.send_retained(session, subscription[0])

    # -- routing: the topic tree instead of amqtt's filter table and broadcast loop -------------

    @property
    def subscriptions(self) -> dict[str, list[tuple[Any, int]]]:
        return self.delivery.table()

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        topic_filter, qos = subscription
        max_qos = self.config.get("max-qos", qos)
        granted = min(qos, max_qos) if isinstance(max_qos, int) else qos
        return self.delivery.subscribe(session, topic_filter, granted)

    async def retain_message(self, source_session: Any, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Stock's, within the publishing device's retained quota (hub/limits.py)."""
        if topic_name is None:
            return
        if not self.delivery.retained_within_quota(source_session, topic_name, data or b""):
            data = b""  # over the quota: the topic's older retained message goes too
        await super().retain_message(source_session, topic_name, data, qos)

    async def _del_all_subscriptions(self, session: Any) -> None:
        self.router.tree.unsubscribe_all(session.client_id)

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        return int(self.router.tree.unsubscribe(session.client_id, a_filter))

    async def _broadcast_message(self, session: Any, topic: str | None,
                                 data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """Will messages and plugins' broadcasts: routed at once, like every PUBLISH."""
        if topic and data is not None:
            # Stock delivers these at the subscription's QoS when none is given.
            self.router.route(session, topic, bytes(data), 2 if force_qos is None else force_qos)

    async def _handle_message_delivery(self, client_session: Any, handler: Any,
                                       wait_deliver: Any) -> bool:
        """A PUBLISH that took amqtt's flow (QoS 2): checked and routed like the rest."""
        message = wait_deliver.result()
        if message is None:
            return True
        verdict = self.delivery.checked_qos2(client_session, handler, message)
        if verdict is None:
            await handler.handle_connection_closed()
            return False
        if verdict:
            self.router.route(client_session, message.topic, bytes(message.data), message.qos)
            if message.publish_packet is not None and message.publish_packet.retain_flag:
                await self.retain_message(client_session, message.topic, message.data,
                                          message.qos)
        return True


class Ready:
    """A finished 'future' for stock handlers that take one and call ``result()``."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value
