"""MQTT 3.1.1 conformance of the hub: violations close one connection, sessions end cleanly.

Malformed packets are written as raw bytes over a real mutual-TLS socket to a real
``fleet-hub serve``; every wait is on a signal (a packet, the socket's EOF, an audit row).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Callable, Iterator

import pytest

from hub.broker.session import INFLIGHT_WINDOW
from hub.wire import remaining_length
from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.mqtt import Client

TIMEOUT = 10.0
CONNACK_OK = b"\x20\x02\x00\x00"


# -- raw MQTT over TLS ------------------------------------------------------------------------

def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _connect(client_id: str, *, clean: bool = True, flags: int | None = None,
             will: tuple[str, bytes] | None = None, trailing: bytes = b"") -> bytes:
    """A CONNECT; *flags* replaces the computed connect flags (to break them on purpose)."""
    computed = (0x02 if clean else 0) | (0x04 | 0x08 if will else 0)
    payload = _str(client_id) + (_str(will[0]) + _str(will[1]) if will else b"")
    body = (_str("MQTT") + bytes([4, computed if flags is None else flags])
            + struct.pack("!H", 60) + payload + trailing)
    return _packet(0x10, body)


def _publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0,
             first: int | None = None) -> bytes:
    ident = struct.pack("!H", packet_id) if qos else b""
    head = 0x30 | (qos << 1) if first is None else first
    return _packet(head, _str(topic) + ident + payload)


class Raw:
    """One device's MQTT connection as bytes: send packets, read whole packets back."""

    def __init__(self, hub: RunningHub, fleet: Fleet, device: Device) -> None:
        context = ssl.create_default_context(cafile=str(fleet.ca))
        context.check_hostname = False
        context.load_cert_chain(str(device.cert), str(device.key))
        raw = socket.create_connection(("127.0.0.1", hub.port), timeout=TIMEOUT)
        self.sock = context.wrap_socket(raw)
        self.buf = bytearray()
        self.device = device

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return False
        self.buf += chunk
        return bool(chunk)

    def packet(self) -> tuple[int, bytes] | None:
        """The next packet (first byte, body), or None at EOF; TimeoutError if none comes."""
        while True:
            if len(self.buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(self.buf):
                    byte = self.buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        if len(self.buf) >= i + length:
                            first, body = self.buf[0], bytes(self.buf[i:i + length])
                            del self.buf[:i + length]
                            return first, body
                        break
            if not self._fill():
                return None

    def connect(self, data: bytes) -> bytes:
        """Send a CONNECT and return the CONNACK's body (flags, code)."""
        self.send(data)
        got = self.packet()
        assert got is not None, "closed instead of CONNACK"
        assert got[0] == 0x20, got
        return got[1]

    def rest_until_eof(self) -> bytes:
        """Everything the hub still sends before it closes; TimeoutError if it keeps it open."""
        out = bytes(self.buf)
        self.buf.clear()
        while self._fill():
            out += bytes(self.buf)
            self.buf.clear()
        return out

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a device that loses power mid-way."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def _rows(hub: RunningHub, device: Device, until: Callable[[list[dict[str, object]]], bool]
          ) -> list[dict[str, object]]:
    """The device's audit rows, once *until* holds for them (the store is written in batches)."""
    return hub.wait_events(device.device_id, until=until, timeout=TIMEOUT)


def _clean_log(hub: RunningHub) -> None:
    noisy = [line for line in hub.log if "Traceback" in line or "never retrieved" in line
             or "AttributeError" in line]
    assert not noisy, "".join(hub.log)


@pytest.fixture(scope="module")
def bystander(fleet: Fleet, hub: RunningHub) -> Iterator[Client]:
    """A well-behaved device connected through every violation: it must notice nothing."""
    device = fleet.device("bystander")
    client = Client(hub.port, fleet.ca, device.cert, device.key, device.device_id)
    assert client.connect() == 0, (hub.events(), "".join(hub.log))
    assert client.subscribe("devices/bystander/#", qos=1) == [1]
    yield client
    client.close()


def _still_served(bystander: Client) -> None:
    assert not bystander.disconnected.is_set()
    bystander.publish("devices/bystander/echo", b"still here", qos=1)
    message = bystander.receive()
    assert message is not None
    assert message.payload == b"still here"


# -- defect 6 and 17: violations close that connection, audited ---------------------------

