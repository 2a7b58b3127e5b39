"""A renewed certificate's old session ends with its grace (DESIGN section 10, issue 14): a
real ``fleet-provision serve`` with ``renew_grace`` 2 s, real EST ``simplereenroll`` over
mutual TLS (the device agent's own client), a real hub on the same registry.

Two devices renew. One keeps its MQTT session on the old certificate: once the grace has
passed the service revokes that certificate (reason superseded) and the hub closes the
session as it closes any revoked one (kick ``revoked``). The other switches its persistent
session to the new certificate within the grace: it stays connected, and its QoS 1 flow
goes on after the sweep; its old certificate is refused on reconnect without touching the
live session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from device_sim.agent import ESTRenewal
from device_sim.factory import new_key
from device_sim.lab import CAServiceProcess, Enrolled
from device_sim.lab.policy import ensure_service_cert, set_policy
from provisioning.authority import Authority
from provisioning.serial import format_serial
from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135
GRACE = "2s"
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    fleet = Fleet.create(tmp_path_factory.mktemp("superseded"))
    set_policy(fleet.pki, "365d", GRACE)
    ensure_service_cert(fleet.pki)
    return fleet


@pytest.fixture(scope="module")
def ca(fleet: Fleet) -> Iterator[CAServiceProcess]:
    with CAServiceProcess(fleet.pki) as service:
        yield service


def _renew(ca: CAServiceProcess, trust: Path, device: Enrolled) -> Enrolled:
    """simplereenroll with the device's current certificate; the new files beside it."""
    async def renew() -> Enrolled:
        async with aiohttp.ClientSession() as session:
            renewed = await ESTRenewal(ca.url, trust, session).renew(
                device.device_id, device.cert, device.key, new_key())
        cert = device.cert.with_name(f"{device.device_id}.renewed.pem")
        key = device.key.with_name(f"{device.device_id}.renewed.key")
        cert.write_bytes(renewed.chain_pem)
        key.write_bytes(renewed.key_pem)
        key.chmod(0o600)
        return Enrolled(device.device_id, cert, key, format_serial(renewed.cert.serial_number))
    return asyncio.run(renew())


def _operator(device: Enrolled, connect: Callable[..., Client]) -> Client:
    """The watcher, subscribed to the switcher's topics once the hub knows its group: it was
    enrolled a moment ago, and the hub takes the registry's change within its poll interval
    (until then the subscription is refused, SUBACK 0x80, and the group is looked up per
    connection, so it reconnects)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        watcher = connect(device)
        assert watcher.connect() == ACCEPTED
        if watcher.subscribe("devices/renews-and-switches/#") == [1]:
            return watcher
        watcher.close()
        assert time.monotonic() < deadline, "the hub never took the watcher's group"
        time.sleep(0.1)


def _status(pki: Path, serial: str) -> tuple[str, str | None]:
    with Authority(pki) as authority:
        row = authority.registry.certificate(serial)
    assert row is not None
    return row.status, row.reason


def _wait_status(pki: Path, serial: str, want: tuple[str, str | None]) -> tuple[str, str | None]:
    deadline = time.monotonic() + DEADLINE_S
    while (got := _status(pki, serial)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_a_session_on_a_superseded_certificate_is_closed_after_the_grace(
        fleet: Fleet, ca: CAServiceProcess, tmp_path: Path,
        connect: Callable[..., Client], hub: RunningHub) -> None:
    stays, stale = fleet.device("renews-and-switches"), fleet.device("renews-and-stays-put")
    watcher = _operator(fleet.device("watcher-1", group="operators"), connect)
    old_session = connect(stale, clean=False)
    assert old_session.connect() == ACCEPTED
    switcher = connect(stays, clean=False)
    assert switcher.connect() == ACCEPTED
    switcher.close()

    renewed_stale = _renew(ca, fleet.ca, stale)
    renewed = _renew(ca, fleet.ca, stays)
    assert _status(fleet.pki, stale.serial) == ("superseded", None)
    switched = connect(renewed, clean=False)  # within the grace: the old one is still good
    assert switched.connect() == ACCEPTED
    assert switched.session_present is True
    switched.publish("devices/renews-and-switches/t", b"before")
    assert (m := watcher.receive()) is not None
    assert m.payload == b"before"

    # The service's sweep revokes both old certificates once the grace has passed.
    for old in (stale, stays):
        assert _wait_status(fleet.pki, old.serial, ("revoked", "superseded")) == (
            "revoked", "superseded")
    assert old_session.wait_disconnected(DEADLINE_S)
    kicks = hub.wait_events("renews-and-stays-put", event="kick", timeout=DEADLINE_S)
    assert [(k["reason"], k["serial"]) for k in kicks] == [("revoked", stale.serial)]
    # The old certificate is refused without disturbing the session on the new one.
    assert connect(stays, clean=False).connect() == NOT_AUTHORIZED
    assert connect(renewed_stale).connect() == ACCEPTED
    assert not switched.disconnected.is_set()
    switched.publish("devices/renews-and-switches/t", b"after")
    assert (m := watcher.receive()) is not None
    assert m.payload == b"after"
    assert hub.wait_events("renews-and-switches", event="kick", want=0) == []
