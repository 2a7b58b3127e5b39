"""[limits]: what one device may cost the gateway (issue 11 defect 4, and defect 13's audit).

The hub here runs with small limits so that floods are short: 20 messages/s (burst 40),
64-byte topics, 4 subscriptions, 5 retained messages or 4 KiB per device.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hub.wire import publish_packet, remaining_length
from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, REFUSED = 0, 0x80
RATE = 20
LIMITS = f"""
[limits]
max_topic_bytes = 64
max_subscriptions = 4
publish_rate = {RATE}
publish_bytes_rate = 1048576
max_retained_per_device = 5
max_retained_bytes = 4096
"""


@pytest.fixture(scope="module")
def hub(fleet: Fleet) -> Iterator[RunningHub]:
    """The module's hub, with the small limits above (the conftest's ``connect`` uses it)."""
    running = RunningHub.start(fleet.write_config("limits-hub.toml", extra=LIMITS))
    yield running
    assert running.stop() == 0, "".join(running.log)


@pytest.fixture(scope="module")
def operator(fleet: Fleet, hub: RunningHub) -> Device:
    """May subscribe to everything (``#``) but $SYS: the limits, not the ACL, refuse."""
    with hub.revocation_change():  # returns once the hub has the operators group
        return fleet.device("lim-op", group="operators")


def _rows(hub: RunningHub, device: str, done: Callable[[list[dict[str, object]]], bool],
          timeout: float = 10.0) -> list[dict[str, object]]:
    """The device's audit rows once *done* holds (they are written in batches)."""
    return hub.wait_events(device, until=done, timeout=timeout)


def _limits(rows: list[dict[str, object]]) -> list[str]:
    return [str(r["reason"]) for r in rows if r["event"] == "limit"]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Raw:
    """A device's TLS connection speaking MQTT by hand (to send what no library would)."""

    def __init__(self, hub: RunningHub, fleet: Fleet, device: Device) -> None:
        context = ssl.create_default_context(cafile=str(fleet.ca))
        context.check_hostname = False
        context.load_cert_chain(str(device.cert), str(device.key))
        raw = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
        self.sock = context.wrap_socket(raw)
        cid = device.device_id.encode()
        body = (struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", 30)
                + struct.pack("!H", len(cid)) + cid)
        self.sock.sendall(bytes([0x10, len(body)]) + body)
        assert self.sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted

    def closed_by_hub(self, timeout: float = 10.0) -> bool:
        """Read until the hub closes (True) or *timeout* passes with the connection open."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def test_a_publish_declaring_more_than_max_packet_bytes_is_closed_on_its_header(
        fleet: Fleet, hub: RunningHub) -> None:
    """The header of a 200 MB PUBLISH and a few KB of it: the hub closes the connection
    without buffering the body, and audits limit/packet-too-large."""
    device = fleet.device("lim-big")
    before = _rss_kib(hub.process.pid)
    raw = Raw(hub, fleet, device)
    try:
        topic = b"devices/lim-big/blob"
        header = b"\x30" + remaining_length(200_000_000) + struct.pack("!H", len(topic)) + topic
        raw.sock.sendall(header + b"x" * 4096)
        assert raw.closed_by_hub(), "the hub waits for a 200 MB body"
    finally:
        raw.close()
    rows = _rows(hub, device.device_id, lambda rs: bool(_limits(rs)))
    assert _limits(rows) == ["packet-too-large"]
    assert rows[-1]["serial"] == device.serial
    assert _rss_kib(hub.process.pid) - before < 4096


def test_a_publish_topic_longer_than_max_topic_bytes_closes_the_connection(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    device = fleet.device("lim-topic")
    client = connect(device)
    assert client.connect() == ACCEPTED
    client.publish("devices/lim-topic/" + "t" * 60, b"x", qos=0)
    assert client.wait_disconnected()
    rows = _rows(hub, device.device_id, lambda rs: bool(_limits(rs)))
    assert _limits(rows) == ["topic-too-long"]


def test_a_subscription_filter_longer_than_max_topic_bytes_is_refused(
        operator: Device, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """SUBACK 0x80 for that filter only; the connection stays."""
    client = connect(operator)
    assert client.connect() == ACCEPTED
    long_filter = "devices/" + "f" * 60 + "/#"
    assert client.subscribe(long_filter, "devices/short/#", qos=1) == [REFUSED, 1]
    rows = _rows(hub, operator.device_id, lambda rs: "topic-too-long" in _limits(rs))
    assert "topic-too-long" in _limits(rows)


def test_subscriptions_past_max_subscriptions_are_refused(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """Four filters are granted, the excess of a SUBSCRIBE gets 0x80; renewing one that is
    held still works. Audited once per connection."""
    with hub.revocation_change():
        device = fleet.device("lim-subs", group="operators")
    client = connect(device)
    assert client.connect() == ACCEPTED
    assert client.subscribe("a/1", "a/2", "a/3", qos=0) == [0, 0, 0]
    assert client.subscribe("a/4", "a/5", "a/6", qos=0) == [0, REFUSED, REFUSED]
    assert client.subscribe("a/7", "a/1", qos=1) == [REFUSED, 1]
    rows = _rows(hub, device.device_id, lambda rs: bool(_limits(rs)))
    assert _limits(rows) == ["too-many-subscriptions"]


def test_a_flooding_device_is_limited_and_others_are_not(
        fleet: Fleet, hub: RunningHub, operator: Device,
        connect: Callable[..., Client]) -> None:
    """One device floods (QoS 1, every message still PUBACKed) while another sends telemetry:
    the other's messages all arrive, the flood is cut to the burst plus the rate, and the
    flooder is audited rate-limited once."""
    flooder, steady = fleet.device("lim-flood"), fleet.device("lim-steady")
    watcher = connect(operator)
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/+/telemetry", qos=0) == [0]
    flood = connect(flooder)
    assert flood.connect() == ACCEPTED
    calm = connect(steady)
    assert calm.connect() == ACCEPTED
    sent = 400
    elapsed: list[float] = []

    def run_flood() -> None:
        start = time.monotonic()
        for n in range(sent):  # wait_for_publish: each one is acknowledged, dropped or not
            flood.publish("devices/lim-flood/telemetry", b"%d" % n, qos=1)
        elapsed.append(time.monotonic() - start)

    thread = threading.Thread(target=run_flood)
    thread.start()
    for n in range(RATE):
        calm.publish("devices/lim-steady/telemetry", b"%d" % n, qos=1)
    thread.join(60)
    assert elapsed, "the flood did not finish: some PUBLISH was never acknowledged"
    calm.publish("devices/lim-steady/telemetry", b"end", qos=1)
    got: dict[str, list[bytes]] = {"devices/lim-flood/telemetry": [],
                                   "devices/lim-steady/telemetry": []}
    while (message := watcher.receive()) is not None:
        got[message.topic].append(message.payload)
        if message.payload == b"end":
            break
    assert got["devices/lim-steady/telemetry"] == [b"%d" % n for n in range(RATE)] + [b"end"]
    flooded = len(got["devices/lim-flood/telemetry"])
    assert 2 * RATE <= flooded <= 2 * RATE + RATE * elapsed[0] + 1, (flooded, elapsed)
    assert flood.client.is_connected()
    rows = _rows(hub, flooder.device_id, lambda rs: bool(_limits(rs)))
    assert _limits(rows) == ["rate-limited"]
    assert _limits(hub.events(steady.device_id)) == []


def test_on_rate_limit_disconnect_closes_the_flooder(
        fleet: Fleet, connect: Callable[..., Client]) -> None:
    """on_rate_limit = "disconnect": the flooder is closed and audited, at QoS 0 as at QoS 2
    (which is counted when it is delivered, on PUBREL)."""
    config = fleet.write_config("limits-disconnect.toml",
                                extra=LIMITS + 'on_rate_limit = "disconnect"\n')
    running = RunningHub.start(config)
    try:
        for qos in (0, 2):
            device = fleet.device(f"lim-flood-dc{qos}")
            client = connect(device, port=running.port)
            assert client.connect() == ACCEPTED
            for n in range(5 * RATE):  # not waiting for acknowledgements: paho queues them
                client.client.publish(f"devices/{device.device_id}/telemetry", b"%d" % n,
                                      qos=qos)
            assert client.wait_disconnected(), f"QoS {qos} flood not cut off"
            rows = _rows(running, device.device_id, lambda rs: bool(_limits(rs)))
            assert _limits(rows) == ["rate-limited"]
    finally:
        assert running.stop() == 0, "".join(running.log)


def _retained(client: Client, topic_filter: str) -> list[tuple[str, bytes]]:
    """The retained messages a fresh SUBSCRIBE brings (a second SUBSCRIBE's SUBACK comes
    after them: the hub handles one connection's subscriptions in order)."""
    assert client.subscribe(topic_filter, qos=0) == [0]
    assert client.subscribe("lim/none", qos=0) == [0]
    seen = []
    while (message := client.receive(0.01)) is not None:
        assert message.retain
        seen.append((message.topic, message.payload))
    return sorted(seen)


def test_retained_messages_past_the_device_quota_are_delivered_but_not_kept(
        fleet: Fleet, hub: RunningHub, operator: Device,
        connect: Callable[..., Client]) -> None:
    """Five retained messages per device: the sixth on a new topic is still routed live but
    not retained; an empty retained payload deletes one and frees its place
    [MQTT-3.3.1-10/11]. Audited once per connection."""
    device = fleet.device("lim-ret")
    live = connect(operator)
    assert live.connect() == ACCEPTED
    assert live.subscribe("devices/lim-ret/#", qos=0) == [0]
    owner = connect(device)
    assert owner.connect() == ACCEPTED
    for n in range(8):
        owner.publish(f"devices/lim-ret/{n}", b"v%d" % n, retain=True)
    assert [live.receive() is not None for _ in range(8)] == [True] * 8
    later = connect(operator, client_id=operator.device_id)
    assert later.connect() == ACCEPTED  # takes over `live`: one connection per client id
    assert _retained(later, "devices/lim-ret/#") == [
        (f"devices/lim-ret/{n}", b"v%d" % n) for n in range(5)]
    owner.publish("devices/lim-ret/0", b"", retain=True)  # delete: frees one place
    owner.publish("devices/lim-ret/9", b"v9", retain=True)
    owner.publish("devices/lim-ret/1", b"v1 again", retain=True)  # replacing needs no place
    later.close()
    last = connect(operator)
    assert last.connect() == ACCEPTED
    assert _retained(last, "devices/lim-ret/#") == [
        ("devices/lim-ret/1", b"v1 again"), ("devices/lim-ret/2", b"v2"),
        ("devices/lim-ret/3", b"v3"), ("devices/lim-ret/4", b"v4"), ("devices/lim-ret/9", b"v9")]
    rows = _rows(hub, device.device_id, lambda rs: bool(_limits(rs)))
    assert _limits(rows) == ["retained-quota"]


def test_retained_bytes_past_the_device_quota_are_not_kept(
        fleet: Fleet, hub: RunningHub, operator: Device,
        connect: Callable[..., Client]) -> None:
    """4 KiB of retained topic and payload bytes per device; a too large replacement
    discards the topic's older message too (no subscriber gets a superseded value)."""
    device = fleet.device("lim-retb")
    owner = connect(device)
    assert owner.connect() == ACCEPTED
    owner.publish("devices/lim-retb/a", b"a" * 2000, retain=True)
    owner.publish("devices/lim-retb/b", b"b" * 1000, retain=True)
    owner.publish("devices/lim-retb/c", b"c" * 2000, retain=True)  # over: not kept
    owner.publish("devices/lim-retb/b", b"B" * 3000, retain=True)  # over: b goes too
    reader = connect(operator)
    assert reader.connect() == ACCEPTED
    assert _retained(reader, "devices/lim-retb/#") == [("devices/lim-retb/a", b"a" * 2000)]
    rows = _rows(hub, device.device_id, lambda rs: bool(_limits(rs)))
    assert _limits(rows) == ["retained-quota"]


def test_publishing_to_sys_is_audited_and_closes_the_connection(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """Defect 13: `$` topics are closed to devices; the close used to leave no record."""
    device = fleet.device("lim-sys")
    client = connect(device)
    assert client.connect() == ACCEPTED
    client.publish("$SYS/broker/uptime", b"forged", qos=0)
    assert client.wait_disconnected()
    rows = _rows(hub, device.device_id, lambda rs: any(r["event"] == "acl-deny" for r in rs))
    assert [(r["event"], r["reason"]) for r in rows if r["event"] != "accept"] == [
        ("acl-deny", "publish $SYS/broker/uptime")]


def test_a_qos2_publish_to_sys_is_audited_too(fleet: Fleet, hub: RunningHub) -> None:
    device = fleet.device("lim-sys2")
    raw = Raw(hub, fleet, device)
    try:
        # Checked when it is delivered, i.e. on PUBREL [MQTT-4.3.3-2].
        raw.sock.sendall(publish_packet(b"$SYS/x", b"forged", 2, 7) + b"\x62\x02\x00\x07")
        assert raw.closed_by_hub()
    finally:
        raw.close()
    rows = _rows(hub, device.device_id, lambda rs: any(r["event"] == "acl-deny" for r in rs))
    assert [(r["event"], r["reason"]) for r in rows if r["event"] == "acl-deny"] == [
        ("acl-deny", "publish $SYS/x")]