AFTER_CONNECT: dict[str, tuple[Callable[[str], bytes], str]] = {
    "second-connect": (_connect, "[MQTT-3.1.0-2]"),
    "publish-qos3": (lambda cid: _publish(f"devices/{cid}/t", b"x", 3, 1), "[MQTT-3.3.1-4]"),
    "subscribe-qos3": (lambda cid: _packet(0x82, b"\x00\x01" + _str(f"devices/{cid}/t") + b"\x03"),
                       "[MQTT-3-8.3-4]"),
    "subscribe-flags": (lambda cid: _packet(0x80, b"\x00\x01" + _str(f"devices/{cid}/t") + b"\x01"),
                        "[MQTT-3.8.1-1]"),
    "unsubscribe-flags": (lambda cid: _packet(0xA0, b"\x00\x01" + _str(f"devices/{cid}/t")),
                          "[MQTT-3.10.1-1]"),
    "pubrel-flags": (lambda cid: b"\x60\x02\x00\x01", "[MQTT-3.6.1-1]"),
    "subscribe-id0": (lambda cid: _packet(0x82, b"\x00\x00" + _str(f"devices/{cid}/t") + b"\x01"),
                      "[MQTT-2.3.1-1]"),
    "unsubscribe-id0": (lambda cid: _packet(0xA2, b"\x00\x00" + _str(f"devices/{cid}/t")),
                        "[MQTT-2.3.1-1]"),
    "subscribe-empty": (lambda cid: _packet(0x82, b"\x00\x01"), "[MQTT-3.8.3-3]"),
    "unsubscribe-empty": (lambda cid: _packet(0xA2, b"\x00\x01"), "[MQTT-3.10.3-2]"),
    "pingreq-flags": (lambda cid: b"\xc1\x00", "[MQTT-2.2.2-2]"),
    "disconnect-flags": (lambda cid: b"\xe2\x00", "[MQTT-3.14.1-1]"),
    "server-packet": (lambda cid: b"\x90\x03\x00\x01\x00", "[MQTT-4.8.0-1]"),
}


@pytest.mark.parametrize("case", sorted(AFTER_CONNECT))
def test_a_violation_after_connect_closes_only_that_connection(
        fleet: Fleet, hub: RunningHub, bystander: Client, case: str) -> None:
    """[MQTT-4.8.0-1]: nothing is answered, the connection closes, a violation is audited."""
    device = fleet.device(f"pv-{case}")
    build, statement = AFTER_CONNECT[case]
    raw = Raw(hub, fleet, device)
    try:
        assert raw.connect(_connect(device.device_id)) == b"\x00\x00"
        raw.send(build(device.device_id))
        assert raw.rest_until_eof() == b"", "the hub answered a malformed packet"
    finally:
        raw.close()
    rows = _rows(hub, device, lambda rs: any(r["event"] == "violation" for r in rs))
    [violation] = [r for r in rows if r["event"] == "violation"]
    assert str(violation["reason"]).startswith("protocol-violation: ")
    assert statement in str(violation["reason"])
    assert violation["serial"] == device.serial
    assert violation["peer"]
    _still_served(bystander)
    _clean_log(hub)


FIRST_PACKET: dict[str, tuple[Callable[[str], bytes], str]] = {
    "publish-first": (lambda cid: _publish(f"devices/{cid}/t", b"x"), "[MQTT-3.1.0-1]"),
    "subscribe-first": (lambda cid: _packet(0x82, b"\x00\x01" + _str("a") + b"\x00"),
                        "[MQTT-3.1.0-1]"),
    "reserved-flag": (lambda cid: _connect(cid, flags=0x03), "[MQTT-3.1.2-3]"),
    "will-qos3": (lambda cid: _connect(cid, flags=0x02 | 0x04 | 0x18,
                                       will=(f"devices/{cid}/w", b"bye")), "[MQTT-3.1.2-14]"),
    "will-qos-without-will": (lambda cid: _connect(cid, flags=0x02 | 0x08), "[MQTT-3.1.2-13]"),
    "will-retain-without-will": (lambda cid: _connect(cid, flags=0x02 | 0x20),
                                 "[MQTT-3.1.2-15]"),
    "password-without-username": (lambda cid: _connect(cid, flags=0x02 | 0x40,
                                                       trailing=_str("pw")), "[MQTT-3.1.2-22]"),
    "connect-flags": (lambda cid: b"\x11" + _connect(cid)[1:], "[MQTT-2.2.2-2]"),
    # Bytes past the declared fields are not a next packet; they make this one malformed.
    "connect-trailing-bytes": (lambda cid: _connect(cid, trailing=b"\xc0\x00"),
                               "[MQTT-3.1.3-1]"),
    # A client id that runs past the remaining length is not read from the next packet.
    "connect-field-past-length": (
        lambda cid: _packet(0x10, _str("MQTT") + b"\x04\x02\x00\x3c" + struct.pack("!H", len(cid)))
        + cid.encode(), "client identifier runs past the packet's remaining length"),
}


