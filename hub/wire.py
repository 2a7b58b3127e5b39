"""MQTT 3.1.1 framing on plain bytes: split a read buffer into packets, read and write PUBLISH.

amqtt reads every packet through several awaits (one per header byte) and builds objects for
it; at tens of thousands of messages a second that is the broker. The hub's reader takes
whatever TLS handed over, cuts it into packets here, and handles PUBLISH without objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.errors import MalformedPacketError

PUBLISH = 3
MAX_REMAINING = 268_435_455  # four length bytes [MQTT-2.2.3]


def remaining_length(n: int) -> bytes:
    """The variable-length encoding of *n* [MQTT-2.2.3]."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def next_packet(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, body end) of the packet at *pos*, None while incomplete."""
    n = len(buf)
    i = pos + 1
    length = 0
    shift = 0
    while True:
        if i >= n:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise MalformedPacketError("remaining length longer than four bytes")
    end = i + length
    if end > n:
        return None
    return buf[pos], i, end


@dataclass(frozen=True, slots=True)
class Publish:
    """A received PUBLISH: topic still as bytes (decoded once per topic by the caller)."""

    topic: bytes
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


def parse_publish(first: int, buf: bytes | bytearray, start: int, end: int) -> Publish:
    """The PUBLISH whose body is ``buf[start:end]``; raises MalformedPacketError."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacketError("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    if end - start < 2:
        raise MalformedPacketError("PUBLISH without a topic")
    topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if topic_end > end:
        raise MalformedPacketError("PUBLISH topic longer than the packet")
    topic = bytes(buf[start + 2:topic_end])
    packet_id = None
    if qos:
        if topic_end + 2 > end:
            raise MalformedPacketError("PUBLISH without a packet identifier")
        packet_id = (buf[topic_end] << 8) | buf[topic_end + 1]
        if packet_id == 0:
            raise MalformedPacketError("PUBLISH with packet identifier 0")  # [MQTT-2.3.1-1]
        topic_end += 2
    return Publish(topic, bytes(buf[topic_end:end]), qos, bool(first & 1), bool(first & 8),
                   packet_id)


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int | None = None,
                   *, retain: bool = False, dup: bool = False) -> bytes:
    """A PUBLISH on the wire (DUP only makes sense with QoS > 0 [MQTT-3.3.1-2])."""
    first = 0x30 | (qos << 1) | (0x08 if dup and qos else 0) | (0x01 if retain else 0)
    ident = packet_id.to_bytes(2, "big") if qos and packet_id is not None else b""
    body_len = 2 + len(topic) + len(ident) + len(payload)
    if body_len > MAX_REMAINING:
        raise MalformedPacketError("PUBLISH too large")
    return b"".join((bytes((first,)), remaining_length(body_len), len(topic).to_bytes(2, "big"),
                     topic, ident, payload))


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")
