"""Deliver a PUBLISH to its subscribers: one tree lookup, one encoding, no task per QoS 0 copy.

Stock amqtt queues every message for a broadcast loop that matches it against every filter
and starts a task per subscriber. Here routing is a call: the topic tree names the
subscribers, a QoS 0 copy is encoded once and written straight into each subscriber's TLS
transport (whole packets per write, so copies never interleave with amqtt's own writes),
and only QoS 1/2 copies go through amqtt's acknowledged flow (packet ids, retries).

A subscriber that does not read cannot make the hub buffer without bound: past
``buffer_limit`` bytes waiting in its transport, its QoS 0 copies are dropped (QoS 0 is "at
most once") and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.broker import RetainedApplicationMessage

from hub.metrics import Metrics
from hub.tlssocket import transport_of
from hub.topictree import TopicTree
from hub.wire import publish_packet

log = logging.getLogger("hub.router")

BUFFER_LIMIT = 1 << 20  # bytes queued in one subscriber's transport before QoS 0 is dropped


class Router:
    """Subscriptions and delivery for one broker; ``sessions`` is amqtt's session table."""

    def __init__(self, sessions: dict[str, tuple[Any, Any]], metrics: Metrics, *,
                 buffer_limit: int = BUFFER_LIMIT) -> None:
        self.tree = TopicTree()
        self._sessions = sessions
        self._metrics = metrics
        self._buffer_limit = buffer_limit
        self._tasks: set[asyncio.Future[Any]] = set()
        self.dropped = 0

    def route(self, source: Any, topic: str, payload: bytes, qos: int,
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
                if level and not session.clean_session:
                    session.retained_messages.put_nowait(
                        RetainedApplicationMessage(source, topic, payload, level))
                    delivered += 1
                continue
            if level == 0:
                if qos0 is None:
                    qos0 = publish_packet(encoded, payload)
                if _backlog(writer) > self._buffer_limit:
                    self.dropped += 1
                    continue
                writer.write(qos0)
            else:
                task = asyncio.ensure_future(handler.mqtt_publish(topic, payload, level, False))
                self._tasks.add(task)
                task.add_done_callback(self._finished)
            delivered += 1
        if delivered:
            self._metrics.messages_out(delivered)
        return delivered

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("delivery failed: %r", task.exception())

    async def drain(self) -> None:
        """Let acknowledged deliveries under way finish or fail (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _backlog(writer: Any) -> int:
    transport = transport_of(writer)
    if transport is None:
        return 0
    size: int = transport.get_write_buffer_size()
    return size