@pytest.mark.parametrize("case", sorted(FIRST_PACKET))
def test_a_malformed_or_missing_connect_is_closed_without_connack(
        fleet: Fleet, hub: RunningHub, bystander: Client, case: str) -> None:
    """The first packet must be a well-formed CONNECT [MQTT-3.1.0-1, 3.1.4-1]: no CONNACK,
    closed, audited with the identity the TLS certificate gave."""
    device = fleet.device(f"pc-{case}")
    build, statement = FIRST_PACKET[case]
    raw = Raw(hub, fleet, device)
    try:
        raw.send(build(device.device_id))
        assert raw.rest_until_eof() == b"", "the hub answered a malformed CONNECT"
    finally:
        raw.close()
    rows = _rows(hub, device, lambda rs: any(r["event"] == "violation" for r in rs))
    assert [r["event"] for r in rows] == ["violation"], rows  # never admitted
    assert str(rows[0]["reason"]).startswith("protocol-violation: ")
    assert statement in str(rows[0]["reason"])
    assert rows[0]["device_id"] == device.device_id
    assert rows[0]["serial"] == device.serial
    _still_served(bystander)
    _clean_log(hub)


def test_a_connect_larger_than_max_packet_bytes_is_closed_before_its_body(
        fleet: Fleet, hub: RunningHub, bystander: Client) -> None:
    """A CONNECT that declares more than [limits] max_packet_bytes is refused on its header:
    the hub does not wait for (or buffer) the body."""
    device = fleet.device("pc-too-large")
    raw = Raw(hub, fleet, device)
    try:
        raw.send(b"\x10" + remaining_length(262_145) + _str("MQTT"))
        assert raw.rest_until_eof() == b""
    finally:
        raw.close()
    rows = _rows(hub, device, bool)
    assert [(r["event"], r["reason"]) for r in rows] == [("limit", "packet-too-large")]
    _still_served(bystander)


# -- defect 8: a reset right after CONNECT ---------------------------------------------------

