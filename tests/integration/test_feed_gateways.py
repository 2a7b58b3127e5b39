"""Gateways away from the CA (DESIGN section 9): hubs that know the fleet only from the feed.

A real ``fleet-provision serve`` and ``fleet-hub serve`` processes, each gateway in its own
folder with its own ``server-cert --name gw-N`` certificate, ``[revocation] feed`` and
``feed_cache`` and no registry or CRL; devices are paho clients and Debian's mosquitto
clients; every CA action is the real ``fleet-provision`` command. Tests wait on the hubs'
signals (``/healthz``'s revocation version, the audit store, a client's disconnect), never
a fixed time.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from device_sim.lab import CAServiceProcess, write_gateway_config
from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.healthz import (
    revocation_version,
    wait_healthz,
    wait_version_above,
)
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135
MOSQUITTO = shutil.which("mosquitto_pub") is not None
# The gateways' policy: {group} grants, operators may broadcast, only registered certificates.
GATEWAY = {
    "listener": {"handshake_timeout": 5},
    "auth": {"registered_only": True},
    "acl": {"publish": ["devices/{device_id}/#", "groups/{group}/#"],
            "subscribe": ["devices/{device_id}/#", "fleet/broadcast/#", "groups/{group}/#"],
            "groups": {"operators": {"publish": ["fleet/broadcast/#"]}}},
}
# The hub's long-poll backs off up to 10 s while the CA is away: a gateway may take that long
# to come back to a CA that restarted.
CATCH_UP = 15.0


def provision(fleet: Fleet, *args: str, env: dict[str, str] | None = None) -> str:
    """``fleet-provision ARGS --pki PKI`` as an operator runs it; its stderr."""
    done = subprocess.run([sys.executable, "-m", "provisioning.cli", *args, "--pki",
                           str(fleet.pki)], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr


def gateway(fleet: Fleet, ca: CAServiceProcess, name: str, *layers: Any) -> RunningHub:
    """A gateway fed by *ca*: its certificate, ``ROOT/NAME/hub.toml``, the hub running."""
    return RunningHub.start(write_gateway_config(fleet.root, fleet.pki, name, ca.feed_url,
                                                 layers=(GATEWAY, *layers)))


@contextmanager
def changes(*hubs: RunningHub, timeout: float = 10.0) -> Iterator[None]:
    """Around one CA action: on leaving, every hub has taken the new state from the feed."""
    before = [revocation_version(hub) for hub in hubs]
    yield
    for hub, version in zip(hubs, before, strict=True):
        wait_version_above(hub, version, timeout)


def mosquitto_pub(hub: RunningHub, fleet: Fleet, device: Device,
                  topic: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.port), "--cafile",
                           str(fleet.ca), "--insecure", "-i", device.device_id, "--cert",
                           str(device.cert), "--key", str(device.key), "-t", topic, "-m", "hi",
                           "-q", "1"], capture_output=True, text=True, timeout=20, check=False)


@pytest.fixture(scope="module")
def ca(fleet: Fleet) -> Iterator[CAServiceProcess]:
    with CAServiceProcess(fleet.pki) as service:
        yield service


@pytest.fixture(scope="module")
def gateways(fleet: Fleet, ca: CAServiceProcess) -> Iterator[tuple[RunningHub, RunningHub]]:
    """gw-1 and gw-2, registered_only, fed by the module's CA service."""
    with ExitStack() as stack:
        one = stack.enter_context(gateway(fleet, ca, "gw-1"))
        two = stack.enter_context(gateway(fleet, ca, "gw-2"))
        yield one, two


