"""MQTT framing on bytes: packets split at any point, PUBLISH read and written exactly."""

from __future__ import annotations

import pytest

from hub.errors import MalformedPacketError
from hub.wire import (
    Connect,
    ack,
    check_flags,
    next_packet,
    parse_connect,
    parse_packet_id,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    puback,
    publish_packet,
    remaining_length,
    topic_problem,
)


@pytest.mark.parametrize(("n", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length_matches_the_spec_table(n: int, encoded: bytes) -> None:
    """MQTT 3.1.1 §2.2.3, table 2.4."""
    assert remaining_length(n) == encoded


def test_a_stream_cut_anywhere_yields_the_same_packets() -> None:
    packets = [publish_packet(b"devices/x/t", b"p" * size, qos, 7 if qos else None)
               for size, qos in ((0, 0), (200, 1), (20_000, 0), (5, 1))]
    stream = b"".join(packets)
    for cut in range(0, len(stream), 97):
        buf = bytearray(stream[:cut])
        seen = []
        pos = 0
        for more in (stream[cut:],):
            while (frame := next_packet(buf, pos)) is not None:
                first, start, end = frame
                seen.append(parse_publish(first, buf, start, end))
                pos = end
            buf += more
        while (frame := next_packet(buf, pos)) is not None:
            first, start, end = frame
            seen.append(parse_publish(first, buf, start, end))
            pos = end
        assert pos == len(stream)
        assert [(m.topic, len(m.payload), m.qos, m.packet_id) for m in seen] == [
            (b"devices/x/t", 0, 0, None), (b"devices/x/t", 200, 1, 7),
            (b"devices/x/t", 20_000, 0, None), (b"devices/x/t", 5, 1, 7)]


def test_publish_flags_round_trip() -> None:
    raw = publish_packet(b"a/b", b"x", 1, 0x1234, retain=True, dup=True)
    assert raw == b"\x3b\x08\x00\x03a/b\x12\x34x"
    frame = next_packet(raw, 0)
    assert frame is not None
    message = parse_publish(*frame[:1], raw, *frame[1:])
    assert (message.retain, message.dup, message.packet_id) == (True, True, 0x1234)
    assert publish_packet(b"a", b"", 0, dup=True)[0] == 0x30  # no DUP at QoS 0
    assert puback(258) == b"\x40\x02\x01\x02"


@pytest.mark.parametrize(("raw", "why"), [
    (b"\x36\x04\x00\x01ax", "QoS 3"),
    (b"\x32\x05\x00\x01a\x00\x00", "identifier 0"),
    (b"\x30\x01\x00", "without a topic"),
    (b"\x30\x03\x00\x09a", "longer than the packet"),
])
def test_malformed_publish_is_refused(raw: bytes, why: str) -> None:
    frame = next_packet(raw, 0)
    assert frame is not None
    with pytest.raises(MalformedPacketError, match=why):
        parse_publish(frame[0], raw, frame[1], frame[2])


def test_five_length_bytes_are_malformed() -> None:
    with pytest.raises(MalformedPacketError):
        next_packet(b"\x30\xff\xff\xff\xff\x01", 0)


# -- CONNECT, SUBSCRIBE, UNSUBSCRIBE, acknowledgements ---------------------------------------

def _s(text: bytes) -> bytes:
    return len(text).to_bytes(2, "big") + text


def _connect_body(flags: int, payload: bytes, *, name: bytes = b"MQTT", level: int = 4) -> bytes:
    return _s(name) + bytes([level, flags]) + b"\x00\x3c" + payload


def test_a_full_connect_is_read_field_by_field() -> None:
    """Client id, will, user name and password, in the order of [MQTT-3.1.3-1]."""
    body = _connect_body(0x80 | 0x40 | 0x20 | 0x10 | 0x04,
                         _s(b"dev-1") + _s(b"devices/dev-1/will") + _s(b"\x00bye") + _s(b"u")
                         + _s(b"\xffpw"))
    connect = parse_connect(0x10, body)
    assert connect == Connect(4, False, 60, "dev-1", "devices/dev-1/will", b"\x00bye", 2, True,
                              "u", b"\xffpw")


def test_another_protocol_level_is_left_unread_for_its_connack() -> None:
    """[MQTT-3.1.2-2]: level 5 is answered CONNACK 0x01 whatever its payload looks like."""
    assert parse_connect(0x10, _connect_body(0x02, b"\x05garbage", level=5)) == Connect(5)


@pytest.mark.parametrize(("first", "body", "why"), [
    (0x11, _connect_body(0x02, _s(b"d")), r"flags 0x1, want 0x0 \[MQTT-2.2.2-2\]"),
    (0x10, _connect_body(0x02, _s(b"d"), name=b"MQIsdp"), r"\[MQTT-3.1.2-1\]"),
    (0x10, _connect_body(0x03, _s(b"d")), r"reserved flag is 1 \[MQTT-3.1.2-3\]"),
    (0x10, _connect_body(0x02 | 0x08, _s(b"d")), r"\[MQTT-3.1.2-13\]"),
    (0x10, _connect_body(0x02 | 0x20, _s(b"d")), r"\[MQTT-3.1.2-15\]"),
    (0x10, _connect_body(0x02 | 0x04 | 0x18, _s(b"d") + _s(b"t") + _s(b"m")),
     r"will QoS 3 \[MQTT-3.1.2-14\]"),
    (0x10, _connect_body(0x02 | 0x40, _s(b"d") + _s(b"p")), r"\[MQTT-3.1.2-22\]"),
    (0x10, _connect_body(0x02, _s(b"d") + b"\xc0\x00"), r"2 bytes after its last field"),
    (0x10, _connect_body(0x02, b"\x00\x09dev"), r"client identifier runs past"),
    (0x10, _connect_body(0x02 | 0x04, _s(b"d") + _s(b"t")), r"ends inside its will message"),
    (0x10, _connect_body(0x02, _s(b"\xff")), r"not UTF-8 \[MQTT-1.5.3-1\]"),
    (0x10, _connect_body(0x02, _s(b"a\x00b")), r"U\+0000 \[MQTT-1.5.3-2\]"),
    (0x10, b"\x00\x04MQ", r"protocol name runs past"),
])
def test_a_malformed_connect_is_refused_with_its_statement(first: int, body: bytes,
                                                          why: str) -> None:
    with pytest.raises(MalformedPacketError, match=why):
        parse_connect(first, body)


def test_subscribe_and_unsubscribe_are_read_within_their_length() -> None:
    body = b"\x00\x07" + _s(b"a/+") + b"\x01" + _s(b"b/#") + b"\x02"
    assert parse_subscribe(body, 0, len(body)) == (7, [("a/+", 1), ("b/#", 2)])
    body = b"\x01\x00" + _s(b"a/+") + _s(b"c")
    assert parse_unsubscribe(body, 0, len(body)) == (256, ["a/+", "c"])


@pytest.mark.parametrize(("body", "why"), [
    (b"\x00\x00" + _s(b"a") + b"\x00", r"identifier 0 \[MQTT-2.3.1-1\]"),
    (b"\x00\x01", r"without a topic filter \[MQTT-3.8.3-3\]"),
    (b"\x00\x01" + _s(b"a") + b"\x03", r"\[MQTT-3-8.3-4\]"),
    (b"\x00\x01" + _s(b"a") + b"\x41", r"\[MQTT-3-8.3-4\]"),  # a reserved bit
    (b"\x00\x01" + _s(b"a"), r"ends before its requested QoS"),
    (b"\x00\x01" + _s(b"") + b"\x00", r"empty topic filter \[MQTT-4.7.3-1\]"),
    (b"\x00", r"ends inside its packet identifier"),
])
def test_a_malformed_subscribe_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(MalformedPacketError, match=why):
        parse_subscribe(body, 0, len(body))


@pytest.mark.parametrize(("body", "why"), [
    (b"\x00\x00" + _s(b"a"), r"identifier 0 \[MQTT-2.3.1-1\]"),
    (b"\x00\x01", r"without a topic filter \[MQTT-3.10.3-2\]"),
    (b"\x00\x01" + _s(b""), r"empty topic filter \[MQTT-4.7.3-1\]"),
])
def test_a_malformed_unsubscribe_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(MalformedPacketError, match=why):
        parse_unsubscribe(body, 0, len(body))


def test_acknowledgements_and_fixed_flags() -> None:
    assert ack(4, 1) == b"\x40\x02\x00\x01"
    assert ack(6, 0x0102) == b"\x62\x02\x01\x02"  # PUBREL's flags 0010 [MQTT-3.6.1-1]
    assert parse_packet_id(0x40, b"\x40\x02\x12\x34", 2, 4) == 0x1234
    with pytest.raises(MalformedPacketError, match=r"PUBACK remaining length 3, want 2"):
        parse_packet_id(0x40, b"\x40\x03\x00\x01\x00", 2, 5)
    check_flags(0x82, 2, "[MQTT-3.8.1-1]")
    with pytest.raises(MalformedPacketError, match=r"SUBSCRIBE with fixed-header flags 0x0"):
        check_flags(0x80, 2, "[MQTT-3.8.1-1]")


@pytest.mark.parametrize(("topic", "why"), [
    (b"a/b", None), (b"\xff", "[MQTT-1.5.3-1]"), (b"", "[MQTT-4.7.3-1]"),
    (b"a\x00", "[MQTT-1.5.3-2]"), (b"a/+", "[MQTT-3.3.2-2]"), (b"#", "[MQTT-3.3.2-2]"),
])
def test_topic_problems_name_their_statement(topic: bytes, why: str | None) -> None:
    problem = topic_problem(topic)
    assert (problem is None) if why is None else (problem is not None and why in problem)
