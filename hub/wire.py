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


def next_packet(buf: bytes | bytearray, pos: int,
                limit: int = MAX_REMAINING) -> tuple[int, int, int] | None:
    """(first byte, body start, body end) of the packet at *pos*, None while incomplete.

    A remaining length over *limit* raises PacketTooLargeError as soon as the length bytes
    are there, so the caller never buffers the body of a packet it will refuse.
    """
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
            raise MalformedPacketError("remaining length longer than four bytes [MQTT-4.8.0-1]")
    if length > limit:
        raise PacketTooLargeError(f"packet of {length} bytes declared, limit {limit}")
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
        raise MalformedPacketError("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
    if end - start < 2:
        raise MalformedPacketError("PUBLISH without a topic [MQTT-3.3.2-1]")
    topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if topic_end > end:
        raise MalformedPacketError("PUBLISH topic longer than the packet [MQTT-3.3.2-1]")
    topic = bytes(buf[start + 2:topic_end])
    packet_id = None
    if qos:
        if topic_end + 2 > end:
            raise MalformedPacketError("PUBLISH without a packet identifier [MQTT-2.3.1-1]")
        packet_id = (buf[topic_end] << 8) | buf[topic_end + 1]
        if packet_id == 0:
            raise MalformedPacketError("PUBLISH with packet identifier 0 [MQTT-2.3.1-1]")
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


# -- the packets a client sends besides PUBLISH: strict, within their remaining length ----------

CONNECT_FLAGS_RESERVED = 0x01
PROTOCOL_LEVEL = 4  # MQTT 3.1.1
_PACKET_NAMES = ("reserved type 0", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC",
                 "PUBREL", "PUBCOMP", "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK",
                 "PINGREQ", "PINGRESP", "DISCONNECT", "reserved type 15")


class PacketTooLargeError(MalformedPacketError):
    """A packet declares more bytes than ``[limits] max_packet_bytes``: a limit, not a
    violation (audited as ``limit packet-too-large``)."""


def packet_name(kind: int) -> str:
    return _PACKET_NAMES[kind & 0x0F]


@dataclass(frozen=True, slots=True)
class Connect:
    """A CONNECT as the client sent it [MQTT-3.1]; ``level`` other than 4 leaves the rest
    unread (the answer is CONNACK 0x01 whatever follows [MQTT-3.1.2-2])."""

    level: int
    clean_session: bool = True
    keep_alive: int = 0
    client_id: str = ""
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    username: str | None = None
    password: bytes | None = None


class _Fields:
    """Reads length-prefixed fields off one packet's body, never past its end."""

    __slots__ = ("_body", "_pos", "_what")

    def __init__(self, body: bytes, pos: int, what: str) -> None:
        self._body, self._pos, self._what = body, pos, what

    @property
    def left(self) -> int:
        return len(self._body) - self._pos

    def u16(self, field: str, statement: str) -> int:
        if self.left < 2:
            raise MalformedPacketError(f"{self._what} ends inside its {field} {statement}")
        value = (self._body[self._pos] << 8) | self._body[self._pos + 1]
        self._pos += 2
        return value

    def data(self, field: str, statement: str) -> bytes:
        size = self.u16(field, statement)
        if size > self.left:
            raise MalformedPacketError(f"{self._what} {field} runs past the packet's remaining "
                                       f"length {statement}")
        value = self._body[self._pos:self._pos + size]
        self._pos += size
        return value

    def text(self, field: str, statement: str) -> str:
        raw = self.data(field, statement)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacketError(f"{self._what} {field} is not UTF-8 "
                                       "[MQTT-1.5.3-1]") from None
        if "\x00" in value:
            raise MalformedPacketError(f"{self._what} {field} contains U+0000 [MQTT-1.5.3-2]")
        return value

    def byte(self, field: str, statement: str) -> int:
        if self.left < 1:
            raise MalformedPacketError(f"{self._what} ends before its {field} {statement}")
        value = self._body[self._pos]
        self._pos += 1
        return value


def parse_connect(first: int, body: bytes) -> Connect:
    """The CONNECT whose remaining-length bytes are *body*; raises MalformedPacketError.

    Every field is read within *body*: a field that runs past it, or bytes left after the
    last field the flags announce, make the packet malformed [MQTT-3.1.3-1] (stock amqtt read
    on into the next packet, or left the extra bytes to be taken as one).
    """
    if first & 0x0F:
        raise MalformedPacketError(f"CONNECT with fixed-header flags {first & 0x0F:#x}, want "
                                   "0x0 [MQTT-2.2.2-2]")
    fields = _Fields(body, 0, "CONNECT")
    name = fields.data("protocol name", "[MQTT-3.1.2-1]")
    if name != b"MQTT":
        raise MalformedPacketError(f"CONNECT protocol name {name!r}, want 'MQTT' "
                                   "[MQTT-3.1.2-1]")
    level = fields.byte("protocol level", "[MQTT-3.1.2-2]")
    if level != PROTOCOL_LEVEL:
        return Connect(level)
    flags = fields.byte("connect flags", "[MQTT-3.1.2-3]")
    if flags & CONNECT_FLAGS_RESERVED:
        raise MalformedPacketError("CONNECT reserved flag is 1 [MQTT-3.1.2-3]")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    if not will and will_qos:
        raise MalformedPacketError(f"CONNECT will QoS {will_qos} without the will flag "
                                   "[MQTT-3.1.2-13]")
    if not will and will_retain:
        raise MalformedPacketError("CONNECT will retain without the will flag [MQTT-3.1.2-15]")
    if will_qos == 3:
        raise MalformedPacketError("CONNECT will QoS 3 [MQTT-3.1.2-14]")
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if has_password and not has_user:
        raise MalformedPacketError("CONNECT password flag without the user name flag "
                                   "[MQTT-3.1.2-22]")
    keep_alive = fields.u16("keep alive", "[MQTT-3.1.2-24]")
    client_id = fields.text("client identifier", "[MQTT-3.1.3-3]")
    will_topic = fields.text("will topic", "[MQTT-3.1.3-10]") if will else None
    will_message = fields.data("will message", "[MQTT-3.1.3-1]") if will else None
    username = fields.text("user name", "[MQTT-3.1.3-11]") if has_user else None
    password = fields.data("password", "[MQTT-3.1.3-1]") if has_password else None
    if fields.left:
        raise MalformedPacketError(f"CONNECT has {fields.left} bytes after its last field "
                                   "[MQTT-3.1.3-1]")
    return Connect(level, bool(flags & 0x02), keep_alive, client_id, will_topic, will_message,
                   will_qos, will_retain, username, password)


def check_flags(first: int, want: int, statement: str) -> None:
    """Fixed-header flags of a packet other than PUBLISH: fixed values [MQTT-2.2.2-1]."""
    if first & 0x0F != want:
        raise MalformedPacketError(f"{packet_name(first >> 4)} with fixed-header flags "
                                   f"{first & 0x0F:#x}, want {want:#x} {statement}")


def parse_packet_id(first: int, buf: bytes | bytearray, start: int, end: int) -> int:
    """The packet identifier of a PUBACK, PUBREC, PUBREL or PUBCOMP (remaining length 2)."""
    if end - start != 2:
        raise MalformedPacketError(f"{packet_name(first >> 4)} remaining length "
                                   f"{end - start}, want 2 [MQTT-4.8.0-1]")
    return (buf[start] << 8) | buf[start + 1]


def parse_subscribe(buf: bytes, start: int, end: int) -> tuple[int, list[tuple[str, int]]]:
    """(packet id, [(filter, requested QoS)]) of a SUBSCRIBE body; flags checked by the caller."""
    fields = _Fields(bytes(buf[start:end]), 0, "SUBSCRIBE")
    packet_id = fields.u16("packet identifier", "[MQTT-2.3.1-1]")
    if packet_id == 0:
        raise MalformedPacketError("SUBSCRIBE with packet identifier 0 [MQTT-2.3.1-1]")
    topics: list[tuple[str, int]] = []
    while fields.left:
        topic_filter = fields.text("topic filter", "[MQTT-3.8.3-1]")
        if not topic_filter:
            raise MalformedPacketError("SUBSCRIBE with an empty topic filter [MQTT-4.7.3-1]")
        qos = fields.byte("requested QoS", "[MQTT-3-8.3-4]")
        if qos > 2:  # QoS 3, or a reserved bit set
            raise MalformedPacketError(f"SUBSCRIBE requested QoS byte {qos:#x}, want 0, 1 or "
                                       "2 [MQTT-3-8.3-4]")
        topics.append((topic_filter, qos))
    if not topics:
        raise MalformedPacketError("SUBSCRIBE without a topic filter [MQTT-3.8.3-3]")
    return packet_id, topics


def parse_unsubscribe(buf: bytes, start: int, end: int) -> tuple[int, list[str]]:
    """(packet id, [filter]) of an UNSUBSCRIBE body; flags checked by the caller."""
    fields = _Fields(bytes(buf[start:end]), 0, "UNSUBSCRIBE")
    packet_id = fields.u16("packet identifier", "[MQTT-2.3.1-1]")
    if packet_id == 0:
        raise MalformedPacketError("UNSUBSCRIBE with packet identifier 0 [MQTT-2.3.1-1]")
    filters: list[str] = []
    while fields.left:
        topic_filter = fields.text("topic filter", "[MQTT-3.10.3-1]")
        if not topic_filter:
            raise MalformedPacketError("UNSUBSCRIBE with an empty topic filter [MQTT-4.7.3-1]")
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacketError("UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]")
    return packet_id, filters


def topic_problem(raw: bytes) -> str | None:
    """Why *raw* is not a valid PUBLISH topic name, with its statement; None if it is."""
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "PUBLISH topic is not UTF-8 [MQTT-1.5.3-1]"
    if not topic:
        return "PUBLISH with an empty topic [MQTT-4.7.3-1]"
    if "\x00" in topic:
        return "PUBLISH topic contains U+0000 [MQTT-1.5.3-2]"
    if "+" in topic or "#" in topic:
        return "PUBLISH topic with a wildcard [MQTT-3.3.2-2]"
    return None


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK (4), PUBREC (5), PUBREL (6, flags 0b0010 [MQTT-3.6.1-1]) or PUBCOMP (7)."""
    return bytes(((kind << 4) | (2 if kind == 6 else 0), 2)) + packet_id.to_bytes(2, "big")
