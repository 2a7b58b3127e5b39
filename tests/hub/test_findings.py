"""The audit checks' logic (hub.findings) on in-memory fakes and real certificates.

Time is a fake clock; the gatekeeper is the real one over a hand-set snapshot; a "live
connection" is a record whose kick does nothing, so a session that outlives its kick is made
by construction (the in-process stand-in for a close that never completes). The real hub,
real TLS and real clients are in tests/integration/test_hub_findings.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hub.config import AuthConfig, ChecksConfig
from hub.errors import QuarantineError
from hub.findings import quarantine
from hub.findings.engine import UNREGISTERED_GRACE, Findings
from hub.findings.keys import key_problem
from hub.findings.model import Finding
from hub.findings.reporter import Reporter
from hub.findings.sweep import KICK_DEADLINE
from hub.findings.takeovers import Takeover, TakeoverDetector
from hub.gatekeeper import Gatekeeper
from hub.identity import DeviceIdentity
from hub.revocation import Snapshot
from tests.hub.test_gatekeeper import FakeClock, FakeConnection, FakeMetrics, FakeWatcher

NOW = 1_800_000_000.0
DAY = 86_400.0
EMPTY: MappingProxyType[str, str] = MappingProxyType({})


@dataclass
class EvidenceAudit:
    """The audit store as the findings see it (contract C2's record with evidence)."""

    rows: list[dict[str, object]] = field(default_factory=list)

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None,
               evidence: Mapping[str, object] | None = None) -> None:
        self.rows.append({"event": event, "device_id": device_id, "serial": serial,
                          "peer": peer, "reason": reason, "evidence": evidence})

    def findings(self, check: str | None = None) -> list[dict[str, object]]:
        return [r for r in self.rows if r["event"] == "finding"
                and (check is None or r["reason"] == check)]


@dataclass
class FakeBundle:
    certificates: tuple[x509.Certificate, ...]
    generation: int = 1


def _identity(device: str, serial: int, days_left: float = 365.0) -> DeviceIdentity:
    return DeviceIdentity(device, serial, NOW + days_left * DAY, "00", "fleet.test")


