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
import contextlib
import logging
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, UNACCEPTABLE_PROTOCOL_VERSION, ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
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
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage
from amqtt.utils import gen_client_id

from hub.broker import session as hub_session
from hub.errors import MalformedPacketError
from hub.limits import PublishBudget
from hub.wire import (
    MAX_REMAINING,
    PROTOCOL_LEVEL,
    PUBLISH,
    PacketTooLargeError,
    ack,
    check_flags,
    next_packet,
    packet_name,
    parse_connect,
    parse_packet_id,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    puback,
    topic_problem,
)

log = logging.getLogger("hub.handler")
_AMQTT_LOG = logging.getLogger("amqtt.mqtt.protocol.handler")

READ_SIZE = 65536
PINGRESP = b"\xd0\x00"
ACL_CACHE_SIZE = 256  # distinct topics one connection publishes to, remembered
_DENIED = ""  # cache value: the topic is valid but this device may not publish to it
# First bytes of the PUBLISHes handled inline: QoS 0 without DUP [MQTT-3.3.1-2], QoS 1; the
# rest (QoS 2, malformed ones) take _other, so the check costs the hot path nothing.
_INLINE_PUBLISH = frozenset({0x30, 0x31, 0x32, 0x33, 0x3A, 0x3B})
_DECISION = "fleet_hub.decision"


