"""The packets other than a QoS 0/1 PUBLISH, for :class:`hub.broker.handler.HubHandler`.

SUBSCRIBE, UNSUBSCRIBE, QoS 2 PUBLISH and PUBREL, the acknowledgements of the hub's own
deliveries, PINGREQ and DISCONNECT: each checked to the letter on bytes, then handed to
amqtt's queues or the session's outbox. Off the hot path: the reader calls this layer only for
a packet that is not an inline PUBLISH. Moved out of handler.py whole, unchanged.
"""

from __future__ import annotations

import asyncio
import logging

from amqtt.adapters import BufferReader
from amqtt.mqtt import packet_class
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
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage

from hub.broker.checks import DENIED, CheckedHandler
from hub.errors import MalformedPacketError
from hub.wire import (
    PUBLISH,
    ack,
    check_flags,
    next_packet,
    packet_name,
    parse_packet_id,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    topic_problem,
)

__all__ = ["PINGRESP", "ControlHandler"]

log = logging.getLogger("hub.handler")

PINGRESP = b"\xd0\x00"


class ControlHandler(CheckedHandler):
    """The layer of the hub's handler that takes every packet but a QoS 0/1 PUBLISH."""

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
            if topic is DENIED:  # acknowledged all the same, never delivered
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
        if problem is not None and not _sys_topic(raw) and len(raw) <= self._max_topic:
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


def _sys_topic(raw: bytes) -> bool:
    """A ``$`` topic that decodes: audited as an ACL denial already (a ``$`` topic that is not
    UTF-8 never got that far and is a violation)."""
    if raw[:1] != b"$":
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
