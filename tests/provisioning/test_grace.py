"""The superseded grace (DESIGN section 10): a renewal records when it superseded the old
certificate; once the fleet's renew_grace has passed, a sweep revokes it with reason
superseded."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

from cryptography import x509

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.grace import sweep_interval
from provisioning.issuer import SignOptions
from provisioning.registry import SCHEMA_VERSION, Registry
from provisioning.serial import parse_serial
from provisioning.timefmt import iso, parse_iso, utcnow
from tests.provisioning.conftest import fleet_provision
from tests.provisioning.csrs import make_csr, make_key
from tests.provisioning.est_support import run


def _renew(authority: Authority, device_id: str) -> tuple[str, str]:
    """Issue a first certificate and renew it; (old serial, new serial)."""
    [first] = authority.issuer().sign([CSRInput("a.csr", make_csr(cn=device_id,
                                                                  key=make_key()))],
                                      SignOptions())
    [second] = authority.issuer().sign([CSRInput("b.csr", make_csr(cn=device_id,
                                                                   key=make_key()))],
                                       SignOptions(renew=True))
    assert (first.status, second.status) == ("issued", "issued")
    assert first.serial is not None
    assert second.serial is not None
    return first.serial, second.serial


def test_a_renewal_records_when_it_superseded(authority: Authority) -> None:
    """superseded_at is the renewal's time; the new certificate has none."""
    before = iso(utcnow())
    old, new = _renew(authority, "dev-g1")
    rows = dict(authority.registry.conn.execute(
        "SELECT serial, superseded_at FROM certificates").fetchall())
    assert rows[new] is None
    assert before <= rows[old] <= iso(utcnow())


def test_a_v2_registry_gives_its_superseded_certificates_a_grace_from_the_upgrade(
        pki_dir: Path) -> None:
    """Migrating to v3 adds superseded_at; certificates superseded before it count their
    grace from the upgrade, not from a renewal time v2 never kept."""
    with Authority(pki_dir) as authority:
        old, new = _renew(authority, "dev-g2")
    with sqlite3.connect(pki_dir / "registry.db") as conn:
        conn.execute("DROP INDEX certificates_superseded")  # v3's
        conn.execute("ALTER TABLE certificates DROP COLUMN superseded_at")
        conn.execute("ALTER TABLE certificates DROP COLUMN issuer_key_id")  # v4's
        conn.execute("PRAGMA user_version = 2")
    upgraded = utcnow().replace(microsecond=0)
    with Registry(pki_dir / "registry.db") as registry:
        assert registry.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = dict(registry.conn.execute(
            "SELECT serial, superseded_at FROM certificates").fetchall())
        assert registry.verify_audit().ok
    assert rows[new] is None
    assert parse_iso(rows[old]) >= upgraded


