"""MQTT framing on bytes: packets split at any point, PUBLISH read and written exactly."""

from __future__ import annotations

import pytest

from hub.errors import MalformedPacketError
from hub.wire import next_packet, parse_publish, puback, publish_packet, remaining_length


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
