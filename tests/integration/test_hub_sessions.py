"""A refused CONNECT changes nothing: the take-over attacks that work on stock amqtt 0.12.

Each test below fails on a stock amqtt with a certificate plugin (docs/amqtt-internals.md 2.3).
"""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135


def _victim(fleet: Fleet, hub: RunningHub, connect: Callable[..., Client], name: str,
            clean: bool = True) -> tuple[Client, Client]:
    """Device *name* connected and subscribed, plus an operator that can publish to it."""
    device = fleet.device(name)
    with hub.revocation_change():  # the operator's group reaches the hub (registry refresh)
        op = fleet.device(f"op-{name}", group="operators")
    victim = connect(device, clean=clean)
    assert victim.connect() == ACCEPTED
    assert victim.subscribe(f"devices/{name}/cmd", "fleet/broadcast/#") == [1, 1]
    operator = connect(op)
    assert operator.connect() == ACCEPTED
    return victim, operator


def _still_served(victim: Client, publisher: Client, topic: str) -> None:
    publisher.publish(topic, b"still there?")
    message = victim.receive()
    assert message is not None, "the victim lost its subscription or its connection"
    assert message.payload == b"still there?"


def test_a_clean_session_connect_with_another_devices_id_is_harmless(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """(a) Another valid certificate, client id D, clean-session 1: refused; D keeps all."""
    victim, operator = _victim(fleet, hub, connect, "victim-a")
    attacker = connect(fleet.device("mallory-a"), "victim-a", clean=True)
    assert attacker.connect() == NOT_AUTHORIZED
    assert not victim.disconnected.is_set()
    _still_served(victim, operator, "fleet/broadcast/a")


def test_b_persistent_connect_with_another_devices_id_takes_nothing_over(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """(b) The same with clean-session 0: no take-over, no session-present, D stays."""
    victim, operator = _victim(fleet, hub, connect, "victim-b", clean=False)
    attacker = connect(fleet.device("mallory-b"), "victim-b", clean=False)
    assert attacker.connect() == NOT_AUTHORIZED
    assert attacker.session_present is False  # [MQTT-3.2.2-4]
    assert not victim.disconnected.wait(0.5)
    _still_served(victim, operator, "fleet/broadcast/b")


def test_c_resuming_someone_elses_persistent_session_is_refused(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """(c) D leaves a persistent session; another valid certificate resuming as D: refused,
    and D itself can still resume it with its queued message."""
    device = fleet.device("victim-c")
    with hub.revocation_change():
        op = fleet.device("op-c", group="operators")
    victim = connect(device, clean=False)
    assert victim.connect() == ACCEPTED
    assert victim.subscribe("fleet/broadcast/#", qos=1) == [1]
    victim.close()
    assert victim.wait_disconnected()
    operator = connect(op)
    assert operator.connect() == ACCEPTED
    operator.publish("fleet/broadcast/c", b"queued for victim-c", qos=1)
    attacker = connect(fleet.device("mallory-c"), "victim-c", clean=False)
    assert attacker.connect() == NOT_AUTHORIZED
    assert attacker.receive(0.5) is None
    back = connect(device, clean=False)
    assert back.connect() == ACCEPTED
    assert back.session_present is True
    message = back.receive()
    assert message is not None
    assert message.payload == b"queued for victim-c"


def test_d_certificate_with_san_but_no_uri_is_a_clean_refusal(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """(d) A SAN without a URI entry: CONNACK 5 and an audit record, not an exception."""
    odd = fleet.device_without_uri("dns-only")
    client = connect(odd)
    assert client.connect() == NOT_AUTHORIZED
    rows = hub.wait_events(serial=odd.serial)
    assert [(r["event"], r["reason"]) for r in rows] == [("reject", "bad-identity")]
    assert not any("Traceback" in line for line in hub.log)


def test_the_same_device_may_take_over_its_own_session(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """A device reconnecting with its own certificate replaces its old connection
    [MQTT-3.1.4-2], and the new connection receives messages."""
    device = fleet.device("self-take")
    with hub.revocation_change():
        op = fleet.device("op-take", group="operators")
    first = connect(device, clean=False)
    assert first.connect() == ACCEPTED
    assert first.subscribe("fleet/broadcast/#") == [1]
    second = connect(device, clean=False)
    assert second.connect() == ACCEPTED
    assert second.session_present is True
    assert first.wait_disconnected()
    operator = connect(op)
    assert operator.connect() == ACCEPTED
    _still_served(second, operator, "fleet/broadcast/self")