def test_the_sweep_revokes_after_the_grace_only(authority: Authority) -> None:
    """Before renew_grace has passed nothing moves (no transaction, no CRL); after it the
    old certificate is revoked with reason superseded, actor policy, one event, a new CRL
    carrying CRLReason superseded; the renewal stays good; a second sweep finds nothing."""
    old, new = _renew(authority, "dev-g3")
    grace = authority.config.renew_grace
    crl_before = (authority.paths.crl).read_bytes()
    assert authority.sweep_superseded(utcnow() + grace - dt.timedelta(seconds=2)) == []
    assert authority.paths.crl.read_bytes() == crl_before
    later = utcnow() + grace + dt.timedelta(seconds=2)
    [swept] = authority.sweep_superseded(later)
    assert (swept.device_id, swept.serial) == ("dev-g3", old)
    rows = {c.serial: (c.status, c.reason, c.revoked_at)
            for c in authority.registry.certificates("dev-g3")}
    assert rows == {old: ("revoked", "superseded", iso(later)), new: ("active", None, None)}
    [event] = authority.registry.conn.execute(
        "SELECT actor, device_id, detail FROM events WHERE action = 'certificate.revoke'"
    ).fetchall()
    assert event[:2] == ("policy", "dev-g3")
    assert json.loads(event[2]) == {"reason": "superseded", "renew_grace": "1h",
                                    "superseded_at": swept.superseded_at}
    crl = x509.load_pem_x509_crl(authority.paths.crl.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(parse_serial(old))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(parse_serial(new)) is None
    assert authority.sweep_superseded(later) == []
    assert authority.registry.verify_audit().ok


def test_a_held_superseded_certificate_waits_for_its_release(authority: Authority) -> None:
    """A suspension holds the superseded certificate too: the sweep leaves it (certificateHold
    is its CRL entry); resumed, it is superseded again and its grace, long over, ends it."""
    old, _ = _renew(authority, "dev-g4")
    later = utcnow() + authority.config.renew_grace + dt.timedelta(seconds=2)
    authority.suspend("dev-g4")
    assert authority.sweep_superseded(later) == []
    authority.resume("dev-g4")
    assert [s.serial for s in authority.sweep_superseded(later)] == [old]


def test_sweep_interval_is_a_quarter_grace_between_1_and_30_seconds() -> None:
    """DESIGN 10: every min(30 s, renew_grace / 4), at least every second."""
    assert sweep_interval(dt.timedelta(hours=1)) == 30.0
    assert sweep_interval(dt.timedelta(seconds=60)) == 15.0
    assert sweep_interval(dt.timedelta(seconds=2)) == 1.0
    assert sweep_interval(dt.timedelta(0)) == 1.0


def test_fleet_provision_crl_sweeps_first(pki_dir: Path, tmp_path: Path) -> None:
    """``fleet-provision crl`` revokes what is due before it signs: openssl crl -text shows
    the superseded certificate with reason Superseded (its renewal time moved back past the
    grace by hand, the one way to age a row without waiting an hour)."""
    with Authority(pki_dir) as authority:
        old, _ = _renew(authority, "dev-g5")
        with authority.registry.write("test") as tx:
            tx.execute("UPDATE certificates SET superseded_at = '2020-01-01T00:00:00Z' "
                       "WHERE serial = ?", (old,))
    done = fleet_provision("crl", "--pki", pki_dir, "--out", tmp_path / "out.pem")
    assert done.returncode == 0, done.stderr
    text = run("openssl", "crl", "-in", tmp_path / "out.pem", "-noout", "-text")
    assert text.returncode == 0
    assert openssl_crl_reasons(text.stdout.decode()) == {old: "Superseded"}
    with Authority(pki_dir) as authority:
        row = authority.registry.certificate(old)
    assert row is not None
    assert (row.status, row.reason) == ("revoked", "superseded")


def openssl_crl_reasons(text: str) -> dict[str, str | None]:
    """``openssl crl -text``'s entries: serial (lowercase hex) -> its CRL Reason Code line."""
    entries: dict[str, str | None] = {}
    for block in text.split("Serial Number: ")[1:]:
        lines = [line.strip() for line in block.splitlines()]
        reason = None
        if "X509v3 CRL Reason Code:" in lines:
            reason = lines[lines.index("X509v3 CRL Reason Code:") + 1]
        entries[lines[0].lower()] = reason
    return entries


def test_a_device_that_missed_its_renewal_enrolls_again(authority: Authority) -> None:
    """The runbook's recovery: the grace over, the device holds only its revoked old
    certificate; with the unclaimed new serial revoked, a first enrollment with a new key
    is issued (no --renew: the device has no active certificate left)."""
    old, new = _renew(authority, "dev-g6")
    authority.sweep_superseded(utcnow() + authority.config.renew_grace
                               + dt.timedelta(seconds=2))
    authority.revoke("dev-g6", new, "superseded")
    [again] = authority.issuer().sign([CSRInput("c.csr", make_csr(cn="dev-g6",
                                                                  key=make_key()))],
                                      SignOptions())
    assert again.status == "issued", again.reason
    statuses = {c.serial: c.status for c in authority.registry.certificates("dev-g6")}
    assert statuses == {old: "revoked", new: "revoked", again.serial: "active"}