def _snapshot(revoked: Mapping[int, str] | None = None,
              certificates: Mapping[str, frozenset[int]] | None = None) -> Snapshot:
    return Snapshot(MappingProxyType(dict(revoked or {})), EMPTY, EMPTY, 1,
                    certificates=None if certificates is None
                    else MappingProxyType(dict(certificates)))


Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _cert(key: Key, *, days: float = 365.0, ca: bool = False) -> x509.Certificate:
    """A self-signed certificate on *key* (its own signer: only its key and dates matter)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA" if ca else "dev")])
    now = dt.datetime.fromtimestamp(NOW, dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@dataclass
class Rig:
    findings: Findings
    gatekeeper: Gatekeeper
    watcher: FakeWatcher
    audit: EvidenceAudit
    clock: FakeClock
    bundle: FakeBundle
    sessions: list[FakeConnection]


def _rig(tmp_path: Path, *, action: str = "report", registered_only: bool = False,
         ca_days: float = 3650.0, warn_days: int = 30) -> Rig:
    clock = FakeClock(NOW)
    watcher = FakeWatcher(_snapshot())
    audit = EvidenceAudit()
    gatekeeper = Gatekeeper(AuthConfig(registered_only=registered_only), watcher, audit,
                            FakeMetrics(), "fleet.test", clock=clock)
    config = ChecksConfig(action="quarantine" if action == "quarantine" else "report",
                          warn_days=warn_days, shared_window_seconds=60.0,
                          quarantine_file=tmp_path / "quarantine.json")
    bundle = FakeBundle((_cert(ec.generate_private_key(ec.SECP256R1()), days=ca_days,
                               ca=True),))
    findings = Findings(config, gatekeeper, audit, lambda: bundle, tmp_path / "ca.pem",
                        clock=clock)
    sessions: list[FakeConnection] = []
    findings.sessions = lambda: sessions
    return Rig(findings, gatekeeper, watcher, audit, clock, bundle, sessions)


# -- take-overs -------------------------------------------------------------------------------


def _takeover(t: float, old: int, old_peer: str, new: int, new_peer: str) -> Takeover:
    return Takeover(NOW + t, "dev-1", old, old_peer, new, new_peer)


def test_one_takeover_is_not_a_finding_two_of_one_certificate_are() -> None:
    """A half-open connection taken over once is normal; A then B then A is a clone."""
    detector = TakeoverDetector(60.0)
    assert detector.observe(_takeover(0, 7, "10.0.0.1:1000", 7, "10.0.0.2:2000")) is None
    found = detector.observe(_takeover(5, 7, "10.0.0.2:2000", 7, "10.0.0.1:1001"))
    assert found is not None
    assert (found.check, found.serial, found.device_id) == ("certificate-shared", "07", "dev-1")
    assert found.evidence["peers"] == ["10.0.0.1:1000", "10.0.0.2:2000", "10.0.0.1:1001"]
    assert [t["from_peer"] for t in found.evidence["takeovers"]] == [  # type: ignore[attr-defined]
        "10.0.0.1:1000", "10.0.0.2:2000"]
    assert found.quarantine == ((7, "dev-1"),)


def test_takeovers_further_apart_than_the_window_are_not_a_finding() -> None:
    detector = TakeoverDetector(60.0)
    assert detector.observe(_takeover(0, 7, "a:1", 7, "b:2")) is None
    assert detector.observe(_takeover(61, 7, "b:2", 7, "a:3")) is None
    detector.prune(NOW + 200)
    assert len(detector) == 0


def test_two_certificates_fighting_over_a_client_id_is_a_conflict() -> None:
    detector = TakeoverDetector(60.0)
    assert detector.observe(_takeover(0, 1, "a:1", 2, "b:2")) is None  # a renewal: once
    found = detector.observe(_takeover(3, 2, "b:2", 1, "a:3"))
    assert found is not None
    assert (found.check, found.subject, found.serial) == ("client-id-conflict", "dev-1", "01")
    assert found.evidence["serials"] == ["01", "02"]
    assert set(found.quarantine) == {(1, "dev-1"), (2, "dev-1")}


def test_a_renewal_then_its_own_reconnect_is_neither_check() -> None:
    """Old -> new once (a conflict history of one), then new -> new once (shared of one)."""
    detector = TakeoverDetector(60.0)
    assert detector.observe(_takeover(0, 1, "a:1", 2, "a:2")) is None
    assert detector.observe(_takeover(1, 2, "a:2", 2, "a:3")) is None


# -- reporting --------------------------------------------------------------------------------


def test_a_finding_is_recorded_once_per_subject_and_period() -> None:
    audit = EvidenceAudit()
    reporter = Reporter(audit, 60.0)
    shared = Finding("certificate-shared", "07", "dev-1", "07", "a:1", {"peers": ["a:1"]})
    expiring = Finding("certificate-expiring", "07", "dev-1", "07", "a:1", {})
    assert reporter.report(shared, NOW)
    assert not reporter.report(shared, NOW + 59)
    assert reporter.report(shared, NOW + 60)
    assert reporter.report(expiring, NOW)
    assert not reporter.report(expiring, NOW + DAY - 1)
    reporter.prune(NOW + DAY)
    assert reporter.report(expiring, NOW + DAY)
    assert reporter.counts()["certificate-shared"] == 2
    assert reporter.counts()["certificate-expiring"] == 2
    assert reporter.counts()["weak-key"] == 0
    assert audit.rows[0] == {"event": "finding", "device_id": "dev-1", "serial": "07",
                             "peer": "a:1", "reason": "certificate-shared",
                             "evidence": {"peers": ["a:1"]}}


# -- key quality ------------------------------------------------------------------------------


CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})


def test_rsa_below_the_minimum_and_a_curve_not_allowed_are_weak() -> None:
    rsa1024 = _cert(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    assert key_problem(rsa1024.public_bytes(Encoding.DER), 2048, CURVES) == {
        "algorithm": "RSA", "bits": 1024, "min_rsa_bits": 2048}
    p224 = _cert(ec.generate_private_key(ec.SECP224R1()))
    assert key_problem(p224.public_bytes(Encoding.DER), 2048, CURVES) == {
        "algorithm": "EC", "curve": "secp224r1", "curves": sorted(CURVES)}


def test_healthy_keys_pass() -> None:
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()):
        assert key_problem(_cert(key).public_bytes(Encoding.DER), 2048, CURVES) is None


# -- the engine's pass ------------------------------------------------------------------------


def test_a_refused_session_still_open_past_the_deadline_is_a_finding(tmp_path: Path) -> None:
    """The kick of FakeConnection closes nothing: the session stays among the open ones."""
    rig = _rig(tmp_path)
    session = FakeConnection("dev-1", _identity("dev-1", 9))
    rig.sessions.append(session)

    async def main() -> None:
        rig.gatekeeper.attach(session)
        rig.watcher.snapshot = _snapshot({9: "revoked"})
        rig.gatekeeper.revocation_changed(_snapshot(), rig.watcher.snapshot)
        await rig.gatekeeper.drain()
        await rig.findings.sweep()  # first seen
        rig.clock.now += KICK_DEADLINE - 0.1
        await rig.findings.sweep()
        assert rig.audit.findings() == []
        rig.clock.now += 0.1
        await rig.findings.sweep()

    asyncio.run(main())
    assert session.kicks == ["revoked"]
    [row] = rig.audit.findings()
    assert (row["reason"], row["device_id"], row["serial"]) == (
        "revoked-still-connected", "dev-1", "09")
    evidence = row["evidence"]
    assert isinstance(evidence, Mapping)
    assert evidence["status"] == "revoked"
    assert evidence["open_seconds"] == KICK_DEADLINE


def test_a_session_that_closes_in_time_is_not_a_finding(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    session = FakeConnection("dev-1", _identity("dev-1", 9))
    rig.sessions.append(session)
    rig.watcher.snapshot = _snapshot({9: "revoked"})

    async def main() -> None:
        await rig.findings.sweep()
        rig.sessions.clear()  # closed within the deadline
        rig.clock.now += KICK_DEADLINE
        await rig.findings.sweep()

    asyncio.run(main())
    assert rig.audit.findings() == []


def test_expiring_certificates_and_cas_are_reported_once_a_day(tmp_path: Path) -> None:
    rig = _rig(tmp_path, ca_days=10, warn_days=30)
    rig.sessions.append(FakeConnection("soon", _identity("soon", 1, days_left=0.5)))
    rig.sessions.append(FakeConnection("later", _identity("later", 2, days_left=31)))

    async def main() -> None:
        await rig.findings.sweep()
        rig.clock.now += 3600
        await rig.findings.sweep()

    asyncio.run(main())
    [device] = rig.audit.findings("certificate-expiring")
    assert (device["device_id"], device["serial"]) == ("soon", "01")
    assert device["evidence"]["days_left"] == 0.5  # type: ignore[index]
    [ca] = rig.audit.findings("ca-expiring")
    assert ca["device_id"] is None
    assert ca["evidence"]["subject"] == "CN=Test CA"  # type: ignore[index]


def test_a_new_bundle_is_looked_at_at_once(tmp_path: Path) -> None:
    rig = _rig(tmp_path, ca_days=3650)

    async def main() -> None:
        await rig.findings.sweep()
        assert rig.audit.findings("ca-expiring") == []
        rig.bundle.certificates = (_cert(ec.generate_private_key(ec.SECP256R1()), days=5,
                                         ca=True),)
        rig.bundle.generation = 2
        await rig.findings.sweep()

    asyncio.run(main())
    assert len(rig.audit.findings("ca-expiring")) == 1


def test_an_unregistered_certificate_is_reported_after_the_grace(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    rig.watcher.snapshot = _snapshot(certificates={"dev-1": frozenset({1})})
    der = _cert(ec.generate_private_key(ec.SECP256R1())).public_bytes(Encoding.DER)

    async def main() -> None:
        rig.findings.admitted(_identity("dev-1", 1), der, "a:1")  # listed
        rig.findings.admitted(_identity("dev-1", 2), der, "a:2")  # signed, never recorded
        await rig.findings.sweep()
        assert rig.audit.findings() == []
        rig.clock.now += UNREGISTERED_GRACE
        await rig.findings.sweep()

    asyncio.run(main())
    [row] = rig.audit.findings()
    assert (row["reason"], row["serial"]) == ("unregistered-certificate", "02")
    assert row["evidence"]["listed_serials"] == ["01"]  # type: ignore[index]


def test_a_serial_listed_within_the_grace_is_not_reported(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    rig.watcher.snapshot = _snapshot(certificates={})

    async def main() -> None:
        rig.findings.admitted(_identity("new", 5), None, "a:1")
        await rig.findings.sweep()
        rig.watcher.snapshot = _snapshot(certificates={"new": frozenset({5})})
        rig.clock.now += UNREGISTERED_GRACE
        await rig.findings.sweep()

    asyncio.run(main())
    assert rig.audit.findings() == []


def test_a_certificate_revoked_since_its_admission_is_not_unregistered(tmp_path: Path) -> None:
    """The lists hold valid serials only: a revoked one drops out, and is not unregistered."""
    rig = _rig(tmp_path)
    rig.watcher.snapshot = _snapshot(certificates={"dev-1": frozenset({1})})

    async def main() -> None:
        rig.findings.admitted(_identity("dev-1", 1), None, "a:1")
        await rig.findings.sweep()
        rig.watcher.snapshot = _snapshot({1: "revoked"}, certificates={"dev-1": frozenset()})
        rig.clock.now += UNREGISTERED_GRACE
        await rig.findings.sweep()

    asyncio.run(main())
    assert rig.audit.findings() == []


def test_a_weak_key_is_found_once_per_serial(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    weak = _cert(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    der = weak.public_bytes(Encoding.DER)

    async def main() -> None:
        rig.findings.admitted(_identity("dev-1", 3), der, "a:1")
        await rig.findings.sweep()
        rig.findings.admitted(_identity("dev-1", 3), der, "a:2")
        await rig.findings.sweep()

    asyncio.run(main())
    [row] = rig.audit.findings("weak-key")
    assert row["evidence"] == {"algorithm": "RSA", "bits": 1024, "min_rsa_bits": 2048}


# -- quarantine -------------------------------------------------------------------------------


def test_quarantine_closes_refuses_persists_and_is_cleared_by_the_file(tmp_path: Path) -> None:
    rig = _rig(tmp_path, action="quarantine")
    live = FakeConnection("dev-1", _identity("dev-1", 7))
    shared = Finding("certificate-shared", "07", "dev-1", "07", "a:1", {"peers": ["a:1"]},
                     ((7, "dev-1"),))
    path = tmp_path / "quarantine.json"

    async def main() -> None:
        await rig.findings.start()
        rig.gatekeeper.attach(live)
        rig.findings.found(shared)
        await rig.gatekeeper.drain()
        assert live.kicks == ["quarantined"]
        assert rig.gatekeeper.lost(rig.watcher.snapshot, live.identity) == "quarantined"
        await rig.findings.sweep()  # writes the file
        assert set(quarantine.read(path)) == {7}
        quarantine.clear(path, [7])  # what `fleet-hub quarantine clear` does
        await rig.findings.sweep()
        await rig.findings.stop()

    asyncio.run(main())
    assert rig.gatekeeper.quarantined == set()
    [row] = rig.audit.findings()
    assert row["evidence"] == {"peers": ["a:1"], "action": "quarantine"}


def test_a_restarted_hub_refuses_what_the_file_holds(tmp_path: Path) -> None:
    quarantine.add(tmp_path / "quarantine.json", [quarantine.entry(7, "dev-1", "weak-key",
                                                                   "2026-01-01T00:00:00Z")])
    rig = _rig(tmp_path, action="quarantine")

    async def main() -> None:
        await rig.findings.start()
        await rig.findings.stop()

    asyncio.run(main())
    assert rig.gatekeeper.quarantined == {7}


def test_report_action_and_expiry_checks_never_quarantine(tmp_path: Path) -> None:
    reporting = _rig(tmp_path)
    shared = Finding("certificate-shared", "07", "dev-1", "07", "a:1", {}, ((7, "dev-1"),))
    reporting.findings.found(shared)
    assert reporting.gatekeeper.quarantined == set()
    quarantining = _rig(tmp_path, action="quarantine")
    quarantining.findings.found(replace(shared, check="certificate-expiring"))
    assert quarantining.gatekeeper.quarantined == set()


def test_the_file_keeps_both_writers_entries_and_refuses_a_foreign_file(
        tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    quarantine.add(path, [quarantine.entry(1, "a", "weak-key", "t1")])
    quarantine.add(path, [quarantine.entry(2, "b", "certificate-shared", "t2"),
                          quarantine.entry(1, "a", "weak-key", "t3")])
    entries = quarantine.read(path)
    assert {s: e.since for s, e in entries.items()} == {1: "t1", 2: "t2"}
    assert [e.serial for e in quarantine.clear(path, [1, 3])] == ["01"]
    assert json.loads(path.read_text())["quarantined"][0]["serial"] == "02"
    path.write_text('{"serials": []}')
    with pytest.raises(QuarantineError, match="not one fleet-hub wrote"):
        quarantine.read(path)


# -- fleet-hub quarantine ---------------------------------------------------------------------


def test_quarantine_cli_lists_clears_and_refuses_bad_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import main
    from tests.integration.fleet import Fleet

    fleet = Fleet.create(tmp_path)
    config = fleet.write_config(extra='[checks]\nquarantine_file = "q.json"\n')
    quarantine.add(tmp_path / "q.json", [quarantine.entry(0x0A, "dev-1", "weak-key",
                                                          "2026-12-03T10:00:00.000Z")])
    assert main(["quarantine", "list", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"serial": "0a", "device_id": "dev-1", "check": "weak-key",
         "since": "2026-12-03T10:00:00.000Z"}]
    assert main(["quarantine", "clear", "zz", "--config", str(config)]) == 2
    assert capsys.readouterr().err == ("error: SERIAL: 'zz' is not a hexadecimal serial (as "
                                       "`fleet-hub quarantine list` prints it)\n")
    assert main(["quarantine", "list"]) == 2
    assert "--config: missing" in capsys.readouterr().err
    assert main(["quarantine", "clear", "0x0A", "--config", str(config)]) == 0
    assert capsys.readouterr().out == ("cleared 0a (dev-1, weak-key since "
                                       "2026-12-03T10:00:00.000Z)\n")
    assert quarantine.read(tmp_path / "q.json") == {}


# -- the fleet's serials without registered_only ----------------------------------------------


def test_serials_read_for_the_checks_alone_move_no_revocation_version() -> None:
    """Without registered_only the watcher lists certificates for unregistered-certificate
    only: an enrollment changes the lists but not the version, and tells no one (scripts wait
    for the version to grow after a revocation; an enrollment must not look like one)."""
    from hub.config import RevocationConfig
    from hub.revocation import MemorySource, RevocationWatcher

    source = MemorySource()
    changes: list[int] = []
    watcher = RevocationWatcher(RevocationConfig(), (), lambda _o, new: changes.append(
        new.version), sources=[source], certificates=True, versioned_certificates=False)

    async def main() -> None:
        source.set(certificates={"dev-1": [1]})
        await watcher.start()
        version = watcher.snapshot.version
        source.set(certificates={"dev-1": [1], "dev-2": [2]})
        await watcher.refresh()
        assert watcher.snapshot.version == version
        assert watcher.snapshot.certificates == {"dev-1": {1}, "dev-2": {2}}
        assert changes == []
        source.set(revoked={2: "revoked"}, certificates={"dev-1": [1]})
        await watcher.refresh()
        assert watcher.snapshot.version == version + 1
        assert changes == [version + 1]
        await watcher.stop()

    asyncio.run(main())


def test_a_quarantine_file_fleet_hub_did_not_write_stops_the_start(tmp_path: Path) -> None:
    """Refusing nothing because the file is unreadable would open the gate it was closing:
    the hub does not start, and says which file (one line, exit 1 from fleet-hub serve)."""
    (tmp_path / "quarantine.json").write_text("not json\n")
    rig = _rig(tmp_path, action="quarantine")
    with pytest.raises(QuarantineError, match=r"^the quarantine file .*quarantine\.json is "
                       r"not one fleet-hub wrote: "):
        asyncio.run(rig.findings.start())
