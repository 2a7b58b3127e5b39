"""MQTT 3.1.1 client-to-server packets as raw bytes: a grammar, mutators and the fuzz oracle.

The grammar builds what a device may send (CONNECT with or without a will, PUBLISH at QoS
0/1/2, the acknowledgements, SUBSCRIBE/UNSUBSCRIBE with 1-n filters, PINGREQ, DISCONNECT) by
hand, not with paho, so a field can be wrong on purpose. A mutation may still yield a valid
stream (a bit flip in a payload, a duplicated PUBLISH), so the expectation for a connection
comes from :func:`judge`, a small validator of the client-to-server rules of MQTT 3.1.1, never
from the fact that a mutation was applied.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hub.wire import remaining_length

# Verdict outcomes: what the hub must do with the whole byte stream.
#   open    - every packet is valid and complete: the connection stays up (answers PINGREQ)
#   close   - the hub must close the connection (protocol violation, limit, refusal, DISCONNECT)
#   pending - valid so far, the stream ends inside a packet: the hub waits for more bytes
#   either  - the spec leaves the server a choice (MAY close, SHOULD NOT): no expectation
Outcome = Literal["open", "close", "pending", "either"]
# Why a stream closes: violation/limit must be audited as such; refused (CONNACK != 0) and
# disconnect (the client's DISCONNECT) are ordinary ends.
Kind = Literal["", "violation", "limit", "refused", "disconnect"]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
# Fixed-header flags a client must send [MQTT-2.2.2-1/2]: 0 except PUBLISH (free) and these.
_FLAGS_TWO = {PUBREL, SUBSCRIBE, UNSUBSCRIBE}
_CONTROL = re.compile("[\x01-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff]")


@dataclass(frozen=True)
class Limits:
    """The hub's [limits] the oracle needs (sizes in bytes)."""

    max_packet_bytes: int
    max_topic_bytes: int


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    kind: Kind = ""
    reason: str = ""


def string(value: bytes) -> bytes:
    """A length-prefixed field (UTF-8 string or binary data) [MQTT-1.5.3]."""
    return len(value).to_bytes(2, "big") + value


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + remaining_length(len(body)) + body


def connect(client_id: bytes, *, clean: bool = True, keepalive: int = 0,
            will: tuple[bytes, bytes, int, bool] | None = None, username: bytes | None = None,
            password: bytes | None = None, level: int = 4, name: bytes = b"MQTT",
            reserved: bool = False) -> bytes:
    flags = (0x02 if clean else 0) | (0x01 if reserved else 0)
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    head = string(name) + bytes((level, flags)) + keepalive.to_bytes(2, "big")
    return frame(0x10, head + payload)


def publish(topic: bytes, payload: bytes = b"", qos: int = 0, packet_id: int = 1, *,
            retain: bool = False, dup: bool = False) -> bytes:
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    ident = packet_id.to_bytes(2, "big") if qos else b""
    return frame(first, string(topic) + ident + payload)


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0010) or PUBCOMP."""
    return frame((kind << 4) | (2 if kind == PUBREL else 0), packet_id.to_bytes(2, "big"))


def subscribe(packet_id: int, filters: Sequence[tuple[bytes, int]], flags: int = 2) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(string(f) + bytes((q,)) for f, q in filters)
    return frame(0x80 | flags, body)


def unsubscribe(packet_id: int, filters: Sequence[bytes], flags: int = 2) -> bytes:
    return frame(0xA0 | flags, packet_id.to_bytes(2, "big") + b"".join(map(string, filters)))


PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"


# -- the oracle ---------------------------------------------------------------------------------

class _Stop(Exception):  # noqa: N818 - control flow inside judge(), never escapes
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


def _violation(reason: str) -> _Stop:
    return _Stop(Verdict("close", "violation", reason))


def _either(reason: str) -> _Stop:
    return _Stop(Verdict("either", "", reason))


class _Body:
    """A cursor over one packet's variable header and payload."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field_name: str) -> bytes:
        if self.left() < n:
            raise _violation(f"{self.what}: {field_name} runs past the remaining length")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self, field_name: str) -> int:
        return int.from_bytes(self.take(2, field_name), "big")

    def binary(self, field_name: str) -> bytes:
        return self.take(self.u16(field_name), field_name)

    def text(self, field_name: str) -> str:
        """A UTF-8 string: ill-formed or with U+0000 is a violation [MQTT-1.5.3-1/2]."""
        raw = self.binary(field_name)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _violation(f"{self.what}: {field_name} is not UTF-8 [MQTT-1.5.3-1]") from None
        if "\x00" in value:
            raise _violation(f"{self.what}: {field_name} holds U+0000 [MQTT-1.5.3-2]")
        return value


