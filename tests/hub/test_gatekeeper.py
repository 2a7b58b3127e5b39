"""The gatekeeper's admit, evict and expiry paths, on in-memory fakes: no sleep, no patching.

Certificates are real (our CA); time is a :class:`FakeClock`, the revocation state a snapshot
set by hand, the audit and the metrics lists, a live connection a record of its kicks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hub.config import AuthConfig
from hub.gatekeeper import Gatekeeper
from hub.identity import DeviceIdentity, identity_from_der
from hub.revocation import Snapshot
from tests.integration.fleet import TRUST_DOMAIN, Fleet


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@dataclass
class FakeWatcher:
    snapshot: Snapshot


@dataclass
class FakeAudit:
    rows: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None) -> None:
        del serial, peer
        self.rows.append((event, device_id, reason))


@dataclass
class FakeMetrics:
    calls: list[str] = field(default_factory=list)

    def accepted(self) -> None:
        self.calls.append("accepted")

    def refused(self, reason: str) -> None:
        self.calls.append(f"refused {reason}")

    def kicked(self, reason: str) -> None:
        self.calls.append(f"kicked {reason}")

    def connection_opened(self) -> None:
        self.calls.append("opened")

    def connection_closed(self) -> None:
        self.calls.append("closed")


@dataclass
class FakeConnection:
    client_id: str
    identity: DeviceIdentity
    peer: str = "127.0.0.1:4242"
    kicks: list[str] = field(default_factory=list)

    async def kick(self, reason: str) -> None:
        self.kicks.append(reason)


def _snapshot(revoked: dict[int, str] | None = None) -> Snapshot:
    empty: MappingProxyType[str, str] = MappingProxyType({})
    return Snapshot(MappingProxyType(revoked or {}), empty, empty, 1)


@dataclass
class Gate:
    gatekeeper: Gatekeeper
    clock: FakeClock
    watcher: FakeWatcher
    audit: FakeAudit
    metrics: FakeMetrics


@pytest.fixture(scope="module")
def der(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    fleet = Fleet.create(tmp_path_factory.mktemp("fleet"))
    cert = x509.load_pem_x509_certificate(fleet.device("gate-1").cert.read_bytes())
    return cert.public_bytes(Encoding.DER)


@pytest.fixture
def identity(der: bytes) -> DeviceIdentity:
    found = identity_from_der(der)
    assert isinstance(found, DeviceIdentity)
    return found


@pytest.fixture
def gate(identity: DeviceIdentity) -> Gate:
    clock = FakeClock(identity.not_after - 3600)
    watcher, audit, metrics = FakeWatcher(_snapshot()), FakeAudit(), FakeMetrics()
    gatekeeper = Gatekeeper(AuthConfig(), watcher, audit, metrics, TRUST_DOMAIN, clock=clock)
    return Gate(gatekeeper, clock, watcher, audit, metrics)


def test_a_valid_certificate_naming_the_client_id_is_admitted(gate: Gate, der: bytes) -> None:
    decision = asyncio.run(gate.gatekeeper.admit(der, "gate-1", None, "127.0.0.1:1"))
    assert decision.accepted
    assert gate.audit.rows == [("accept", "gate-1", None)]
    assert gate.metrics.calls == ["accepted"]


def test_a_certificate_past_its_not_after_by_the_clock_is_refused(
        gate: Gate, der: bytes, identity: DeviceIdentity) -> None:
    gate.clock.now = identity.not_after
    decision = asyncio.run(gate.gatekeeper.admit(der, "gate-1", None, "127.0.0.1:1"))
    assert (decision.accepted, decision.reason) == (False, "expired")
    assert gate.audit.rows == [("reject", "gate-1", "expired")]


def test_a_revoked_serial_is_refused_before_the_client_id(gate: Gate, der: bytes,
                                                          identity: DeviceIdentity) -> None:
    gate.watcher.snapshot = _snapshot({identity.serial: "revoked"})
    decision = asyncio.run(gate.gatekeeper.admit(der, "someone-else", None, "127.0.0.1:1"))
    assert decision.reason == "revoked"


def test_sweep_kicks_a_live_connection_at_its_not_after_and_not_before(
        gate: Gate, identity: DeviceIdentity) -> None:
    connection = FakeConnection("gate-1", identity)

    async def main() -> None:
        gate.gatekeeper.attach(connection)
        gate.clock.now = identity.not_after - 0.001
        gate.gatekeeper.sweep()
        await gate.gatekeeper.drain()
        assert connection.kicks == []
        gate.clock.now = identity.not_after
        gate.gatekeeper.sweep()
        await gate.gatekeeper.drain()

    asyncio.run(main())
    assert connection.kicks == ["expired"]
    assert gate.gatekeeper.live == {}
    assert gate.audit.rows == [("kick", "gate-1", "expired")]
    assert gate.metrics.calls == ["opened", "closed", "kicked expired"]


def test_a_revocation_kicks_the_live_connection_once(gate: Gate,
                                                     identity: DeviceIdentity) -> None:
    connection = FakeConnection("gate-1", identity)
    revoked = _snapshot({identity.serial: "on-hold"})

    async def main() -> None:
        gate.gatekeeper.attach(connection)
        gate.gatekeeper.revocation_changed(gate.watcher.snapshot, revoked)
        gate.gatekeeper.revocation_changed(revoked, revoked)  # already gone: no second kick
        await gate.gatekeeper.drain()

    asyncio.run(main())
    assert connection.kicks == ["on-hold"]
    assert gate.audit.rows == [("kick", "gate-1", "on-hold")]


def test_a_revocation_between_decision_and_attach_still_kicks(
        gate: Gate, identity: DeviceIdentity) -> None:
    """The decision was taken on an older snapshot: attach checks the current one."""
    connection = FakeConnection("gate-1", identity)
    gate.watcher.snapshot = _snapshot({identity.serial: "revoked"})

    async def main() -> None:
        gate.gatekeeper.attach(connection)
        await gate.gatekeeper.drain()

    asyncio.run(main())
    assert connection.kicks == ["revoked"]
    assert gate.gatekeeper.live == {}


def test_detaching_an_old_connection_leaves_the_new_one_tracked(
        gate: Gate, identity: DeviceIdentity) -> None:
    """A take-over: the old connection's end must not untrack its successor."""
    old, new = FakeConnection("gate-1", identity), FakeConnection("gate-1", identity)
    gate.gatekeeper.attach(old)
    gate.gatekeeper.detach("gate-1", old)
    gate.gatekeeper.attach(new)
    gate.gatekeeper.detach("gate-1", old)
    assert gate.gatekeeper.live == {"gate-1": new}