def test_a_client_resetting_right_after_connect_is_handled_quietly(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """CONNECT then a TCP reset, ten times: each is admitted (and dropped) or refused for a
    real reason; never a plugin error, never a traceback; the device then connects fine."""
    device = fleet.device("resetter")
    for _ in range(10):
        raw = Raw(hub, fleet, device)
        raw.send(_connect(device.device_id))
        raw.reset()
    client = connect(device)
    assert client.connect() == 0  # queued behind the ten on the client id's lock
    port = client.client.socket().getsockname()[1]
    rows = _rows(hub, device, lambda rs: any(str(r["peer"]).endswith(f":{port}") for r in rs))
    assert not [r for r in rows if r["reason"] == "plugin-error"], rows
    _clean_log(hub)


# -- defect 16: clean session is honoured, take-overs are prompt ------------------------------

def test_clean_session_state_ends_with_its_connection_and_take_overs_are_prompt(
        fleet: Fleet, hub: RunningHub) -> None:
    """[MQTT-3.1.2-6]: a clean session that left a QoS 2 PUBLISH unreleased leaves nothing
    behind; the next persistent connect is told session-present 0. Then a clean connect takes
    that one over while a fourth waits on the client id: both answered, 20 rounds running."""
    device = fleet.device("cleaner")
    cid = device.device_id
    for round_ in range(20):
        first = Raw(hub, fleet, device)
        assert first.connect(_connect(cid, clean=True)) == b"\x00\x00"
        first.send(_publish(f"devices/{cid}/q2", b"unreleased", 2, 1))
        assert first.packet() == (0x50, b"\x00\x01")  # PUBREC; PUBREL never comes
        first.close()
        persistent = Raw(hub, fleet, device)
        assert persistent.connect(_connect(cid, clean=False)) == b"\x00\x00", \
            f"round {round_}: the clean session's state was handed on"
        third, fourth = Raw(hub, fleet, device), Raw(hub, fleet, device)
        third.send(_connect(cid, clean=True))
        fourth.send(_connect(cid, clean=True))  # waits on the client id behind the third
        assert third.packet() == (0x20, b"\x00\x00")
        assert fourth.packet() == (0x20, b"\x00\x00")
        assert persistent.rest_until_eof() == b""  # taken over [MQTT-3.1.4-2]
        # Whichever of the two the hub read second took the other over: one answers a ping.
        for raw in (third, fourth):
            with contextlib.suppress(OSError):
                raw.send(b"\xc0\x00")
        assert sorted([third.packet(), fourth.packet()], key=str) == [(0xD0, b""), None]
        for raw in (persistent, third, fourth):
            raw.close()
    rows = hub.events(cid)
    assert not [r for r in rows if r["event"] == "reject"], rows
    assert not any("did not close in time" in line for line in hub.log)
    _clean_log(hub)


def test_a_persistent_sessions_qos2_publish_completes_after_reconnect(
        fleet: Fleet, hub: RunningHub) -> None:
    """QoS 2 received on a persistent session: the PUBREL may come on the next connection
    [MQTT-4.4.0-1]; the message is delivered once, then PUBCOMP."""
    device = fleet.device("q2-resume")
    cid = device.device_id
    first = Raw(hub, fleet, device)
    assert first.connect(_connect(cid, clean=False)) == b"\x00\x00"
    first.send(_packet(0x82, b"\x00\x01" + _str(f"devices/{cid}/in") + b"\x00"))
    assert first.packet() == (0x90, b"\x00\x01\x00")
    first.send(_publish(f"devices/{cid}/in", b"exactly once", 2, 9))
    assert first.packet() == (0x50, b"\x00\x09")
    first.send(_publish(f"devices/{cid}/in", b"exactly once", 2, 9, first=0x3C))  # DUP
    assert first.packet() == (0x50, b"\x00\x09")
    first.close()
    second = Raw(hub, fleet, device)
    try:
        assert second.connect(_connect(cid, clean=False)) == b"\x01\x00"
        second.send(b"\x62\x02\x00\x09")  # PUBREL
        second.send(_publish(f"devices/{cid}/in", b"marker"))
        got = [second.packet() for _ in range(3)]
    finally:
        second.close()
    assert (0x70, b"\x00\x09") in got  # PUBCOMP
    payloads = [body[2 + len(f"devices/{cid}/in"):] for first_byte, body in
                (g for g in got if g is not None) if first_byte >> 4 == 3]
    assert payloads == [b"exactly once", b"marker"]


# -- defect 18: acknowledged delivery to a subscriber that does not acknowledge ---------------

def _publishes_until(raw: Raw, marker: bytes) -> list[tuple[int, int, bytes]]:
    """(flags, packet id, payload) of each PUBLISH before the QoS 0 one carrying *marker*."""
    seen: list[tuple[int, int, bytes]] = []
    while True:
        got = raw.packet()
        assert got is not None, "closed"
        first, body = got
        if first >> 4 != 3:
            continue  # PUBACKs for our own publishes
        topic_len = struct.unpack("!H", body[:2])[0]
        rest = body[2 + topic_len:]
        if (first >> 1) & 3:
            seen.append((first & 0x0F, struct.unpack("!H", rest[:2])[0], rest[2:]))
        elif rest == marker:
            return seen


def test_a_subscriber_that_never_acknowledges_gets_a_bounded_window_then_redelivery(
        fleet: Fleet, hub: RunningHub) -> None:
    """At most INFLIGHT_WINDOW unacknowledged QoS 1 copies are out at once; the rest wait.
    On reconnect of the persistent session the unacknowledged ones come again with DUP and
    their packet ids [MQTT-4.4.0-1], then the queued ones as acknowledgements free room."""
    device = fleet.device("no-acks")
    cid = device.device_id
    topic = f"devices/{cid}/q1"
    total = INFLIGHT_WINDOW + 8
    raw = Raw(hub, fleet, device)
    assert raw.connect(_connect(cid, clean=False)) == b"\x00\x00"
    raw.send(_packet(0x82, b"\x00\x01" + _str(topic) + b"\x01"))
    assert raw.packet() == (0x90, b"\x00\x01\x01")
    raw.send(b"".join(_publish(topic, b"m%d" % i, 1, i + 1) for i in range(total)))
    raw.send(_publish(topic, b"marker-1"))
    first = _publishes_until(raw, b"marker-1")
    assert [p for _, _, p in first] == [b"m%d" % i for i in range(INFLIGHT_WINDOW)]
    assert all(flags == 0x02 for flags, _, _ in first)  # QoS 1, no DUP the first time
    raw.close()

    again = Raw(hub, fleet, device)
    try:
        assert again.connect(_connect(cid, clean=False)) == b"\x01\x00"
        again.send(_publish(topic, b"marker-2"))
        resent = _publishes_until(again, b"marker-2")
        assert resent == [(0x0A, pid, p) for _, pid, p in first]  # DUP, same ids and order
        again.send(b"".join(b"\x40\x02" + struct.pack("!H", pid) for _, pid, _ in resent))
        again.send(_publish(topic, b"marker-3"))
        rest = _publishes_until(again, b"marker-3")
        assert [p for _, _, p in rest] == [b"m%d" % i for i in range(INFLIGHT_WINDOW, total)]
        again.send(b"".join(b"\x40\x02" + struct.pack("!H", pid) for _, pid, _ in rest))
        again.send(_publish(topic, b"marker-4"))
        assert _publishes_until(again, b"marker-4") == []
    finally:
        again.close()
    _clean_log(hub)
