"""MQTT 3.1.1 delivery through the hub's topic tree and inline PUBLISH path, with paho."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.healthz import metric, wait_metric
from tests.integration.mqtt import Client

ACCEPTED = 0
# These tests stream thousands of messages from one device: far above [limits] publish_rate's
# default of 100/s, which tests/integration/test_hub_limits.py covers.
UNLIMITED = "[limits]\npublish_rate = 1000000\npublish_bytes_rate = 1000000000\n"


@pytest.fixture(scope="module")
def hub(fleet: Fleet) -> Iterator[RunningHub]:
    running = RunningHub.start(fleet.write_config("hub-routing.toml", extra=UNLIMITED))
    yield running
    assert running.stop() == 0, "".join(running.log)


@pytest.fixture(scope="module")
def people(fleet: Fleet, hub: RunningHub) -> dict[str, Device]:
    made = {name: fleet.device(name) for name in ("rt-a", "rt-b", "rt-c")}
    with hub.revocation_change():
        made["rt-op"] = fleet.device("rt-op", group="operators")
    return made


def _drain(client: Client, timeout: float = 0.5) -> list[tuple[str, bytes, int]]:
    seen = []
    while (message := client.receive(timeout)) is not None:
        seen.append((message.topic, message.payload, message.qos))
    return seen


@pytest.mark.parametrize("sub_qos", [0, 1, 2])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
def test_delivered_at_the_lower_of_publish_and_subscription_qos(
        pub_qos: int, sub_qos: int, people: dict[str, Device],
        connect: Callable[..., Client]) -> None:
    """[MQTT-3.8.4-6]: a message goes out at min(publish QoS, granted QoS)."""
    watcher = connect(people["rt-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/rt-a/qos", qos=sub_qos) == [sub_qos]
    sender = connect(people["rt-a"])
    assert sender.connect() == ACCEPTED
    sender.publish("devices/rt-a/qos", b"p%ds%d" % (pub_qos, sub_qos), qos=pub_qos)
    got = watcher.receive()
    assert got is not None
    assert (got.topic, got.payload, got.qos) == (
        "devices/rt-a/qos", b"p%ds%d" % (pub_qos, sub_qos), min(pub_qos, sub_qos))
    assert watcher.receive(0.3) is None  # exactly one copy


def test_overlapping_filters_deliver_one_copy_at_the_highest_qos(
        people: dict[str, Device], connect: Callable[..., Client]) -> None:
    """Three matching filters of one client: one copy, at the best QoS granted."""
    watcher = connect(people["rt-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/rt-b/#", qos=0) == [0]
    assert watcher.subscribe("devices/+/telemetry", qos=1) == [1]
    assert watcher.subscribe("#", qos=0) == [0]
    sender = connect(people["rt-b"])
    assert sender.connect() == ACCEPTED
    sender.publish("devices/rt-b/telemetry", b"once", qos=1)
    assert _drain(watcher) == [("devices/rt-b/telemetry", b"once", 1)]


def test_wildcards_match_per_level_and_hash_includes_the_parent(
        people: dict[str, Device], connect: Callable[..., Client]) -> None:
    """'+' is one level, '#' the parent and everything below, exact filters exactly."""
    watcher = connect(people["rt-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/rt-c/+", "devices/rt-c/deep/#", qos=0) == [0, 0]
    sender = connect(people["rt-c"])
    assert sender.connect() == ACCEPTED
    for topic in ("devices/rt-c/one", "devices/rt-c/one/two", "devices/rt-c/deep",
                  "devices/rt-c/deep/a/b", "devices/rt-c"):
        sender.publish(topic, topic.encode(), qos=1)
    sender.publish("devices/rt-c/end", b"end", qos=1)
    got = [t for t, _, _ in _drain(watcher)]
    assert got == ["devices/rt-c/one", "devices/rt-c/deep", "devices/rt-c/deep/a/b",
                   "devices/rt-c/end"]


def test_a_stream_of_qos0_messages_arrives_complete_and_in_order(
        people: dict[str, Device], connect: Callable[..., Client]) -> None:
    """2,000 pipelined QoS 0 messages (many per TLS record) arrive all and in order."""
    watcher = connect(people["rt-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/rt-a/stream", qos=0) == [0]
    sender = connect(people["rt-a"])
    assert sender.connect() == ACCEPTED
    for n in range(2000):
        sender.publish("devices/rt-a/stream", b"%05d" % n + b"x" * (n % 300), qos=0)
    sender.publish("devices/rt-a/stream", b"last", qos=1)
    payloads = [p for _, p, _ in _drain(watcher, 2.0)]
    assert len(payloads) == 2001
    assert [int(p[:5]) for p in payloads[:-1]] == list(range(2000))
    assert payloads[-1] == b"last"


def test_unsubscribe_stops_delivery(people: dict[str, Device],
                                    connect: Callable[..., Client]) -> None:
    watcher = connect(people["rt-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/rt-b/u", qos=1) == [1]
    sender = connect(people["rt-b"])
    assert sender.connect() == ACCEPTED
    sender.publish("devices/rt-b/u", b"before")
    assert _drain(watcher) == [("devices/rt-b/u", b"before", 1)]
    unsubacked = threading.Event()
    watcher.client.on_unsubscribe = lambda *_args: unsubacked.set()
    result, _mid = watcher.client.unsubscribe("devices/rt-b/u")
    assert result == 0
    assert unsubacked.wait(5), "no UNSUBACK"
    sender.publish("devices/rt-b/u", b"after")
    assert _drain(watcher) == []


def test_persistent_session_gets_qos1_messages_sent_while_it_was_away(
        hub: RunningHub, people: dict[str, Device], connect: Callable[..., Client]) -> None:
    """[MQTT-3.1.2-5]: QoS 1/2 messages are kept for a persistent session; QoS 0 are not."""
    device = people["rt-c"]
    away = connect(device, clean=False)
    assert away.connect() == ACCEPTED
    assert away.subscribe("fleet/broadcast/news", qos=1) == [1]
    open_now = metric(hub, "fleet_hub_connections")
    away.close()
    wait_metric(hub, "fleet_hub_connections", lambda n: n < open_now)  # the hub let it go
    operator = connect(people["rt-op"])
    assert operator.connect() == ACCEPTED
    operator.publish("fleet/broadcast/news", b"kept", qos=1)
    operator.publish("fleet/broadcast/news", b"dropped", qos=0)
    operator.publish("fleet/broadcast/news", b"kept too", qos=2)  # returns on PUBCOMP
    back = connect(device, clean=False)
    assert back.connect() == ACCEPTED
    assert back.session_present is True
    assert sorted(_drain(back, 1.0)) == [("fleet/broadcast/news", b"kept", 1),
                                        ("fleet/broadcast/news", b"kept too", 1)]
    open_now = metric(hub, "fleet_hub_connections")
    back.close()
    wait_metric(hub, "fleet_hub_connections", lambda n: n < open_now)
    fresh = connect(device)  # clean session: the subscription is gone with the session
    assert fresh.connect() == ACCEPTED
    assert fresh.session_present is False
    operator.publish("fleet/broadcast/news", b"not for you", qos=1)
    assert _drain(fresh) == []


def test_will_is_published_when_a_device_vanishes_not_when_it_says_goodbye(
        fleet: Fleet, hub: RunningHub, people: dict[str, Device],
        connect: Callable[..., Client], tmp_path: Path) -> None:
    """Killed without DISCONNECT: the will goes out; a clean DISCONNECT: no will."""
    watcher = connect(people["rt-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/rt-b/status", qos=1) == [1]
    polite = connect(people["rt-b"], will=("devices/rt-b/status", b"gone"))
    assert polite.connect() == ACCEPTED
    polite.close()
    assert watcher.receive(1.0) is None
    device = people["rt-b"]
    script = tmp_path / "vanish.py"
    script.write_text(_VANISH.format(port=hub.port, ca=fleet.ca, cert=device.cert,
                                     key=device.key))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "connected"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    got = watcher.receive()
    assert got is not None
    assert (got.topic, got.payload) == ("devices/rt-b/status", b"gone")


_VANISH = """
import ssl, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rt-b", protocol=mqtt.MQTTv311)
ctx = ssl.create_default_context(cafile="{ca}")
ctx.check_hostname = False
ctx.load_cert_chain("{cert}", "{key}")
c.tls_set_context(ctx)
c.will_set("devices/rt-b/status", b"gone", qos=1)
c.on_connect = lambda *a: (print("connected", flush=True))
c.connect("127.0.0.1", {port}, keepalive=30)
c.loop_forever()
"""
