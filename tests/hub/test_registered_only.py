"""``[auth] registered_only``: only serials the registry (or the feed) lists for the device.

A certificate signed by the real issuing key but never recorded in the registry (a leaked key,
a mis-issuance: minted here with cryptography from the issuing key and the device profile) is
refused ``unregistered``, after the revocation checks and before the client id; the same
device's recorded certificate is admitted; a live session whose serial stops being listed is
kicked like a revoked one. The registry is read by the real registry source; the audit and the
metrics are the gatekeeper tests' fakes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.factory import new_key
from hub.config import AuthConfig, RevocationConfig
from hub.gatekeeper import Gatekeeper
from hub.identity import DeviceIdentity, identity_from_der
from hub.revocation import MemorySource, RevocationWatcher, load_ca_bundle
from hub.revocation.model import EMPTY_SNAPSHOT
from provisioning.authority import Authority
from provisioning.profile import device_certificate, random_serial
from tests.hub.test_gatekeeper import FakeAudit, FakeConnection, FakeMetrics, FakeWatcher
from tests.integration.fleet import TRUST_DOMAIN, Device, Fleet

PEER = "127.0.0.1:4242"


def _der(device: Device) -> bytes:
    cert = x509.load_pem_x509_certificate(device.cert.read_bytes())
    return cert.public_bytes(Encoding.DER)


def _identity(der: bytes) -> DeviceIdentity:
    found = identity_from_der(der)
    assert isinstance(found, DeviceIdentity)
    return found


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def recorded(fleet: Fleet) -> bytes:
    """reg-1's certificate as the CA issued and recorded it."""
    return _der(fleet.device("reg-1"))


