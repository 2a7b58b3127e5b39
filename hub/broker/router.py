"""Deliver a PUBLISH to its subscribers: one tree lookup, one encoding, no task per QoS 0 copy.

Stock amqtt queues every message for a broadcast loop that matches it against every filter
and starts a task per subscriber. Here routing is a call: the topic tree names the
subscribers, a QoS 0 copy is encoded once and written straight into each subscriber's TLS
transport (whole packets per write, so copies never interleave with amqtt's own writes).
QoS 1/2 copies go into the subscriber session's :class:`hub.broker.session.Outbox`: a bounded
window in flight, then a bounded queue, redelivered with DUP when a persistent session
comes back [MQTT-4.4.0-1]; no task and no timer per copy.

A subscriber that does not read cannot make the hub buffer without bound: past
``buffer_limit`` bytes waiting in its transport, its QoS 0 copies are dropped (QoS 0 is "at
most once") and counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hub.broker.session import Writer, outbox_of
from hub.metrics import Metrics
from hub.tlssocket import transport_of
from hub.topictree import TopicTree
from hub.wire import publish_packet

if TYPE_CHECKING:
    from hub.broker.surface import Session, SessionEntry

log = logging.getLogger("hub.router")

BUFFER_LIMIT = 1 << 20  # bytes queued in one subscriber's transport before QoS 0 is dropped


class Router:
    """Subscriptions and delivery for one broker; ``sessions`` is amqtt's session table."""

    def __init__(self, sessions: dict[str, SessionEntry], metrics: Metrics, *,
                 buffer_limit: int = BUFFER_LIMIT) -> None:
        self.tree = TopicTree()
        self._sessions = sessions
        self._metrics = metrics
        self._buffer_limit = buffer_limit
        self.dropped = 0  # QoS 0 copies not written: the subscriber's transport was full
        self.overflowed = 0  # QoS 1/2 copies dropped: the subscriber's outbox queue was full

    def route(self, source: Session | None, topic: str, payload: bytes, qos: int,
              topic_bytes: bytes | None = None) -> int:
        """Deliver to every matching subscription; how many copies went out or were queued."""
        matches = self.tree.match(topic)
        if not matches:
            return 0
        encoded = topic_bytes if topic_bytes is not None else topic.encode()
        qos0: bytes | None = None
        delivered = 0
        sessions = self._sessions
        for client_id, granted in matches.items():
            entry = sessions.get(client_id)
            if entry is None:
                continue
            session, handler = entry
            level = qos if qos < granted else granted  # [MQTT-3.8.4-6]: the lower of the two
            writer = handler.writer if handler is not None else None
            if session.transitions.state != "connected" or writer is None:
                # [MQTT-3.1.2-5]: a persistent session keeps QoS 1/2 messages while away.
                if level and not session.clean_session and \
                        self.acknowledged(session, encoded, payload, level, writer=None):
                    delivered += 1
                continue
            if level == 0:
                if qos0 is None:
                    qos0 = publish_packet(encoded, payload)
                if _backlog(writer) > self._buffer_limit:
                    self.dropped += 1
                    continue
                writer.write(qos0)
            elif not self.acknowledged(session, encoded, payload, level, writer=writer):
                continue
            delivered += 1
        if delivered:
            self._metrics.messages_out(delivered)
        return delivered

    def acknowledged(self, session: Session, topic: bytes, payload: bytes, qos: int, *,
                     retain: bool = False, writer: Writer | None = None) -> bool:
        """A QoS 1/2 copy into the session's outbox; False (and counted) when it is full.

        *writer* is the session's live connection (None while it is away).
        """
        if outbox_of(session, writer).offer(topic, payload, qos, retain):
            return True
        self.overflowed += 1
        if self.overflowed & (self.overflowed - 1) == 0:  # 1, 2, 4, 8...: the log stays short
            log.warning("QoS 1/2 copy for %s dropped: its outbox is full (%d dropped in all)",
                        session.client_id, self.overflowed)
        return False


def _backlog(writer: Writer) -> int:
    transport = transport_of(writer)
    if transport is None:
        return 0
    size: int = transport.get_write_buffer_size()
    return size
