"""Subscriptions, retained messages and amqtt-flow deliveries, on the router's topic tree.

Stock amqtt keeps a filter table it walks per CONNECT and per message, sends every client the
retained messages of everybody's filters, and leaves a connection that published to a ``$``
topic half-dead. :class:`HubBroker` hands those calls to this class, which works on the
router's tree and on the typed per-connection record instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from hub.broker.checks import audit_session
from hub.broker.handler import HubHandler
from hub.broker.router import Router
from hub.limits import RetainedQuota
from hub.topictree import valid_filter
from hub.wire import publish_packet

if TYPE_CHECKING:
    from hub.broker.surface import Handler, Message, Retained, Session, SessionEntry
    from hub.runtime import HubRuntime

log = logging.getLogger("hub.broker")

SUBACK_FAILURE = 0x80


class Delivery:
    """Topic checks, SUBSCRIBE grants, retained messages and QoS 2 deliveries of one broker.

    *sessions* and *retained* are amqtt's own tables (cleared in place, never replaced);
    *matches* is amqtt's topic-filter match.
    """

    def __init__(self, runtime: HubRuntime, router: Router, sessions: dict[str, SessionEntry],
                 retained: dict[str, Retained], matches: Callable[[str, str], bool]) -> None:
        self.runtime = runtime
        self.router = router
        self._sessions = sessions
        self._retained = retained
        self._matches = matches
        limits = runtime.config.limits
        self.retained_quota = RetainedQuota(limits.max_retained_per_device,
                                            limits.max_retained_bytes)

    def topic_allowed(self, session: Session | None, topic: str, action: str) -> bool:
        """The ACL for *session*'s admitted device (refused without a connection record)."""
        connection = getattr(session, "connection", None)
        if connection is None:
            return self.runtime.topic_allowed(None, "", topic, action)
        return self.runtime.topic_allowed(connection.identity, connection.peer, topic, action)

    def subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        """The QoS granted for one SUBSCRIBE filter, or 0x80 [MQTT-3.9.3-2]."""
        if not valid_filter(topic_filter):
            return SUBACK_FAILURE  # [MQTT-4.7.1-2/3]
        limits = self.runtime.config.limits
        if len(topic_filter.encode()) > limits.max_topic_bytes:
            self.note_limit(session, "topic-too-long")
            return SUBACK_FAILURE
        if not self.topic_allowed(session, topic_filter, "subscribe"):
            return SUBACK_FAILURE
        held = self.router.tree.filters_of(session.client_id)
        if topic_filter not in held and len(held) >= limits.max_subscriptions:
            self.note_limit(session, "too-many-subscriptions")
            return SUBACK_FAILURE
        self.router.tree.subscribe(session.client_id, topic_filter, qos)
        return qos

    def table(self) -> dict[str, list[tuple[Session, int]]]:
        """Stock's shape, {filter: [(session, qos)]}, built from the tree (for plugins)."""
        table: dict[str, list[tuple[Session, int]]] = {}
        for client_id, filters in self.router.tree.items():
            entry = self._sessions.get(client_id)
            if entry is None:
                continue
            for topic_filter, qos in filters.items():
                table.setdefault(topic_filter, []).append((entry[0], qos))
        return table

    def note_limit(self, session: Session | None, reason: str) -> None:
        """A [limits] hit by *session*'s device: through its connection's handler (audited
        once per connection), or audited at once when it has none (a will)."""
        entry = self._sessions.get(session.client_id) if session is not None else None
        handler = entry[1] if entry is not None and entry[0] is session else None
        if isinstance(handler, HubHandler):
            handler.note_limit(reason)
        elif session is not None:
            self.runtime.metrics.limit_hit(reason)
            audit_session(self.runtime, session, "limit", reason)

    def retained_within_quota(self, session: Session | None, topic: str,
                              data: bytes | bytearray) -> bool:
        """Whether a retained message is kept: within the publishing device's quota
        (hub/limits.py); an empty payload deletes and frees the quota [MQTT-3.3.1-10/11].

        A message over the quota is not kept (it was routed live already) and the topic's
        older retained message goes too: no later subscriber gets a value the device has
        since replaced. Messages of a device revoked later are kept: they were legitimate
        when published.
        """
        if not data:
            self.retained_quota.remove(topic)
            return True
        size = len(topic.encode()) + len(data)
        if self.retained_quota.store(_device_of(session), topic, size):
            return True
        self.note_limit(session, "retained-quota")
        self.retained_quota.remove(topic)
        return False

    def send_retained(self, session: Session, topic_filter: str) -> None:
        """Retained messages for a filter this client holds (stock also sent them for
        everybody's filters), with RETAIN 1 [MQTT-3.3.1-8]: QoS 0 written at once, QoS 1/2
        through the outbox (stock awaited each acknowledgement in the message loop)."""
        granted = self.router.tree.filters_of(session.client_id).get(topic_filter)
        entry = self._sessions.get(session.client_id)
        if not self._retained or granted is None or entry is None:
            return
        writer = entry[1].writer if entry[1] is not None else None
        for topic, retained in list(self._retained.items()):
            if not self._matches(topic, topic_filter):
                continue
            qos = min(granted, retained.qos if retained.qos is not None else granted)
            encoded, payload = topic.encode(), bytes(retained.data)
            if qos:
                self.router.acknowledged(session, encoded, payload, qos, retain=True,
                                         writer=writer)
            elif writer is not None:
                writer.write(publish_packet(encoded, payload, retain=True))

    def checked_qos2(self, session: Session, handler: Handler, message: Message) -> bool | None:
        """A PUBLISH that took amqtt's flow (QoS 2), at PUBREL: True to route it, False to
        drop it, None to close the connection (stock stopped reading and kept the socket
        open [MQTT-4.8.0-1])."""
        topic = message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            if topic and topic[0] == "$" and isinstance(handler, HubHandler):
                handler.deny_sys(topic)
            return None
        self.runtime.metrics.messages_in()
        within = handler.limit_qos2(topic, len(message.data)) \
            if isinstance(handler, HubHandler) else True
        if within is None:
            return None
        return within and self.topic_allowed(session, topic, "publish")


def _device_of(session: Session | None) -> str | None:
    """The device a session's connection was admitted as; None for the broker's own."""
    if session is None:
        return None
    connection = getattr(session, "connection", None)
    return str(connection.identity.device_id) if connection is not None \
        else str(session.client_id)