def _soft(value: str, what: str) -> None:
    """Control characters and non-characters: the server MAY close [MQTT-1.5.3]."""
    if _CONTROL.search(value):
        raise _either(f"{what} holds a control character or non-character")


def _valid_filter(value: str) -> bool:
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _own(device_id: str, topic: str) -> bool:
    """What ``devices/{device_id}/#`` allows a device to publish."""
    prefix = f"devices/{device_id}"
    return topic == prefix or topic.startswith(prefix + "/")


@dataclass
class _State:
    device_id: str
    limits: Limits
    connected: bool = False
    short_keepalive: bool = False


def judge(stream: bytes, device_id: str, limits: Limits) -> Verdict:
    """What the hub must do with *stream*, sent by *device_id* after the TLS handshake."""
    state = _State(device_id, limits)
    pos = 0
    try:
        while pos < len(stream):
            pos = _one(stream, pos, state)
    except _Stop as stop:
        return stop.verdict
    if not state.connected:
        return Verdict("pending", "", "no complete CONNECT")
    if state.short_keepalive:
        return Verdict("either", "", "keep-alive under 10 s may expire during the check")
    return Verdict("open")


def _header(stream: bytes, pos: int, state: _State) -> tuple[int, int]:
    """Where the body of the packet at *pos* starts and ends; a verdict if the header
    decides."""
    length, shift, i = 0, 0, pos + 1
    while True:
        if i >= len(stream):
            raise _Stop(Verdict("pending", "", "stream ends inside a remaining length"))
        byte = stream[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise _violation("remaining length longer than four bytes [MQTT-2.2.3]")
    if i - pos > 2 and stream[i - 1] == 0:
        raise _either("remaining length not in its shortest encoding")
    limit = state.limits.max_packet_bytes
    if length > limit:
        raise _Stop(Verdict("close", "limit", f"packet of {length} bytes over max_packet_bytes"))
    if length > limit - 5 and length + (i - pos) > limit:
        raise _either("packet size at max_packet_bytes (header counted or not)")
    if i + length > len(stream):
        raise _Stop(Verdict("pending", "", "stream ends inside a packet"))
    return i, i + length


def _one(stream: bytes, pos: int, state: _State) -> int:
    """Judge the packet at *pos*; the position after it."""
    first = stream[pos]
    i, end = _header(stream, pos, state)
    kind, flags = first >> 4, first & 0x0F
    body = _Body(stream[i:end], _NAMES.get(kind, f"type {kind}"))
    if not state.connected and kind != CONNECT:
        raise _violation(f"{body.what} before CONNECT [MQTT-3.1.0-1]")
    if kind == CONNECT and state.connected:
        raise _violation("a second CONNECT [MQTT-3.1.0-2]")
    if kind != PUBLISH and flags != (2 if kind in _FLAGS_TWO else 0):
        raise _violation(f"{body.what} with fixed-header flags {flags:04b} [MQTT-2.2.2-2]")
    check = _CHECKS.get(kind)
    if check is None:
        raise _violation(f"{body.what}: a packet a client may not send [MQTT-4.8.0-1]")
    check(body, flags, state)
    if body.left():
        raise _violation(f"{body.what}: {body.left()} bytes past its last field")
    return end


def _connect_header(body: _Body) -> tuple[int, int]:
    """Protocol name, level, flags [MQTT-3.1.2]: (connect flags, keep-alive)."""
    name = body.binary("protocol name")
    if name != b"MQTT":
        if name == b"MQIsdp":
            raise _either("MQTT 3.1 protocol name: the server may speak 3.1")
        raise _violation(f"CONNECT protocol name {name!r} [MQTT-3.1.2-1]")
    level = body.take(1, "protocol level")[0]
    if level != 4:
        raise _Stop(Verdict("close", "refused", f"protocol level {level}: CONNACK 1 "
                                                "[MQTT-3.1.2-2]"))
    flags = body.take(1, "connect flags")[0]
    keepalive = body.u16("keep alive")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    if flags & 0x01:
        raise _violation("CONNECT reserved flag set [MQTT-3.1.2-3]")
    if not will and (will_qos or will_retain):
        raise _violation("will QoS/retain without a will [MQTT-3.1.2-11/13/15]")
    if will_qos == 3:
        raise _violation("will QoS 3 [MQTT-3.1.2-14]")
    if flags & 0x40 and not flags & 0x80:
        raise _violation("password without user name [MQTT-3.1.2-22]")
    return flags, keepalive


def _connect(body: _Body, _flags: int, state: _State) -> None:
    flags, keepalive = _connect_header(body)
    client_id = body.text("client id")
    problems: list[_Stop] = []
    if flags & 0x04:
        topic = body.text("will topic")
        body.binary("will message")
        if not topic or "+" in topic or "#" in topic:
            problems.append(_Stop(Verdict("close", "refused", "will topic not a topic name")))
        elif len(topic.encode()) > state.limits.max_topic_bytes:
            problems.append(_either("will topic over max_topic_bytes"))
        elif not _own(state.device_id, topic) or topic.startswith("$"):
            problems.append(_Stop(Verdict("close", "refused", "will-denied")))
        else:
            try:
                _soft(topic, "will topic")
            except _Stop as stop:
                problems.append(stop)
    if flags & 0x80:
        user = body.text("user name")
        try:
            _soft(user, "user name")
        except _Stop as stop:
            problems.append(stop)
    if flags & 0x40:
        body.binary("password")
    if body.left():
        raise _violation(f"CONNECT: {body.left()} bytes past its last field")
    if client_id != state.device_id:
        raise _Stop(Verdict("close", "refused", "client-id-mismatch"))
    refusals = [p for p in problems if p.verdict.outcome == "close"]
    if refusals or problems:
        raise (refusals or problems)[0]
    state.connected = True
    state.short_keepalive = 0 < keepalive < 10


def _topic_name(body: _Body, state: _State) -> str:
    topic = body.text("topic")
    if not topic:
        raise _violation("PUBLISH with an empty topic [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise _violation("PUBLISH topic with a wildcard [MQTT-3.3.2-2]")
    if len(topic.encode()) > state.limits.max_topic_bytes:
        raise _Stop(Verdict("close", "limit", "topic over max_topic_bytes"))
    if topic.startswith("$"):  # the hub's rule, not MQTT's: audited as acl-deny
        raise _Stop(Verdict("close", "refused", "PUBLISH to a $ topic: closed to devices"))
    _soft(topic, "topic")
    return topic


def _publish(body: _Body, flags: int, state: _State) -> None:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise _violation("PUBLISH QoS 3 [MQTT-3.3.1-4]")
    if flags & 0x08 and qos == 0:
        raise _violation("PUBLISH DUP with QoS 0 [MQTT-3.3.1-2]")
    _topic_name(body, state)
    if qos and body.u16("packet identifier") == 0:
        raise _violation("PUBLISH packet identifier 0 [MQTT-2.3.1-1]")
    body.take(body.left(), "payload")


def _ack(body: _Body, _flags: int, _state: _State) -> None:
    if body.left() != 2:
        raise _violation(f"{body.what} remaining length {body.left()}, want 2")
    if body.u16("packet identifier") == 0:
        raise _either(f"{body.what} for packet identifier 0 (matches nothing)")


def _filters(body: _Body, with_qos: bool, state: _State) -> None:
    if body.u16("packet identifier") == 0:
        raise _violation(f"{body.what} packet identifier 0 [MQTT-2.3.1-1]")
    if not body.left():
        raise _violation(f"{body.what} without a topic filter [MQTT-3.8.3-3, 3.10.3-2]")
    soft: list[_Stop] = []
    while body.left():
        value = body.text("topic filter")
        if not value:
            raise _violation(f"{body.what}: empty topic filter [MQTT-4.7.3-1]")
        if with_qos:
            qos = body.take(1, "requested QoS")[0]
            if qos > 2:
                raise _violation(f"SUBSCRIBE requested QoS byte {qos:#04x} [MQTT-3-8.3-4]")
        try:
            _soft(value, "topic filter")
            if not _valid_filter(value):
                raise _either("misplaced wildcard: SUBACK 0x80 or a close")
            if len(value.encode()) > state.limits.max_topic_bytes:
                raise _either("topic filter over max_topic_bytes: SUBACK 0x80 or a close")
        except _Stop as stop:
            soft.append(stop)
    if soft:
        raise soft[0]


def _subscribe(body: _Body, _flags: int, state: _State) -> None:
    _filters(body, True, state)


def _unsubscribe(body: _Body, _flags: int, state: _State) -> None:
    _filters(body, False, state)


def _empty(body: _Body, _flags: int, _state: _State) -> None:
    if body.left():
        raise _violation(f"{body.what} with a body of {body.left()} bytes")


def _disconnect(body: _Body, flags: int, state: _State) -> None:
    _empty(body, flags, state)
    raise _Stop(Verdict("close", "disconnect", "DISCONNECT: nothing after it is read "
                                               "[MQTT-3.14.4-1]"))


_NAMES = {CONNECT: "CONNECT", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
          PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
          UNSUBSCRIBE: "UNSUBSCRIBE", PINGREQ: "PINGREQ", DISCONNECT: "DISCONNECT",
          CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}
_CHECKS: dict[int, Callable[[_Body, int, _State], None]] = {
    CONNECT: _connect, PUBLISH: _publish, PUBACK: _ack, PUBREC: _ack, PUBREL: _ack,
    PUBCOMP: _ack, SUBSCRIBE: _subscribe, UNSUBSCRIBE: _unsubscribe, PINGREQ: _empty,
    DISCONNECT: _disconnect,
}


# -- the grammar and its mutators --------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One fuzz connection: the packets as built, the writes as sent, and what was done."""

    device_id: str
    packets: tuple[bytes, ...]
    writes: tuple[bytes, ...]
    mutations: tuple[str, ...]
    ending: Literal["close", "reset", "disconnect"]
    probe: bool = True  # False: vanish without reading anything (the flood)

    @property
    def stream(self) -> bytes:
        return b"".join(self.writes)


@dataclass
class Grammar:
    """Well-formed packets for one device, its own topics and forbidden ones."""

    device_id: str
    limits: Limits
    foreign: Sequence[str] = ()  # other devices' namespaces: publish and subscribe refused
    rng: random.Random = field(default_factory=random.Random)

    def own_topic(self) -> bytes:
        leaf = self.rng.choice(["telemetry", "state", "cmd/ack", "a/b/c", "x"])
        return f"devices/{self.device_id}/{leaf}".encode()

    def foreign_topic(self) -> bytes:
        other = self.rng.choice([*self.foreign, "ghost"])
        return self.rng.choice([f"devices/{other}/cmd", "fleet/broadcast/fuzz",
                                "fleet/broadcast/fuzz/x", "other/topic", "$SYS/broker/load",
                                "devices", f"devices/{self.device_id}x/t"]).encode()

    def own_filter(self) -> bytes:
        d = self.device_id
        return self.rng.choice([f"devices/{d}/#", f"devices/{d}/+", f"devices/{d}/+/ack",
                                f"devices/{d}/telemetry", "fleet/broadcast/#"]).encode()

    def foreign_filter(self) -> bytes:
        other = self.rng.choice([*self.foreign, "ghost"])
        return self.rng.choice(["#", "+/+", "devices/+/telemetry", "$SYS/#", "+",
                                f"devices/{other}/#", "devices/#"]).encode()

    def packet_id(self) -> int:
        return self.rng.randint(1, 65535)

    def payload(self) -> bytes:
        n = self.rng.choice([0, 1, 16, 100, 700])
        return self.rng.randbytes(n)

    def connect(self) -> bytes:
        r = self.rng
        will = None
        if r.random() < 0.3:
            topic = self.own_topic() if r.random() < 0.8 else self.foreign_topic()
            will = (topic, self.payload(), r.randint(0, 2), r.random() < 0.3)
        user = b"user" if r.random() < 0.2 else None
        password = b"secret" if user is not None and r.random() < 0.5 else None
        return connect(self.device_id.encode(), clean=r.random() < 0.8,
                       keepalive=r.choice([0, 30, 60, 600]), will=will, username=user,
                       password=password)

    def publish(self) -> list[bytes]:
        r = self.rng
        qos = r.choice([0, 0, 1, 1, 2])
        topic = self.own_topic() if r.random() < 0.75 else self.foreign_topic()
        pid = self.packet_id()
        out = [publish(topic, self.payload(), qos, pid, retain=r.random() < 0.2,
                       dup=qos > 0 and r.random() < 0.2)]
        if qos == 2 and r.random() < 0.7:
            out.append(ack(PUBREL, pid))
        return out

    def subscribe(self) -> bytes:
        r = self.rng
        filters = [(self.own_filter() if r.random() < 0.6 else self.foreign_filter(),
                    r.randint(0, 2)) for _ in range(r.randint(1, 4))]
        return subscribe(self.packet_id(), filters)

    def unsubscribe(self) -> bytes:
        r = self.rng
        return unsubscribe(self.packet_id(), [self.own_filter() if r.random() < 0.6
                                              else self.foreign_filter()
                                              for _ in range(r.randint(1, 3))])

    def any_packet(self) -> list[bytes]:
        r = self.rng
        pick = r.random()
        if pick < 0.4:
            return self.publish()
        if pick < 0.6:
            return [self.subscribe()]
        if pick < 0.7:
            return [self.unsubscribe()]
        if pick < 0.85:
            return [ack(r.choice([PUBACK, PUBREC, PUBREL, PUBCOMP]), self.packet_id())]
        return [PINGREQ_PACKET]

    def session(self) -> list[bytes]:
        """CONNECT, then 1-8 packets, sometimes a DISCONNECT."""
        packets = [self.connect()]
        for _ in range(self.rng.randint(1, 8)):
            packets += self.any_packet()
        return packets

    def flood(self) -> list[bytes]:
        """Subscribe to itself and publish ~75 KB to itself: the hub writes to a peer that is
        about to vanish without reading."""
        own = f"devices/{self.device_id}/flood".encode()
        packets = [connect(self.device_id.encode()), subscribe(1, [(own, 0)])]
        packets += [publish(own, bytes(1500)) for _ in range(50)]
        return packets

    # -- mutations: each takes the packet list and returns it changed -------------------------

    def mutate(self, packets: list[bytes]) -> tuple[list[bytes], str]:
        name, mutator = self.rng.choice(_MUTATORS)
        return mutator(self, packets), name

    def _at(self, packets: list[bytes], *, after_connect: bool = True) -> int:
        return self.rng.randint(1 if after_connect and len(packets) > 1 else 0, len(packets) - 1)

    def _insert(self, packets: list[bytes], packet: bytes) -> list[bytes]:
        at = self.rng.randint(1, len(packets))
        return [*packets[:at], packet, *packets[at:]]

    def flip_bits(self, packets: list[bytes]) -> list[bytes]:
        i = self._at(packets, after_connect=self.rng.random() < 0.7)
        data = bytearray(packets[i])
        for _ in range(self.rng.randint(1, 3)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        packets[i] = bytes(data)
        return packets

    def truncate(self, packets: list[bytes]) -> list[bytes]:
        i = self._at(packets)
        if len(packets[i]) > 1:  # keep a byte: a later mutation may look at the first one
            packets[i] = packets[i][:self.rng.randrange(1, len(packets[i]))]
        return packets

    def extend(self, packets: list[bytes]) -> list[bytes]:
        """Junk inside the packet (remaining length fixed) or after it (not fixed)."""
        i = self._at(packets, after_connect=self.rng.random() < 0.8)
        first, body = _split(packets[i])
        junk = self.rng.randbytes(self.rng.randint(1, 8))
        packets[i] = frame(first, body + junk) if self.rng.random() < 0.6 else packets[i] + junk
        return packets

    def length_field(self, packets: list[bytes]) -> list[bytes]:
        i = self._at(packets)
        first, body = _split(packets[i])
        how = self.rng.choice(["short", "long", "five", "padded", "huge"])
        if how == "short":
            head = bytes((first,)) + remaining_length(max(0, len(body) - self.rng.randint(1, 4)))
        elif how == "long":
            head = bytes((first,)) + remaining_length(len(body) + self.rng.randint(1, 4))
        elif how == "five":
            head = bytes((first,)) + b"\x80\x80\x80\x80\x01"
        elif how == "padded":  # the right value in a longer encoding
            head = bytes((first,)) + bytes(b | 0x80 for b in remaining_length(len(body))) + b"\x00"
        else:
            head = bytes((first,)) + remaining_length(self.rng.choice([10**5, 2**21, 268_435_455]))
        packets[i] = head + body
        return packets

    def fixed_flags(self, packets: list[bytes]) -> list[bytes]:
        i = self._at(packets, after_connect=self.rng.random() < 0.8)
        data = bytearray(packets[i])
        data[0] = (data[0] & 0xF0) | self.rng.randrange(16)
        packets[i] = bytes(data)
        return packets

    def qos3(self, packets: list[bytes]) -> list[bytes]:
        r = self.rng
        bad = r.choice([
            frame(0x36, string(self.own_topic()) + b"\x00\x07" + b"x"),
            subscribe(self.packet_id(), [(self.own_filter(), 3)]),
            subscribe(self.packet_id(), [(self.own_filter(), r.choice([0x40, 0x81, 0xFF]))]),
        ])
        if r.random() < 0.3:  # will QoS 3 in the CONNECT itself
            data = bytearray(packets[0])
            _, body = _split(packets[0])
            flags_at = len(packets[0]) - len(body) + 7
            if data[0] == 0x10 and flags_at < len(data):
                data[flags_at] |= 0x18
                packets[0] = bytes(data)
                return packets
        return self._insert(packets, bad)

    def packet_id_zero(self, packets: list[bytes]) -> list[bytes]:
        return self._insert(packets, self.rng.choice([
            publish(self.own_topic(), b"p", 1, 0), publish(self.own_topic(), b"p", 2, 0),
            subscribe(0, [(self.own_filter(), 1)]), unsubscribe(0, [self.own_filter()]),
            ack(PUBACK, 0), ack(PUBREL, 0)]))

    def empty_topic(self, packets: list[bytes]) -> list[bytes]:
        return self._insert(packets, self.rng.choice([
            publish(b"", b"p"), publish(b"", b"p", 1, 9),
            subscribe(self.packet_id(), [(b"", 0)]), unsubscribe(self.packet_id(), [b""]),
            subscribe(self.packet_id(), []), unsubscribe(self.packet_id(), [])]))

    def bad_utf8(self, packets: list[bytes]) -> list[bytes]:
        junk = self.rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x00"])
        topic = f"devices/{self.device_id}/".encode() + junk
        packet = self.rng.choice([publish(topic, b"p"), subscribe(self.packet_id(), [(topic, 0)]),
                                  unsubscribe(self.packet_id(), [topic])])
        if self.rng.random() < 0.3:
            return [connect(self.device_id.encode() + junk), *packets[1:]]
        return self._insert(packets, packet)

    def wildcard_publish(self, packets: list[bytes]) -> list[bytes]:
        d = self.device_id
        topic = self.rng.choice([f"devices/{d}/#", f"devices/{d}/+/x", "#", "+", f"devices/{d}+"])
        return self._insert(packets, publish(topic.encode(), b"w", self.rng.randint(0, 2), 5))

    def duplicate(self, packets: list[bytes]) -> list[bytes]:
        i = self._at(packets, after_connect=self.rng.random() < 0.7)
        return [*packets[:i + 1], packets[i], *packets[i + 1:]]

    def second_connect(self, packets: list[bytes]) -> list[bytes]:
        return self._insert(packets, self.connect())

    def before_connect(self, packets: list[bytes]) -> list[bytes]:
        extra = self.any_packet()
        if self.rng.random() < 0.5:
            return [*extra, *packets]
        return [*extra, *packets[1:]]  # no CONNECT at all

    def too_large(self, packets: list[bytes]) -> list[bytes]:
        size = self.limits.max_packet_bytes + self.rng.randint(16, 4096)
        return self._insert(packets, publish(self.own_topic(), bytes(size), self.rng.randint(0, 1)))

    def long_topic(self, packets: list[bytes]) -> list[bytes]:
        n = self.limits.max_topic_bytes + self.rng.randint(1, 40)
        topic = (f"devices/{self.device_id}/" + "t" * n).encode()
        return self._insert(packets, publish(topic, b"l", self.rng.randint(0, 1), 3))

    def server_type(self, packets: list[bytes]) -> list[bytes]:
        first = self.rng.choice([0x00, 0xF0, 0x20, 0x90, 0xB0, 0xD0])
        return self._insert(packets, frame(first, self.rng.randbytes(self.rng.choice([0, 2, 4]))))

    def split(self, stream: bytes) -> list[bytes]:
        """Writes cut at random byte boundaries (each write is its own TLS record)."""
        r = self.rng
        how = r.random()
        if how < 0.35 or len(stream) < 2:
            return [stream]
        if how < 0.45 and len(stream) <= 96:
            return [stream[i:i + 1] for i in range(len(stream))]
        cuts = sorted(r.sample(range(1, len(stream)), min(len(stream) - 1, r.randint(1, 8))))
        return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    def case(self) -> Case:
        """A session, then mutated 0-2 times (15% stay valid), split into writes."""
        r = self.rng
        if r.random() < 0.05:
            packets, mutations = self.flood(), ["flood"]
        else:
            packets, mutations = self.session(), []
            for _ in range(0 if r.random() < 0.15 else r.choice([1, 1, 1, 2])):
                packets, name = self.mutate(packets)
                mutations.append(name)
        stream = b"".join(packets)
        ending: Literal["close", "reset", "disconnect"] = r.choice(
            ["close", "reset", "disconnect"])
        flood = mutations == ["flood"]
        return Case(self.device_id, tuple(packets), tuple(self.split(stream)), tuple(mutations),
                    "reset" if flood else ending, probe=not flood)


def _split(packet: bytes) -> tuple[int, bytes]:
    """(first byte, body) of a well-formed packet; the body is what follows the length."""
    i = 1
    while i < len(packet) and packet[i] & 0x80:
        i += 1
    return packet[0], packet[i + 1:]


_MUTATORS: list[tuple[str, Callable[[Grammar, list[bytes]], list[bytes]]]] = [
    ("flip_bits", Grammar.flip_bits), ("flip_bits", Grammar.flip_bits),
    ("truncate", Grammar.truncate), ("extend", Grammar.extend),
    ("remaining_length", Grammar.length_field), ("fixed_flags", Grammar.fixed_flags),
    ("qos3", Grammar.qos3), ("packet_id_zero", Grammar.packet_id_zero),
    ("empty_topic", Grammar.empty_topic), ("bad_utf8", Grammar.bad_utf8),
    ("wildcard_publish", Grammar.wildcard_publish), ("duplicate", Grammar.duplicate),
    ("second_connect", Grammar.second_connect), ("before_connect", Grammar.before_connect),
    ("too_large", Grammar.too_large), ("long_topic", Grammar.long_topic),
    ("server_type", Grammar.server_type),
]