@pytest.fixture
def connect(fleet: Fleet) -> Iterator[Callable[..., Client]]:
    """A paho client of a device at a gateway, closed after the test."""
    clients: list[Client] = []

    def make(device: Device, hub: RunningHub, *, ca: Path | None = None,
             **kwargs: Any) -> Client:
        client = Client(hub.port, ca or fleet.ca, device.cert, device.key, device.device_id,
                        **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def enrolled(fleet: Fleet, hubs: tuple[RunningHub, ...], device_id: str,
             group: str | None = None) -> Device:
    """A device enrolled at the CA, once every gateway has it from the feed."""
    with changes(*hubs):
        return fleet.device(device_id, group=group)


def test_revoked_device_is_kicked_at_its_own_gateway(
        fleet: Fleet, gateways: tuple[RunningHub, RunningHub],
        connect: Callable[..., Client]) -> None:
    """`fleet-provision revoke` at the CA: the device is cut off by the gateway it is on
    (audited there as a kick, revoked) and refused at every gateway after; a device on the
    other gateway stays connected and served."""
    gw1, gw2 = gateways
    victim = enrolled(fleet, gateways, "feed-victim")
    bystander = enrolled(fleet, gateways, "feed-bystander")
    live = connect(victim, gw1)
    assert live.connect() == ACCEPTED
    other = connect(bystander, gw2)
    assert other.connect() == ACCEPTED
    with changes(*gateways):
        provision(fleet, "revoke", "feed-victim", "--reason", "keyCompromise")
    assert live.wait_disconnected(5)
    [kick] = gw1.wait_events("feed-victim", event="kick")
    assert (kick["reason"], kick["serial"]) == ("revoked", victim.serial)
    assert not [r for r in gw2.events("feed-victim") if r["event"] == "kick"]
    for hub in gateways:
        assert connect(victim, hub).connect() == NOT_AUTHORIZED
        if MOSQUITTO:
            assert mosquitto_pub(hub, fleet, victim, "devices/feed-victim/x").returncode != 0
    assert other.subscribe("devices/feed-bystander/echo") == [1]
    other.publish("devices/feed-bystander/echo", b"still here")
    message = other.receive()
    assert message is not None
    assert message.payload == b"still here"


def test_suspend_then_resume_through_the_feed(
        fleet: Fleet, gateways: tuple[RunningHub, RunningHub],
        connect: Callable[..., Client]) -> None:
    """suspend: the live session is kicked (on-hold) and a reconnect refused; resume: the
    same certificate is admitted again."""
    _, gw2 = gateways
    device = enrolled(fleet, gateways, "feed-held")
    live = connect(device, gw2)
    assert live.connect() == ACCEPTED
    with changes(*gateways):
        provision(fleet, "suspend", "feed-held")
    assert live.wait_disconnected(5)
    assert gw2.wait_events("feed-held", event="kick")[-1]["reason"] == "on-hold"
    assert connect(device, gw2).connect() == NOT_AUTHORIZED
    with changes(*gateways):
        provision(fleet, "resume", "feed-held")
    assert connect(device, gw2).connect() == ACCEPTED
    if MOSQUITTO:
        assert mosquitto_pub(gw2, fleet, device, "devices/feed-held/x").returncode == 0


def test_group_set_grants_the_group_acl(fleet: Fleet, gateways: tuple[RunningHub, RunningHub],
                                        connect: Callable[..., Client]) -> None:
    """`fleet-provision group set` reaches the gateway: a `{group}` rule grants nothing to a
    device without a group, then the group's topics once it is moved into one, and a
    message published there by a group member (mosquitto_pub) reaches it."""
    gw1, _ = gateways
    member = enrolled(fleet, gateways, "feed-member", group="crew")
    mover = enrolled(fleet, gateways, "feed-mover")
    before = connect(mover, gw1)
    assert before.connect() == ACCEPTED
    assert before.subscribe("groups/crew/#") == [0x80]
    with changes(*gateways):
        provision(fleet, "group", "set", "--group", "crew", "feed-mover")
    after = connect(mover, gw1)
    assert after.connect() == ACCEPTED
    assert after.subscribe("groups/crew/#") == [1]
    if MOSQUITTO:
        done = mosquitto_pub(gw1, fleet, member, "groups/crew/news")
        assert done.returncode == 0, done.stderr
    else:
        sender = connect(member, gw1)
        assert sender.connect() == ACCEPTED
        sender.publish("groups/crew/news", b"hi")
    message = after.receive()
    assert message is not None
    assert (message.topic, message.payload) == ("groups/crew/news", b"hi")


def test_the_password_factor_through_the_feed(fleet: Fleet, ca: CAServiceProcess,
                                              connect: Callable[..., Client]) -> None:
    """[auth] password = true on a gateway with no registry: the hash comes with the feed;
    the right password is admitted, a wrong one refused as bad-password."""
    with gateway(fleet, ca, "gw-password", {"auth": {"password": True}}) as hub:
        device = enrolled(fleet, (hub,), "feed-pw")
        with changes(hub):
            provision(fleet, "password", "set", "feed-pw", "--password-env", "DEV_PW",
                      env={"DEV_PW": "correct horse"})
        assert connect(device, hub, username="x", password="correct horse").connect() \
            == ACCEPTED
        assert connect(device, hub, username="x", password="wrong").connect() == NOT_AUTHORIZED
        [reject] = hub.wait_events("feed-pw", event="reject")
        assert reject["reason"] == "bad-password"


def test_unregistered_certificate_is_refused(fleet: Fleet,
                                             gateways: tuple[RunningHub, RunningHub],
                                             connect: Callable[..., Client]) -> None:
    """registered_only: a certificate the issuing key signed but the CA never recorded (a
    leaked key) is refused at a feed-fed gateway with reason `unregistered`; a device the
    CA issued is admitted."""
    gw1, _ = gateways
    now = dt.datetime.now(dt.UTC)
    leaked = fleet.device_with_validity("feed-ghost", now - dt.timedelta(minutes=5),
                                        now + dt.timedelta(days=1))
    assert connect(leaked, gw1).connect() == NOT_AUTHORIZED
    [reject] = gw1.wait_events("feed-ghost", event="reject")
    assert (reject["reason"], reject["serial"]) == ("unregistered", leaked.serial)
    known = enrolled(fleet, gateways, "feed-known")
    assert connect(known, gw1).connect() == ACCEPTED


def test_gateways_ride_out_a_ca_outage(tmp_path: Path, connect: Callable[..., Client]) -> None:
    """The CA service stops: both gateways say so on /healthz (still 200: the state is
    young) and keep admitting good devices and refusing revoked ones; a gateway restarted
    meanwhile starts from its feed_cache; when the CA is back a new revocation reaches
    both and cuts the device off at each."""
    fleet = Fleet.create(tmp_path)
    good, bad, later = (fleet.device(name) for name in ("out-good", "out-bad", "out-later"))

    def attempt(device: Device, hub: RunningHub) -> Client:
        return connect(device, hub, ca=fleet.ca)

    with ExitStack() as stack:
        ca = stack.enter_context(CAServiceProcess(fleet.pki))
        gw1 = stack.enter_context(gateway(fleet, ca, "gw-1"))
        gw2 = stack.enter_context(gateway(fleet, ca, "gw-2"))
        with changes(gw1, gw2):
            provision(fleet, "revoke", "out-bad")
        assert ca.stop() == 0
        for hub in (gw1, gw2):
            wait_healthz(hub, lambda status, body: status == 200 and not body["revocation"][0]
                         ["ok"], timeout=CATCH_UP)
            assert attempt(good, hub).connect() == ACCEPTED
            assert attempt(bad, hub).connect() == NOT_AUTHORIZED
        assert gw1.stop() == 0
        assert (gw1.config.parent / "fleet-state.json").is_file()
        gw1 = stack.enter_context(RunningHub.start(gw1.config))  # the CA is still down
        assert any("starting from the cache" in line for line in gw1.log), gw1.log
        assert attempt(good, gw1).connect() == ACCEPTED
        assert attempt(bad, gw1).connect() == NOT_AUTHORIZED
        ca = stack.enter_context(ca.again())
        live = [attempt(later, hub) for hub in (gw1, gw2)]
        assert [client.connect() for client in live] == [ACCEPTED, ACCEPTED]
        with changes(gw1, gw2, timeout=CATCH_UP):
            provision(fleet, "revoke", "out-later")
        assert all(client.wait_disconnected(5) for client in live)
        for hub in (gw1, gw2):
            assert hub.wait_events("out-later", event="kick")[-1]["reason"] == "revoked"


def test_healthz_names_the_feed(gateways: tuple[RunningHub, RunningHub]) -> None:
    """Each gateway's /healthz shows the feed it follows: its own name, a version."""
    for name, hub in zip(("gw-1", "gw-2"), gateways, strict=True):
        _, body = wait_healthz(hub, lambda status, _body: status == 200)
        assert body["feed"]["gateway"] == name
        assert body["feed"]["version"] >= 1
        assert body["feed"]["stale"] is False
