"""amqtt's broker after CONNECT: subscriptions, retained messages and broadcasts on the topic tree.

The layer of :class:`hub.broker.core.HubBroker` that replaces amqtt's filter table and
broadcast loop with :class:`hub.broker.delivery.Delivery` and :class:`hub.broker.router.Router`;
each override a short adapter, and the message loop of each connection. Moved out of core.py
whole, unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from amqtt.broker import Broker

from hub.broker.delivery import Delivery
from hub.broker.router import Router

if TYPE_CHECKING:
    from hub.broker.handler import HubHandler
    from hub.broker.session import HubSession
    from hub.broker.surface import Action, Done, Handler, Message, Session

__all__ = ["Ready", "RoutingBroker"]

_T = TypeVar("_T")


class RoutingBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with delivery on the topic tree; HubBroker sets ``router`` and
    ``delivery`` in its ``__init__``."""

    router: Router
    delivery: Delivery

    # -- after CONNECT --------------------------------------------------------------------------

    def topic_allowed(self, session: Session | None, topic: str, action: str) -> bool:
        return self.delivery.topic_allowed(session, topic, action)

    async def _topic_filtering(self, session: Session | None, topic: str, action: Action) -> bool:
        # Same check the topic plugin makes, without a task per message (hot path).
        return self.delivery.topic_allowed(session, topic, str(action.value))

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Nothing to do: messages queued while away wait in the session's outbox, which the
        handler's start resends and moves (stock awaited each acknowledgement here)."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        self.delivery.send_retained(session, subscription[0])

    # -- routing: the topic tree instead of amqtt's filter table and broadcast loop -------------

    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        return self.delivery.table()

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        max_qos = self.config.get("max-qos", qos)
        granted = min(qos, max_qos) if isinstance(max_qos, int) else qos
        return self.delivery.subscribe(session, topic_filter, granted)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Stock's, within the publishing device's retained quota (hub/limits.py)."""
        if topic_name is None:
            return
        if not self.delivery.retained_within_quota(source_session, topic_name, data or b""):
            data = b""  # over the quota: the topic's older retained message goes too
        await super().retain_message(source_session, topic_name, data, qos)

    async def _del_all_subscriptions(self, session: Session) -> None:
        self.router.tree.unsubscribe_all(session.client_id)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        return int(self.router.tree.unsubscribe(session.client_id, a_filter))

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """Will messages and plugins' broadcasts: routed at once, like every PUBLISH."""
        if topic and data is not None:
            # Stock delivers these at the subscription's QoS when none is given.
            self.router.route(session, topic, bytes(data), 2 if force_qos is None else force_qos)

    async def _handle_message_delivery(self, client_session: Session, handler: Handler,
                                       wait_deliver: Done[Message | None]) -> bool:
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

    # -- the message loop of a connection ------------------------------------------------------

    async def _client_message_loop(self, client_session: HubSession,
                                   handler: HubHandler) -> None:
        await self._message_loop(client_session, handler)

    async def _message_loop(self, session: HubSession, handler: HubHandler) -> None:
        """Stock's loop, on one future: it kept four tasks per connection waiting forever.

        Subscriptions, unsubscriptions, QoS 2 deliveries and the end of the connection each
        wake the handler's single future (:meth:`HubHandler.poke`); they are then handled in
        stock's order with stock's methods.
        """
        subscriptions = handler._pending_subscriptions
        unsubscriptions = handler._pending_unsubscriptions
        deliveries = session.delivered_message_queue
        deliveries.notify = handler.poke
        try:
            while True:
                if handler.ended:
                    await self._handle_disconnect(session, handler, Ready(handler.end_packet))
                    return
                if not subscriptions.empty():
                    await self._handle_subscription(session, handler,
                                                    Ready(subscriptions.get_nowait()))
                elif not unsubscriptions.empty():
                    await self._handle_unsubscription(session, handler,
                                                      Ready(unsubscriptions.get_nowait()))
                elif not deliveries.empty():
                    if not await self._handle_message_delivery(
                            session, handler, Ready(deliveries.get_nowait())):
                        return
                else:
                    await handler.sleep()
        finally:
            if deliveries.notify == handler.poke:
                deliveries.notify = None


class Ready(Generic[_T]):
    """A finished 'future' for stock handlers that take one and call ``result()``."""

    __slots__ = ("_value",)

    def __init__(self, value: _T) -> None:
        self._value = value

    def result(self) -> _T:
        return self._value
