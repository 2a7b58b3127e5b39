"""The hub's per-connection protocol handler: reads whole buffers, routes PUBLISH inline.

Stock amqtt reads each packet with several awaits, builds packet objects, fires a plugin
event and starts a task per packet, then passes PUBLISH through two queues and a broadcast
loop. Here the reader takes what TLS hands over (up to 64 KiB), cuts it into packets
(:mod:`hub.wire`) and, for QoS 0 and 1 PUBLISH, checks the topic (valid, allowed: cached per
connection until the registry or the ACL changes), acknowledges QoS 1 and routes the message
(:mod:`hub.broker.router`) before reading on. Everything else (SUBSCRIBE, QoS 2, acknowledgements of
the hub's own deliveries, DISCONNECT) is decoded with amqtt's classes and handled by amqtt's
code as before; PINGREQ is answered inline.

Not fired on this path: amqtt's per-packet ``mqtt_packet_received`` and per-message
``broker_message_received`` plugin events (no per-message plugin work, by design).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError

from hub.broker import session as hub_session
from hub.broker.checks import DENIED, Hub
from hub.broker.control import PINGRESP, ControlHandler
from hub.errors import MalformedPacketError
from hub.wire import PacketTooLargeError, next_packet, parse_publish, puback

if TYPE_CHECKING:
    from hub.broker.surface import Reader, Session, Writer

log = logging.getLogger("hub.handler")
_AMQTT_LOG = logging.getLogger("amqtt.mqtt.protocol.handler")

READ_SIZE = 65536
# First bytes of the PUBLISHes handled inline: QoS 0 without DUP [MQTT-3.3.1-2], QoS 1; the
# rest (QoS 2, malformed ones) take _other, so the check costs the hot path nothing.
_INLINE_PUBLISH = frozenset({0x30, 0x31, 0x32, 0x33, 0x3A, 0x3B})


class HubHandler(ControlHandler):
    """amqtt's broker handler with a buffer reader and an inline PUBLISH path (the other
    packets: :class:`hub.broker.control.ControlHandler`; the checks and per-connection state:
    :class:`hub.broker.checks.CheckedHandler`)."""

    # -- keep-alive: one timer per connection, moved only when it fires ------------------------

    async def start(self) -> None:
        """Stock's start, with slim events and without the per-packet write timer (whose
        callback does nothing for a broker)."""
        if not self._is_attached():
            raise ProtocolHandlerError("Handler is not attached to a stream")
        self._keepalive_s = getattr(self, "keepalive_timeout", None)
        self.keepalive_timeout = None
        self._reader_ready = hub_session.SlimEvent()
        self._reader_stopped = hub_session.SlimEvent()
        self._last_read = self._loop.time()  # before the task: housekeeping may look at once
        self._reader_task = asyncio.create_task(self._reader_loop())
        await self._reader_ready.wait()
        await self._retry_deliveries()
        waiter: asyncio.Future[object] | None = getattr(self, "_disconnect_waiter", None)
        if waiter is None or waiter.done():
            self._disconnect_waiter = self._loop.create_future()

    async def _retry_deliveries(self) -> None:
        """Redeliver what the session had in flight, on this connection [MQTT-4.4.0-1].

        The outbox resends its PUBLISHes (DUP) and PUBRELs at once, without waiting for any
        answer: stock awaited acknowledgements here for up to 10 s before the connection's
        message loop started, and a take-over meanwhile waited for that loop. Received QoS 2
        messages need nothing: they wait in ``inflight_in`` for the client's PUBREL.
        """
        box = self.session.outbox if self.session is not None else None
        if box is not None:
            box.attach(self.writer)

    def attach(self, session: Session, reader: Reader, writer: Writer) -> None:
        super().attach(session, reader, writer)
        # Stock gives every connection its own LoggerAdapter (about 700 bytes); its debug
        # lines carry the client id in their text anyway.
        self.logger = _AMQTT_LOG

    def idle_seconds(self, now: float) -> float | None:
        """Seconds (loop time) since this connection last sent anything; None before start."""
        last: float | None = getattr(self, "_last_read", None)
        return None if last is None else max(0.0, now - last)

    def check_idle(self, now: float) -> None:
        """Close the connection if nothing came within 1.5x keep-alive [MQTT-3.1.2-24].

        Called for every connection by the broker's housekeeping pass (loop time), instead
        of a timer object per connection.
        """
        task = self._reader_task
        if not self._keepalive_s or task is None or task.done() or self._expired:
            return
        if now >= self._last_read + self._keepalive_s:
            self._expired = True
            task.cancel()

    async def _reader_loop(self) -> None:
        assert self._reader_ready is not None  # noqa: S101  (start() made it)
        self._reader_ready.set()
        stream: asyncio.StreamReader = self.reader._reader
        loop = self._loop
        self._last_read = loop.time()
        self._load_limits()
        buf = bytearray()
        try:
            while True:
                chunk = await stream.read(READ_SIZE)
                if not chunk:
                    break
                self._last_read = loop.time()
                buf += chunk
                used = await self._consume(buf)
                if used < 0:
                    break
                del buf[:used]
        except asyncio.CancelledError:
            if self._expired:
                log.info("%s: no packet within 1.5x keep-alive; closing", self._client_id)
            else:
                log.debug("reader of %s cancelled", self._client_id)
        except PacketTooLargeError as exc:
            log.info("%s: %s; closing", self._client_id, exc)
            self.note_limit("packet-too-large")  # closed before its body is buffered
        except MalformedPacketError as exc:
            self._violation(str(exc))
        except (ConnectionError, OSError, AMQTTError, MQTTError, NoDataError) as exc:
            log.debug("reader of %s ended: %r", self._client_id, exc)
        except Exception:
            log.exception("reader of %s failed", self._client_id)
        for task in list(self._tasks):
            task.cancel()
        box = self.session.outbox if self.session is not None else None
        if box is not None:
            box.detach(self.writer)  # a persistent session keeps it for the next connection
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _consume(self, buf: bytearray) -> int:
        """Handle every complete packet in *buf*; bytes used, or -1 to close the connection."""
        pos = 0
        received = 0
        hub = self.hub
        limit = self._max_packet
        budget = self._budget
        if budget is not None:
            budget.refill(self._loop.time())  # once per read, not per message
        try:
            while True:
                frame = next_packet(buf, pos, limit)
                if frame is None:
                    return pos
                first, start, end = frame
                if first in _INLINE_PUBLISH and hub is not None:
                    received += 1
                    if not self._publish(hub, first, buf, start, end):
                        return -1
                elif first == 0xC0 and end == start:  # PINGREQ; a malformed one goes on
                    self.writer.write(PINGRESP)
                elif not await self._other(bytes(buf[pos:end])):
                    return -1
                pos = end
        finally:
            if received and hub is not None:
                hub.hub_runtime.metrics.messages_in(received)

    def _publish(self, hub: Hub, first: int, buf: bytearray, start: int, end: int) -> bool:
        message = parse_publish(first, buf, start, end)
        topic = self._allowed_topic(hub, message.topic)
        if topic is None:
            return self._bad_topic(message.topic)  # close [MQTT-4.7.3-1, 3.3.2-2, 4.7.2-1]
        budget = self._budget or self._new_budget(hub)
        if not budget.take(end - start):
            return self._rate_limited(message.packet_id)
        if message.packet_id is not None:
            self.writer.write(puback(message.packet_id))  # QoS 1: acknowledged either way
        if topic is DENIED:
            return True  # audited when first seen; MQTT 3.1.1 has no negative PUBACK
        hub.router.route(self.session, topic, message.payload, message.qos, message.topic)
        if message.retain:
            task = asyncio.ensure_future(
                hub.retain_message(self.session, topic, message.payload, message.qos))
            self._track(task)
        return True
