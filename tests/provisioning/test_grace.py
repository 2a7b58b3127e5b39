"""The superseded grace (DESIGN section 10): a renewal records when it superseded the old
certificate; once the fleet's renew_grace has passed, a sweep revokes it with reason
superseded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.registry import SCHEMA_VERSION, Registry
from provisioning.timefmt import iso, parse_iso, utcnow
from tests.provisioning.csrs import make_csr, make_key


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
        conn.execute("ALTER TABLE certificates DROP COLUMN superseded_at")
        conn.execute("PRAGMA user_version = 2")
    upgraded = utcnow().replace(microsecond=0)
    with Registry(pki_dir / "registry.db") as registry:
        assert registry.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = dict(registry.conn.execute(
            "SELECT serial, superseded_at FROM certificates").fetchall())
        assert registry.verify_audit().ok
    assert rows[new] is None
    assert parse_iso(rows[old]) >= upgraded
