"""The audit log is hash-chained: any alteration, deletion or reordering is found and named."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr


@pytest.fixture
def busy_pki(pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> Path:
    """A PKI with a few dozen audit events: issue, revoke, suspend, resume, CRLs."""
    for i in range(5):
        (tmp_path / f"d{i}.csr").write_bytes(make_csr(cn=f"d{i}"))
    cli("sign", "--pki", pki_dir, "--out", tmp_path / "o", tmp_path)
    cli("revoke", "--pki", pki_dir, "d0", "--reason", "keyCompromise")
    cli("suspend", "--pki", pki_dir, "d1")
    cli("resume", "--pki", pki_dir, "d1")
    cli("crl", "--pki", pki_dir)
    return pki_dir


def _db(pki: Path) -> sqlite3.Connection:
    return sqlite3.connect(pki / "registry.db", isolation_level=None)


def test_every_action_is_recorded_and_the_chain_verifies(
        busy_pki: Path, cli: Callable[..., CliResult]) -> None:
    """Each CA action leaves an event with who, what, device and serial; verify passes."""
    actions = [r[0] for r in _db(busy_pki).execute("SELECT action FROM events ORDER BY id")]
    assert actions[0] == "pki.init"
    for expected in ("device.create", "certificate.issue", "certificate.revoke",
                     "device.revoke", "device.suspend", "device.resume", "crl.publish"):
        assert expected in actions
    actor, serial = _db(busy_pki).execute(
        "SELECT actor, serial FROM events WHERE action = 'certificate.revoke'").fetchone()
    assert "@" in actor
    assert serial
    result = cli("audit", "verify", "--pki", busy_pki)
    assert result.code == 0
    assert result.out == f"audit chain ok: {len(actions)} events\n"


def test_altered_event_is_named(busy_pki: Path, cli: Callable[..., CliResult]) -> None:
    """Changing any field of a record breaks its hash."""
    _db(busy_pki).execute("UPDATE events SET device_id = 'd4' WHERE id = 7")
    result = cli("audit", "verify", "--pki", busy_pki)
    assert result.code == 1
    assert result.err.startswith("error: audit chain broken at event #7: event #7 was altered")


def test_rehashed_alteration_is_caught_by_the_next_record(
        busy_pki: Path, cli: Callable[..., CliResult]) -> None:
    """Recomputing the altered record's own hash still breaks the link to the next one."""
    from provisioning.registry.audit import seal

    db = _db(busy_pki)
    row = db.execute("SELECT id, time, actor, action, device_id, serial, detail, prev_hash "
                     "FROM events WHERE id = 5").fetchone()
    forged = seal(row[0], row[1], "mallory@evil", *row[3:])
    db.execute("UPDATE events SET actor = 'mallory@evil', hash = ? WHERE id = 5", (forged,))
    result = cli("audit", "verify", "--pki", busy_pki)
    assert result.code == 1
    assert "at event #6: event #6 does not follow the record before it" in result.err


def test_deleted_event_is_named(busy_pki: Path, cli: Callable[..., CliResult]) -> None:
    """A gap in the chain names the missing record."""
    _db(busy_pki).execute("DELETE FROM events WHERE id = 4")
    result = cli("audit", "verify", "--pki", busy_pki)
    assert result.code == 1
    assert "at event #4: event #4 is missing (next is #5)" in result.err


def test_deleted_tail_is_found(busy_pki: Path, cli: Callable[..., CliResult]) -> None:
    """Removing the newest records is caught by the head the registry keeps."""
    db = _db(busy_pki)
    last = db.execute("SELECT max(id) FROM events").fetchone()[0]
    db.execute("DELETE FROM events WHERE id >= ?", (last - 1,))
    result = cli("audit", "verify", "--pki", busy_pki)
    assert result.code == 1
    assert f"the chain ends at event #{last - 2} but the registry's head says #{last}" \
        in result.err


def test_reordered_events_are_named(busy_pki: Path, cli: Callable[..., CliResult]) -> None:
    """Swapping two records' contents breaks the chain at the first of them."""
    db = _db(busy_pki)
    cols = "time, actor, action, device_id, serial, detail, prev_hash, hash"
    a = db.execute(f"SELECT {cols} FROM events WHERE id = 3").fetchone()
    b = db.execute(f"SELECT {cols} FROM events WHERE id = 4").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    db.execute(f"UPDATE events SET {sets} WHERE id = 3", b)
    db.execute(f"UPDATE events SET {sets} WHERE id = 4", a)
    result = cli("audit", "verify", "--pki", busy_pki)
    assert result.code == 1
    assert "broken at event #3" in result.err


@pytest.mark.parametrize("text", ["plain", "", 'quote " and \\ backslash', "line\nbreak\t\x00\x1f",
                                  "é ünïcode 😀 \u2028", "</script>"])
def test_seal_is_the_canonical_json_array(text: str) -> None:
    """The seal hashes exactly json.dumps([...], separators=(",", ":"), ensure_ascii=False)."""
    import hashlib
    import json

    from provisioning.registry.audit import seal

    for device_id, serial in ((text, text), (None, None), (None, "ab01")):
        fields = [7, text, f"{text}@host", text, device_id, serial, json.dumps({"k": text}),
                  "0" * 64]
        body = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
        assert seal(*fields) == hashlib.sha256(body.encode("utf-8")).hexdigest()  # type: ignore[arg-type]