class ConnectRefusedError(MQTTError):  # type: ignore[misc]
    """A well-formed CONNECT answered with a CONNACK refusal (``reason`` for the audit)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerCertificate:
    """The verified client certificate of one connection, kept by value on its session.

    Stands in for the ``ssl_object`` amqtt keeps there: the SSL socket is gone once the
    client resets (stock's ``getpeercert`` then raised AttributeError inside the auth plugin,
    a ``plugin-error`` refusal), and on resume stock kept the previous connection's.
    """

    __slots__ = ("_der",)

    def __init__(self, der: bytes | None) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self._der if binary_form else None


def audit_session(runtime: Any, session: Any, event: str, reason: str) -> None:
    """One audit row about a connected device (the identity its CONNECT was admitted with)."""
    identity = getattr(session.attributes.get(_DECISION), "identity", None)
    runtime.audit.record(event, device_id=identity.device_id if identity else session.client_id,
                         serial=identity.serial_hex if identity else None,
                         peer=f"{session.remote_address}:{session.remote_port}", reason=reason)


def audit_violation(runtime: Any, what: str, identity: Any, peer: str | None) -> None:
    """One ``violation`` audit row: ``protocol-violation: <what> [MQTT-x.y.z-n]``."""
    runtime.audit.record("violation", device_id=(identity.device_id or None) if identity else None,
                         serial=identity.serial_hex if identity else None, peer=peer,
                         reason=f"protocol-violation: {what}")


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
        self.finished = hub_session.SlimEvent()  # the broker is done with this connection
        self.end_packet: Any = None
        self._keepalive_s: float | None = None
        self._last_read = 0.0
        self._expired = False
        # [limits], set when the reader starts (hub/limits.py); the budget on the first PUBLISH.
        self._max_packet = MAX_REMAINING
        self._max_topic = MAX_REMAINING
        self._budget: PublishBudget | None = None
        self._limits_noted: tuple[str, ...] = ()  # audited on this connection already

    # -- CONNECT: the first packet, read within its remaining length ---------------------------

    @classmethod
    async def init_from_connect(cls, reader: Any, writer: Any, plugins_manager: Any,
                                loop: asyncio.AbstractEventLoop | None = None, *,
                                max_bytes: int = MAX_REMAINING,
                                peer_der: bytes | None = None) -> tuple[HubHandler, Any]:
        """The handler and a fresh session for the CONNECT that must come first [MQTT-3.1.0-1].

        Unlike stock: the size is checked on the fixed header, before the body is read
        (PacketTooLargeError past *max_bytes*); the body is read exactly and parsed within
        it, every flag and field checked (MalformedPacketError); the session keeps the
        certificate by value (*peer_der*). A level other than 4 or an empty client id with
        clean session 0 get their CONNACK refusal (ConnectRefusedError).
        """
        stream: asyncio.StreamReader = reader._reader
        first = (await stream.readexactly(1))[0]
        if first >> 4 != CONNECT:
            raise MalformedPacketError(f"first packet is {packet_name(first >> 4)}, not "
                                       "CONNECT [MQTT-3.1.0-1]")
        length = 0
        for shift in (0, 7, 14, 21):
            byte = (await stream.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise MalformedPacketError("remaining length longer than four bytes "
                                       "[MQTT-4.8.0-1]")
        if length > max_bytes:
            raise PacketTooLargeError(f"CONNECT of {length} bytes, limit {max_bytes}")
        connect = parse_connect(first, await stream.readexactly(length))
        refusal = None
        if connect.level != PROTOCOL_LEVEL:
            refusal = (UNACCEPTABLE_PROTOCOL_VERSION, "unacceptable-protocol-version",
                       f"protocol level {connect.level}, want 4 [MQTT-3.1.2-2]")
        elif not connect.client_id and not connect.clean_session:
            refusal = (IDENTIFIER_REJECTED, "identifier-rejected",
                       "empty client id with clean session 0 [MQTT-3.1.3-8]")
        if refusal is not None:
            code, reason, detail = refusal
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, code).to_stream(writer)  # [MQTT-3.2.2-4]
            raise ConnectRefusedError(reason, detail)
        peer = writer.get_peer_info() or ("?", 0)
        session = hub_session.HubSession()
        session.client_id = connect.client_id or gen_client_id()  # [MQTT-3.1.3-6]
        session.clean_session = connect.clean_session
        session.will_flag = connect.will_topic is not None
        session.will_retain = connect.will_retain
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password  # bytes, as sent: binary data [MQTT-3.1.3.5]
        session.remote_address, session.remote_port = peer
        session.ssl_object = PeerCertificate(peer_der)
        session.keep_alive = connect.keep_alive
        return cls(plugins_manager, loop=loop), session

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

    @property
    def _client_id(self) -> str:
        return str(self.session.client_id) if self.session is not None else "?"

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

    def _publish(self, hub: Any, first: int, buf: bytearray, start: int, end: int) -> bool:
        message = parse_publish(first, buf, start, end)
        topic = self._allowed_topic(hub, message.topic)
        if topic is None:
            return self._bad_topic(message.topic)  # close [MQTT-4.7.3-1, 3.3.2-2, 4.7.2-1]
        budget = self._budget or self._new_budget(hub)
        if not budget.take(end - start):
            return self._rate_limited(message.packet_id)
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
        if len(raw) > self._max_topic:
            self.note_limit("topic-too-long")
            return None
        try:
            topic = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None  # [MQTT-1.5.3-1]
        if topic[:1] == "$":
            self.deny_sys(topic)
            return None
        if not topic or "+" in topic or "#" in topic or "\x00" in topic or topic[0] == "$":
            return None
        result = topic if runtime.topic_allowed(self.session, topic, "publish") else _DENIED
        if len(self._topics) >= ACL_CACHE_SIZE:
            self._topics.clear()
        self._topics[raw] = result
        return result

    async def _other(self, data: bytes) -> bool:
        """A packet other than a QoS 0/1 PUBLISH; False when the connection must close.

        Each is checked to the letter (fixed-header flags, packet ids, lengths, filters);
        a violation raises MalformedPacketError, which the reader audits before it closes
        the connection [MQTT-4.8.0-1]. Acknowledgements and QoS 2 are handled here, on bytes,
        without amqtt's waiters and tasks.
        """
        frame = next_packet(data, 0)
        if frame is None:
            raise MalformedPacketError("incomplete packet [MQTT-4.8.0-1]")
        first, start, end = frame
        kind = first >> 4
        if kind == PUBLISH:
            return await self._publish_other(first, data, start, end)
        if kind in (PUBACK, PUBREC, PUBCOMP):
            check_flags(first, 0, "[MQTT-2.2.2-2]")
            self._acknowledged(kind, parse_packet_id(first, data, start, end))
            return True
        if kind == PUBREL:
            check_flags(first, 2, "[MQTT-3.6.1-1]")
            packet_id = parse_packet_id(first, data, start, end)
            message = self.session.inflight_in.pop(packet_id, None)
            if message is not None:  # delivered now, once [MQTT-4.3.3-2]
                self.session.delivered_message_queue.put_nowait(message)
            self.writer.write(ack(PUBCOMP, packet_id))  # also for an id already completed
            return True
        if kind == SUBSCRIBE:
            check_flags(first, 2, "[MQTT-3.8.1-1]")
            self._pending_subscriptions.put_nowait(Subscription(*parse_subscribe(data, start,
                                                                                 end)))
            return True
        if kind == UNSUBSCRIBE:
            check_flags(first, 2, "[MQTT-3.10.1-1]")
            self._pending_unsubscriptions.put_nowait(
                UnSubscription(*parse_unsubscribe(data, start, end)))
            return True
        if kind in (PINGREQ, DISCONNECT):
            check_flags(first, 0, "[MQTT-3.14.1-1]" if kind == DISCONNECT else "[MQTT-2.2.2-2]")
            if end != start:
                raise MalformedPacketError(f"{packet_name(kind)} remaining length "
                                           f"{end - start}, want 0 [MQTT-4.8.0-1]")
            if kind == PINGREQ:
                self.writer.write(PINGRESP)
                return True
            # Handled before the close is: the will is discarded [MQTT-3.14.4-3], and
            # nothing is read after it [MQTT-3.14.4-1].
            await self.handle_disconnect(DisconnectPacket())
            return False
        if kind == CONNECT:
            raise MalformedPacketError("second CONNECT on a connection [MQTT-3.1.0-2]")
        raise MalformedPacketError(f"{packet_name(kind)}, a packet only a server sends "
                                   "[MQTT-4.8.0-1]")

    async def _publish_other(self, first: int, data: bytes, start: int, end: int) -> bool:
        """QoS 2 (or a PUBLISH with DUP at QoS 0, or any without a hub): checked, then held
        until PUBREL; False when the connection must close."""
        message = parse_publish(first, data, start, end)  # QoS 3, id 0: malformed
        if message.qos == 0 and message.dup:
            raise MalformedPacketError("PUBLISH with DUP at QoS 0 [MQTT-3.3.1-2]")
        hub = self.hub
        if message.qos < 2:
            # No hub (unit tests): amqtt's own flow.
            reader = BufferReader(data)
            header = await MQTTFixedHeader.from_stream(reader)
            packet = await packet_class(header).from_stream(reader, fixed_header=header)
            self._track(asyncio.create_task(self.handle_publish(packet)))
            return True
        packet_id = message.packet_id
        assert packet_id is not None  # noqa: S101  (QoS 2 has one)
        inflight = self.session.inflight_in
        if packet_id not in inflight:  # a DUP of one held is not delivered twice [MQTT-4.3.3-2]
            # Checked now, not at PUBREL: an invalid or $ topic closes the connection at once.
            if hub is None and topic_problem(message.topic) is None:
                topic: str | None = message.topic.decode("utf-8")
            else:
                topic = self._allowed_topic(hub, message.topic) if hub is not None else None
            if topic is None:
                return self._bad_topic(message.topic)
            if topic is _DENIED:  # acknowledged all the same, never delivered
                inflight[packet_id] = None
                self.writer.write(ack(PUBREC, packet_id))
                return True
            held = IncomingApplicationMessage(packet_id, message.topic.decode("utf-8"), 2,
                                              message.payload, message.retain)
            held.publish_packet = PublishPacket.build(held.topic, message.payload, packet_id,
                                                      message.dup, 2, message.retain)
            inflight[packet_id] = held
        self.writer.write(ack(PUBREC, packet_id))  # [MQTT-4.3.3-2]
        return True

    def _bad_topic(self, raw: bytes) -> bool:
        """A PUBLISH topic was refused: a violation is audited (a ``$`` topic or one past
        max_topic_bytes is not one, and was audited as such); False: close the connection."""
        problem = topic_problem(raw)
        if problem is not None and raw[:1] != b"$" and len(raw) <= self._max_topic:
            self._violation(problem)
        return False

    def _acknowledged(self, kind: int, packet_id: int) -> None:
        """PUBACK, PUBREC or PUBCOMP for one of the hub's deliveries (the session's outbox)."""
        box = self.session.outbox
        if box is None:
            done = False
        elif kind == PUBACK:
            done = box.puback(packet_id)
        elif kind == PUBREC:
            done = box.pubrec(packet_id)
        else:
            done = box.pubcomp(packet_id)
        if not done:
            log.debug("%s: %s for packet id %d, which is not in flight", self._client_id,
                      packet_name(kind), packet_id)

    def _violation(self, what: str) -> None:
        """A protocol violation: logged (no traceback) and audited; the reader then closes."""
        log.info("%s: protocol violation: %s; closing", self._client_id, what)
        session = self.session
        if self.hub is None or session is None:
            return
        decision = session.attributes.get(_DECISION)
        audit_violation(self.hub.hub_runtime, what, getattr(decision, "identity", None),
                        f"{session.remote_address}:{session.remote_port}")

    # -- [limits] ------------------------------------------------------------------------------

    def _load_limits(self) -> None:
        if self.hub is not None:
            limits = self.hub.hub_runtime.config.limits
            self._max_packet, self._max_topic = limits.max_packet_bytes, limits.max_topic_bytes

    def note_limit(self, reason: str) -> None:
        """A [limits] value was hit: counted every time, audited once per connection."""
        if self.hub is None or self.session is None:
            return
        runtime = self.hub.hub_runtime
        runtime.metrics.limit_hit(reason)
        if reason not in self._limits_noted:
            self._limits_noted += (reason,)
            audit_session(runtime, self.session, "limit", reason)

    def deny_sys(self, topic: str) -> None:
        """A PUBLISH to a ``$`` topic, closed to devices: on the record like any ACL refusal
        (it used to close the connection without one). The caller closes."""
        log.info("%s published to %s; closing", self._client_id, topic)
        if self.hub is not None and self.session is not None:
            self.hub.hub_runtime.metrics.acl_denied("publish")
            audit_session(self.hub.hub_runtime, self.session, "acl-deny", f"publish {topic}")

    def _new_budget(self, hub: Any) -> PublishBudget:
        """The device's publish budget (per device: a reconnect does not refill it)."""
        identity = getattr(self.session.attributes.get(_DECISION), "identity", None)
        device = identity.device_id if identity is not None else self._client_id
        self._budget = hub.publish_budgets.get(device, self._loop.time())
        return self._budget

    def _rate_limited(self, packet_id: int | None) -> bool:
        """Over publish_rate or publish_bytes_rate: False to close ("disconnect"), else the
        message is dropped, a QoS 1 one still acknowledged (MQTT 3.1.1 has no negative
        PUBACK; without it a well-behaved device would resend it for ever)."""
        self.note_limit("rate-limited")
        if self.hub.hub_runtime.config.limits.on_rate_limit == "disconnect":
            log.info("%s: over its publish rate; closing", self._client_id)
            return False
        if packet_id is not None:
            self.writer.write(puback(packet_id))
        return True

    def limit_qos2(self, topic: str, payload_size: int) -> bool | None:
        """[limits] for a QoS 2 message at delivery (after PUBREL): True to route it, False
        to drop it, None to close the connection."""
        if self.hub is None:
            return True
        topic_size = len(topic.encode())
        if topic_size > self._max_topic:
            self.note_limit("topic-too-long")
            return None
        budget = self._budget or self._new_budget(self.hub)
        budget.refill(self._loop.time())
        if budget.take(topic_size + 4 + payload_size):  # its remaining length
            return True
        return False if self._rate_limited(None) else None

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference while it runs (and cancel it with the connection), not after."""
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