@pytest.fixture(scope="module")
def minted(fleet: Fleet, recorded: bytes) -> bytes:
    """A certificate for reg-1 (recorded one first) from the issuing key and the device
    profile, bypassing the registry: never recorded."""
    del recorded
    now = dt.datetime.now(dt.UTC)
    with Authority(fleet.pki) as authority:
        cert = device_certificate(authority.ca, authority.config, "reg-1",
                                  new_key().public_key(), random_serial(),
                                  now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    return cert.public_bytes(Encoding.DER)


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def _registry_gate(fleet: Fleet, *, registered_only: bool,
                         ) -> AsyncIterator[tuple[Gatekeeper, FakeAudit, FakeMetrics]]:
    watcher = RevocationWatcher(RevocationConfig(registry=fleet.pki / "registry.db",
                                                 refresh_seconds=60),
                                load_ca_bundle(fleet.ca), certificates=registered_only)
    await watcher.start()
    audit, metrics = FakeAudit(), FakeMetrics()
    try:
        yield (Gatekeeper(AuthConfig(registered_only=registered_only), watcher, audit, metrics,
                          TRUST_DOMAIN), audit, metrics)
    finally:
        await watcher.stop()


def test_a_recorded_certificate_is_admitted_and_a_minted_one_refused_unregistered(
        fleet: Fleet, recorded: bytes, minted: bytes) -> None:
    """Both chain to the issuing CA; only the one in the registry gets in."""
    assert _identity(minted).device_id == "reg-1"

    async def scenario() -> None:
        async for gate, audit, metrics in _registry_gate(fleet, registered_only=True):
            ok = await gate.admit(recorded, "reg-1", None, PEER)
            refused = await gate.admit(minted, "reg-1", None, PEER)
            assert ok.accepted
            assert (refused.accepted, refused.reason) == (False, "unregistered")
            assert "reg-1" in (refused.detail or "")
            assert audit.rows == [("accept", "reg-1", None), ("reject", "reg-1", "unregistered")]
            assert metrics.calls == ["accepted", "refused unregistered"]

    _run(scenario)


def test_without_registered_only_a_minted_certificate_is_admitted(
        fleet: Fleet, minted: bytes) -> None:
    """The default (CRL semantics): what the CA signed and nothing refuses gets in."""
    async def scenario() -> None:
        async for gate, _, _ in _registry_gate(fleet, registered_only=False):
            assert gate.watcher.snapshot.certificates is None  # not even read
            assert (await gate.admit(minted, "reg-1", None, PEER)).accepted

    _run(scenario)


def test_unregistered_comes_after_revocation_and_before_the_client_id(
        fleet: Fleet, minted: bytes) -> None:
    """A revoked unregistered serial says revoked; an unregistered one with a wrong client id
    says unregistered."""
    identity = _identity(minted)

    async def scenario() -> None:
        source = MemorySource()
        source.set(revoked={identity.serial: "revoked"}, certificates={})
        watcher = RevocationWatcher.over([source])
        await watcher.start()
        gate = Gatekeeper(AuthConfig(registered_only=True), watcher, FakeAudit(), FakeMetrics(),
                          TRUST_DOMAIN)
        assert (await gate.admit(minted, "someone", None, PEER)).reason == "revoked"
        source.set(certificates={})
        await watcher.refresh()
        assert (await gate.admit(minted, "someone", None, PEER)).reason == "unregistered"
        await watcher.stop()

    _run(scenario)


def test_no_certificate_list_at_all_admits_nobody(minted: bytes) -> None:
    """registered_only with sources that list no certificates never opens up."""
    identity = _identity(minted)

    async def scenario() -> None:
        watcher = RevocationWatcher.over([MemorySource()])
        await watcher.start()
        gate = Gatekeeper(AuthConfig(registered_only=True), watcher, FakeAudit(), FakeMetrics(),
                          TRUST_DOMAIN)
        decision = await gate.admit(minted, identity.device_id, None, PEER)
        assert decision.reason == "unregistered"
        await watcher.stop()

    _run(scenario)


def test_a_live_session_whose_serial_stops_being_listed_is_kicked(
        fleet: Fleet, recorded: bytes) -> None:
    """The sweep on change: listed -> admitted and tracked; no longer listed -> kicked
    ``unregistered``, audited and counted; listed in another source -> stays."""
    identity = _identity(recorded)

    async def scenario() -> None:
        one, two = MemorySource("one"), MemorySource("two")
        one.set(certificates={"reg-1": [identity.serial]})
        two.set(certificates={"reg-1": [1, 2]})
        audit, metrics = FakeAudit(), FakeMetrics()
        gate = Gatekeeper(AuthConfig(registered_only=True), FakeWatcher(EMPTY_SNAPSHOT), audit,
                          metrics, TRUST_DOMAIN)
        watcher = RevocationWatcher.over([one, two], on_change=gate.revocation_changed)
        gate.watcher = watcher
        await watcher.start()
        assert watcher.snapshot.certificates == {"reg-1": frozenset({identity.serial, 1, 2})}
        assert (await gate.admit(recorded, "reg-1", None, PEER)).accepted
        connection = FakeConnection("reg-1", identity)
        gate.attach(connection)
        two.set(certificates={"reg-1": [identity.serial]})
        one.set(certificates={"reg-1": [3]})
        await watcher.refresh()
        await gate.drain()
        assert connection.kicks == []  # two still lists it
        two.set(certificates={})
        await watcher.refresh()
        await gate.drain()
        assert connection.kicks == ["unregistered"]
        assert audit.rows[-1] == ("kick", "reg-1", "unregistered")
        assert metrics.calls[-1] == "kicked unregistered"
        await watcher.stop()

    _run(scenario)


def test_the_registry_source_lists_valid_serials_when_asked(fleet: Fleet) -> None:
    """certificates=True: each device's active or superseded serials from the registry."""
    device = fleet.device("reg-2")
    serial = int(device.serial, 16)

    async def scenario() -> None:
        watcher = RevocationWatcher(RevocationConfig(registry=fleet.pki / "registry.db"),
                                    load_ca_bundle(fleet.ca), certificates=True)
        await watcher.start()
        listed = watcher.snapshot.certificates
        assert listed is not None
        assert serial in listed["reg-2"]
        await watcher.stop()

    _run(scenario)
