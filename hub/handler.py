"""The hub's per-connection protocol handler: reads whole buffers, routes PUBLISH inline.

Stock amqtt reads each packet with several awaits, builds packet objects, fires a plugin
event and starts a task per packet, then passes PUBLISH through two queues and a broadcast
loop. Here the reader takes what TLS hands over (up to 64 KiB), cuts it into packets
(:mod:`hub.wire`) and, for QoS 0 and 1 PUBLISH, checks the topic (valid, allowed: cached per
connection until the registry or the ACL changes), acknowledges QoS 1 and routes the message
(:mod:`hub.router`) before reading on. Everything else (SUBSCRIBE, QoS 2, acknowledgements of
the hub's own deliveries, DISCONNECT) is decoded with amqtt's classes and handled by amqtt's
code as before; PINGREQ is answered inline.

Not fired on this path: amqtt's per-packet ``mqtt_packet_received`` and per-message
``broker_message_received`` plugin events (no per-message plugin work, by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from hub import session as hub_session
from hub.errors import MalformedPacketError
from hub.wire import PUBLISH, next_packet, parse_publish, puback

log = logging.getLogger("hub.handler")
_AMQTT_LOG = logging.getLogger("amqtt.mqtt.protocol.handler")

READ_SIZE = 65536
PINGRESP = b"\xd0\x00"
ACL_CACHE_SIZE = 256  # distinct topics one connection publishes to, remembered
_HANDLERS = {SUBSCRIBE: "handle_subscribe", UNSUBSCRIBE: "handle_unsubscribe",
             PUBACK: "handle_puback", PUBREC: "handle_pubrec", PUBREL: "handle_pubrel",
             PUBCOMP: "handle_pubcomp", DISCONNECT: "handle_disconnect"}
_DENIED = ""  # cache value: the topic is valid but this device may not publish to it


class HubHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker handler with a buffer reader and an inline PUBLISH path.

    ``hub`` (set by the broker before ``start``) provides ``router``, ``hub_runtime`` and
    ``retain_message``; without it every PUBLISH takes amqtt's own path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_subscriptions = hub_session.SlimQueue(self.poke)
        self._pending_unsubscriptions = hub_session.SlimQueue(self.poke)
        self._reader_stopped = hub_session.SlimEvent()
        self.hub: Any = None
        self._topics: dict[bytes, str] = {}
        self._epoch_snapshot: object = None
        self._epoch_acl: object = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._wake: asyncio.Future[None] | None = None
        self.ended = False  # DISCONNECT received or connection lost: the message loop ends
        self.end_packet: Any = None
        self._keepalive_s: float | None = None
        self._last_read = 0.0
        self._expired = False

    # -- the broker's message loop sleeps on one future, woken by any news ---------------------

    def poke(self) -> None:
        """Something arrived for the broker's message loop (a SUBSCRIBE, a delivery, the end)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def sleep(self) -> asyncio.Future[None]:
        self._wake = self._loop.create_future()
        return self._wake

    async def handle_disconnect(self, disconnect: Any) -> None:
        # Stock only resolves a waiter it then forgets: an end that comes before the broker's
        # message loop starts would leave the session "connected" for ever.
        if not self.ended:
            self.ended, self.end_packet = True, disconnect
        await super().handle_disconnect(disconnect)
        self.poke()

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
        waiter: asyncio.Future[Any] | None = getattr(self, "_disconnect_waiter", None)
        if waiter is None or waiter.done():
            self._disconnect_waiter = self._loop.create_future()

    def attach(self, session: Any, reader: Any, writer: Any) -> None:
        super().attach(session, reader, writer)
        # Stock gives every connection its own LoggerAdapter (about 700 bytes); its debug
        # lines carry the client id in their text anyway.
        self.logger = _AMQTT_LOG

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
        except MalformedPacketError as exc:
            log.info("%s: malformed packet (%s); closing", self._client_id, exc)
        except (ConnectionError, OSError, AMQTTError, MQTTError, NoDataError) as exc:
            log.debug("reader of %s ended: %r", self._client_id, exc)
        except Exception:
            log.exception("reader of %s failed", self._client_id)
        for task in list(self._tasks):
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    @property
    def _client_id(self) -> str:
        return str(self.session.client_id) if self.session is not None else "?"

    async def _consume(self, buf: bytearray) -> int:
        """Handle every complete packet in *buf*; bytes used, or -1 to close the connection."""
        pos = 0
        received = 0
        hub = self.hub
        try:
            while True:
                frame = next_packet(buf, pos)
                if frame is None:
                    return pos
                first, start, end = frame
                kind = first >> 4
                if kind == PUBLISH and hub is not None and (first >> 1) & 3 < 2:
                    received += 1
                    if not self._publish(hub, first, buf, start, end):
                        return -1
                elif kind == PINGREQ:
                    self.writer.write(PINGRESP)
                elif not await self._other(bytes(buf[pos:end])):
                    return -1
                pos = end
        finally:
            if received and hub is not None:
                hub.hub_runtime.metrics.messages_in(received)

    def _publish(self, hub: Any, first: int, buf: bytearray, start: int, end: int) -> bool:
        message = parse_publish(first, buf, start, end)
        topic = self._allowed_topic(hub, message.topic)
        if topic is None:
            return False  # not a valid topic name: close [MQTT-4.7.3-1, 3.3.2-2, 4.7.2-1]
        if message.packet_id is not None:
            self.writer.write(puback(message.packet_id))  # QoS 1: acknowledged either way
        if topic is _DENIED:
            return True  # audited when first seen; MQTT 3.1.1 has no negative PUBACK
        hub.router.route(self.session, topic, message.payload, message.qos, message.topic)
        if message.retain:
            task = asyncio.ensure_future(
                hub.retain_message(self.session, topic, message.payload, message.qos))
            self._track(task)
        return True

    def _allowed_topic(self, hub: Any, raw: bytes) -> str | None:
        """The topic as text if it may be published, ``_DENIED``, or None if invalid."""
        runtime = hub.hub_runtime
        # A new registry snapshot (a device changed group) or a reloaded ACL: decide afresh.
        snapshot, acl = runtime.watcher.snapshot, runtime.acl
        if snapshot is not self._epoch_snapshot or acl is not self._epoch_acl:
            self._topics.clear()
            self._epoch_snapshot, self._epoch_acl = snapshot, acl
        cached = self._topics.get(raw)
        if cached is not None:
            return cached
        try:
            topic = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None  # [MQTT-1.5.3-1]
        if not topic or "+" in topic or "#" in topic or "\x00" in topic or topic[0] == "$":
            return None
        result = topic if runtime.topic_allowed(self.session, topic, "publish") else _DENIED
        if len(self._topics) >= ACL_CACHE_SIZE:
            self._topics.clear()
        self._topics[raw] = result
        return result

    async def _other(self, data: bytes) -> bool:
        """A packet for amqtt's own handling; False when the connection must close."""
        reader = BufferReader(data)
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            return False
        packet = await packet_class(header).from_stream(reader, fixed_header=header)
        kind = header.packet_type
        if kind == CONNECT:
            await self.handle_connect(packet)  # a second CONNECT: amqtt disconnects
            return True
        if kind == PUBLISH:
            # QoS 2 (or no hub): amqtt's flow, which waits for PUBREL: its own task.
            self._track(asyncio.create_task(self.handle_publish(packet)))
            return True
        name = _HANDLERS.get(kind)
        if name is None:
            log.info("%s sent a packet a client may not send (type %d); closing",
                     self._client_id, kind)
            return False
        # Quick handlers (they queue or resolve a waiter), awaited in order: a DISCONNECT
        # read just before the socket closes is handled before the close is.
        await getattr(self, name)(packet)
        return bool(kind != DISCONNECT)  # [MQTT-3.14.4-1]: nothing is read after DISCONNECT

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference while it runs (and cancel it with the connection), not after."""
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