def test_expiring_counts_live_sessions_by_how_soon_their_certificate_ends(
        gate: Gate, identity: DeviceIdentity) -> None:
    """The figures behind fleet_hub_certificates_expiring{within}: by the clock, a boundary
    counts in its window; a session that left no longer counts; nothing is kicked."""
    connection = FakeConnection("gate-1", identity)

    async def main() -> None:
        gatekeeper = gate.gatekeeper
        assert gatekeeper.expiring() == {"7d": 0, "1d": 0}
        gatekeeper.attach(connection)
        gate.clock.now = identity.not_after - 7 * 86400 - 1
        assert gatekeeper.expiring() == {"7d": 0, "1d": 0}
        gate.clock.now = identity.not_after - 7 * 86400
        assert gatekeeper.expiring() == {"7d": 1, "1d": 0}
        gate.clock.now = identity.not_after - 86400
        assert gatekeeper.expiring() == {"7d": 1, "1d": 1}
        assert gatekeeper.expiring((("1h", 3600.0),)) == {"1h": 0}
        gatekeeper.detach("gate-1", connection)
        assert gatekeeper.expiring() == {"7d": 0, "1d": 0}

    asyncio.run(main())
    assert connection.kicks == []


def test_a_quarantined_serial_is_refused_and_its_live_session_closed(
        gate: Gate, der: bytes, identity: DeviceIdentity) -> None:
    """hub.findings fills ``quarantined`` ([checks] action = "quarantine"): refused with
    reason quarantined, and a live session on it is lost at the next state change."""
    connection = FakeConnection("gate-1", identity)

    async def main() -> None:
        gate.gatekeeper.attach(connection)
        gate.gatekeeper.quarantined.add(identity.serial)
        gate.gatekeeper.revocation_changed(gate.watcher.snapshot, gate.watcher.snapshot)
        await gate.gatekeeper.drain()
        decision = await gate.gatekeeper.admit(der, "gate-1", None, "127.0.0.1:1")
        assert (decision.accepted, decision.reason) == (False, "quarantined")

    asyncio.run(main())
    assert connection.kicks == ["quarantined"]
    assert gate.audit.rows == [("kick", "gate-1", "quarantined"),
                               ("reject", "gate-1", "quarantined")]
