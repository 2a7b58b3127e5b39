"""Per-device topic ACL: deny by default, filters must be covered entirely, $SYS closed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, REFUSED = 0, 0x80


@pytest.fixture(scope="module")
def devices(fleet: Fleet, hub: RunningHub) -> dict[str, object]:
    made = {name: fleet.device(name) for name in ("acl-1", "acl-2")}
    with hub.revocation_change():  # the operator's group reaches the hub
        made["acl-op"] = fleet.device("acl-op", group="operators")
    return made


@pytest.mark.parametrize(("filters", "codes"), [
    (["devices/acl-1/#", "devices/acl-1/cmd", "fleet/broadcast/#"], [1, 1, 1]),
    (["devices/+/telemetry"], [REFUSED]),
    (["#"], [REFUSED]),
    (["+/acl-1/#"], [REFUSED]),
    (["devices/acl-2/#"], [REFUSED]),
    (["$SYS/#"], [REFUSED]),
    (["devices/#"], [REFUSED]),
    (["devices/acl-1/+/x", "devices/#"], [1, REFUSED]),
])
def test_device_subscriptions(filters: list[str], codes: list[int], devices: dict[str, object],
                              connect: Callable[..., Client]) -> None:
    """A filter is granted only when an allowed filter covers it entirely (SUBACK 0x80)."""
    client = connect(devices["acl-1"])
    assert client.connect() == ACCEPTED
    assert client.subscribe(*filters) == codes


def test_operator_group_gets_everything_but_sys(devices: dict[str, object],
                                                connect: Callable[..., Client]) -> None:
    """[acl.groups.operators] subscribe = ["#"]; $SYS stays closed even to them."""
    client = connect(devices["acl-op"])
    assert client.connect() == ACCEPTED
    assert client.subscribe("#", "devices/+/telemetry", "$SYS/#") == [1, 1, REFUSED]


def test_publish_to_another_devices_topic_is_never_delivered(
        devices: dict[str, object], hub: RunningHub, connect: Callable[..., Client]) -> None:
    """acl-1 publishing into acl-2's topics reaches nobody, and the denial is audited."""
    victim = connect(devices["acl-2"])
    assert victim.connect() == ACCEPTED
    assert victim.subscribe("devices/acl-2/#") == [1]
    watcher = connect(devices["acl-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/#") == [1]
    sender = connect(devices["acl-1"])
    assert sender.connect() == ACCEPTED
    sender.publish("devices/acl-2/cmd", b"forged command")
    sender.publish("devices/acl-1/telemetry", b"honest reading")
    seen = watcher.receive()
    assert seen is not None
    assert (seen.topic, seen.payload) == ("devices/acl-1/telemetry", b"honest reading")
    assert victim.receive(0.5) is None
    denials = hub.wait_events("acl-1", event="acl-deny")
    assert denials[-1]["reason"] == "publish devices/acl-2/cmd"


def test_retained_messages_go_only_to_matching_subscribers(
        devices: dict[str, object], connect: Callable[..., Client]) -> None:
    """Stock amqtt sends a new client the retained messages of *every* filter; the hub
    sends them only for the client's own granted subscriptions."""
    watcher = connect(devices["acl-op"])
    assert watcher.connect() == ACCEPTED
    assert watcher.subscribe("devices/acl-1/#") == [1]  # makes the filter exist in the broker
    owner = connect(devices["acl-1"])
    assert owner.connect() == ACCEPTED
    owner.publish("devices/acl-1/state", b"secret state", retain=True)
    assert watcher.receive() is not None
    other = connect(devices["acl-2"])
    assert other.connect() == ACCEPTED
    assert other.receive(0.5) is None
    assert other.subscribe("devices/acl-2/#") == [1]
    assert other.receive(0.5) is None
