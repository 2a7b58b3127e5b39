"""The audit store's hash chain: written by the real writer, checked by verify, and every kind of
tampering (edit, delete, reorder, rewrite, truncate) named at the first record it touches."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from hub.audit import AuditStore, read_records
from hub.audit.chain import GENESIS, seal
from hub.audit.checkpoint import CheckpointTrust
from hub.audit.verify import ChainReport, verify_store
from hub.errors import AuditError

NO_TRUST = CheckpointTrust(frozenset(), ())  # no checkpoints in these stores


def write(path: Path, count: int, **kwargs: object) -> None:
    """*count* records through a real AuditStore (small batches: several transactions)."""
    store = AuditStore(path, batch_size=7)
    store.open()
    for i in range(count):
        store.record("reject" if i % 3 else "accept", device_id=f"dev-{i % 4}", serial=f"{i:02x}",
                     peer=f"192.0.2.{i % 250}:4{i:04d}", reason=None if i % 3 == 0 else "revoked",
                     **kwargs)  # type: ignore[arg-type]
    store.close()


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def verify(path: Path, anchors: list[tuple[int, str]] | None = None) -> ChainReport:
    return verify_store(path, NO_TRUST, anchors or [])


def problem(path: Path, anchors: list[tuple[int, str]] | None = None) -> str:
    report = verify(path, anchors)
    assert report.problem is not None, "verify found nothing"
    return str(report.problem)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "hub-audit.db"
    write(path, 40)
    return path


def test_a_store_written_by_the_writer_verifies(db: Path) -> None:
    """Every record sealed, linked from genesis, head on the last: ok, 40 records."""
    report = verify(db)
    assert report.ok, report.problem
    assert (report.records, report.first and report.first[0], report.last and report.last[0]) \
        == (40, 1, 40)
    records = read_records(db)
    assert all(r.hash is not None and len(r.hash) == 64 for r in records)


def test_seal_matches_the_documented_json_encoding() -> None:
    """The fast path is byte for byte json.dumps([...], separators, ensure_ascii=False)."""
    import hashlib

    fields = (7, 1764770000.123456, "finding", "dév-1", None, "[::1]:5", 'a "b"\n',
              '{"x":1}', GENESIS)
    body = json.dumps(list(fields), separators=(",", ":"), ensure_ascii=False)
    assert seal(*fields) == hashlib.sha256(body.encode()).hexdigest()


def test_records_written_across_reopens_and_with_evidence_chain_on(tmp_path: Path) -> None:
    """A second hub run continues the chain from the stored head; evidence is sealed too."""
    path = tmp_path / "a.db"
    write(path, 5)
    store = AuditStore(path)
    store.open()
    store.record("finding", device_id="d1", reason="weak-key", evidence={"bits": 1024})
    store.close()
    assert verify(path).records == 6
    sql(path, """UPDATE events SET evidence = '{"bits":2048}' WHERE id = 6""")
    assert problem(path).startswith("record #6 (")
    assert "altered after it was written" in problem(path)


def test_an_edited_reason_is_named_with_its_id_and_time(db: Path) -> None:
    """sqlite3 UPDATE of one reason: record #17, its time, altered."""
    when = read_records(db)[16].time
    sql(db, "UPDATE events SET reason = 'client-id mismatch' WHERE id = 17")
    report = verify(db)
    assert report.problem is not None
    assert (report.problem.record_id, report.problem.time) == (17, when)
    assert "altered after it was written" in report.problem.what
    assert report.records == 16  # the records before it hold


def test_an_edited_time_says_it_is_out_of_order(db: Path) -> None:
    """A time moved back is altered, and the hint says the time is earlier than before."""
    sql(db, "UPDATE events SET time = time - 3600 WHERE id = 9")
    assert "earlier than the record before it" in problem(db)


def test_a_deleted_record_is_named_missing(db: Path) -> None:
    """DELETE of #12: missing #12, between #11 and #13 with their times."""
    sql(db, "DELETE FROM events WHERE id = 12")
    text = problem(db)
    assert text.startswith("record #12: missing: #12 removed, between #11 (")
    assert "and #13 (" in text


def test_several_deleted_records_are_named_as_a_range(db: Path) -> None:
    sql(db, "DELETE FROM events WHERE id BETWEEN 20 AND 24")
    assert problem(db).startswith("record #20: missing: #20..#24 removed")


def test_records_deleted_from_the_start_without_a_checkpoint(db: Path) -> None:
    """Pruning by hand (no checkpoint) shows: #1..#3 are gone from the start."""
    sql(db, "DELETE FROM events WHERE id <= 3")
    assert problem(db).startswith("record #1: missing: records #1..#3 are gone from the start")


def test_reordered_records_are_named(db: Path) -> None:
    """Two whole rows swapped (ids exchanged): #5 holds what was sealed as #6."""
    sql(db, "UPDATE events SET id = -1 WHERE id = 5", "UPDATE events SET id = 5 WHERE id = 6",
        "UPDATE events SET id = 6 WHERE id = -1")
    text = problem(db)
    assert text.startswith("record #5 (")
    assert "holds what was sealed as record #6: records were moved or reordered" in text


def test_a_record_rewritten_with_a_recomputed_hash_is_named(db: Path) -> None:
    """An editor who knows the algorithm reseals #10: #11's prev_hash still names the old #10,
    so #10 is named, rewritten."""
    conn = sqlite3.connect(db, isolation_level=None)
    row = conn.execute("SELECT id, time, event, device_id, serial, peer, reason, evidence, "
                       "prev_hash FROM events WHERE id = 10").fetchone()
    forged = seal(row[0], row[1], row[2], row[3], row[4], row[5], "nothing to see", row[7],
                  row[8])
    conn.execute("UPDATE events SET reason = 'nothing to see', hash = ? WHERE id = 10",
                 (forged,))
    conn.close()
    text = problem(db)
    assert text.startswith("record #10 (")
    assert "rewritten with a new hash: record #11 sealed another one for it" in text


def test_a_truncated_tail_is_named_from_the_head(db: Path) -> None:
    """The last five records deleted: the store's head still names #40."""
    sql(db, "DELETE FROM events WHERE id > 35")
    text = problem(db)
    assert text.startswith("record #36: missing: #36..#40 removed from the end")
    assert "the last record left is #35 (" in text


def test_the_hub_keeps_writing_after_a_truncation_and_the_gap_shows(db: Path) -> None:
    """Deleted from the end, then the hub writes on: the new record follows the head, so the
    gap is named as missing records, not as the end."""
    sql(db, "DELETE FROM events WHERE id > 38")
    write(db, 2)
    assert problem(db).startswith("record #39: missing: #39..#40 removed, between #38")


def test_a_truncation_with_a_rewritten_head_needs_an_anchor(db: Path) -> None:
    """The documented limit: whoever also rewrites meta.head hides a truncation from the file
    alone; a record shipped elsewhere (--anchor) still shows it."""
    shipped = read_records(db)[-1]
    assert shipped.id == 40
    assert shipped.hash is not None
    kept = read_records(db)[34]
    sql(db, "DELETE FROM events WHERE id > 35",
        f"UPDATE meta SET value = '35:{kept.hash}' WHERE key = 'head'")
    assert verify(db).ok  # undetectable from the file alone
    text = problem(db, [(40, shipped.hash)])
    assert text.startswith("record #40: missing: shipped elsewhere (--anchor) but no longer")
    assert verify(db, [(35, str(kept.hash))]).ok


def test_an_anchor_catches_a_chain_recomputed_from_an_edit_on(db: Path) -> None:
    """Reseal everything from #30 on (and the head): only a shipped hash can tell."""
    shipped = read_records(db)[29]
    conn = sqlite3.connect(db, isolation_level=None)
    rows = conn.execute("SELECT id, time, event, device_id, serial, peer, reason, evidence, "
                        "prev_hash FROM events WHERE id >= 30 ORDER BY id").fetchall()
    prev = rows[0][8]
    for row in rows:
        reason = "edited" if row[0] == 30 else row[6]
        digest = seal(row[0], row[1], row[2], row[3], row[4], row[5], reason, row[7], prev)
        conn.execute("UPDATE events SET reason = ?, prev_hash = ?, hash = ? WHERE id = ?",
                     (reason, prev, digest, row[0]))
        prev = digest
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (f"40:{prev}",))
    conn.close()
    assert verify(db).ok
    assert problem(db, [(30, str(shipped.hash))]).startswith(
        "record #30: differs from the copy shipped elsewhere")


def test_an_unsealed_record_and_a_store_without_a_chain(tmp_path: Path, db: Path) -> None:
    """A hash set to NULL is named; a v1 file no hub of this version opened is an AuditError."""
    sql(db, "UPDATE events SET hash = NULL WHERE id = 3")
    assert problem(db).startswith("record #3 (")
    old = tmp_path / "v1.db"
    sql(old, "CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
        "event TEXT NOT NULL, device_id TEXT, serial TEXT, peer TEXT, reason TEXT)")
    with pytest.raises(AuditError, match=r"has no hash chain yet"):
        verify(old)


def _v1(path: Path, count: int) -> None:
    sql(path, "PRAGMA journal_mode=WAL",
        "CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, event TEXT NOT NULL, "
        "device_id TEXT, serial TEXT, peer TEXT, reason TEXT)",
        "CREATE INDEX events_device_time ON events (device_id, time)",
        "CREATE INDEX events_time ON events (time)",
        *(f"INSERT INTO events (time, event, device_id, serial, peer, reason) VALUES "
          f"({1764770000 + i}.25, 'accept', 'old-{i}', '0{i % 10}', '192.0.2.1:1', NULL)"
          for i in range(count)),
        "DELETE FROM events WHERE id = 4",  # a v1 store may have gaps: they stay, chained
        "PRAGMA user_version=1")


def test_a_version_1_store_is_sealed_on_open_and_verifies(tmp_path: Path) -> None:
    """The writer seals the old rows (from genesis, gaps and all) before the new ones;
    meta.migrated says how many and from which version."""
    path = tmp_path / "v1.db"
    _v1(path, 12000)  # more than one backlog transaction
    write(path, 10)
    report = verify(path)
    assert report.ok, report.problem
    assert report.records == 11999 + 10
    assert report.migrated is not None
    assert (report.migrated["from_version"], report.migrated["records"],
            report.migrated["last_id"]) == (1, 11999, 12000)
    records = read_records(path)
    assert [r.id for r in records[:4]] == [1, 2, 3, 5]
    assert records[-1].id == 12010
    assert records[11999].device_id == "dev-0"  # the first new record follows the old ones


def test_a_migrated_record_edited_afterwards_is_named(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    _v1(path, 20)
    write(path, 1)
    sql(path, "UPDATE events SET device_id = 'someone-else' WHERE id = 7")
    assert problem(path).startswith("record #7 (")


def test_verify_reads_a_consistent_snapshot_while_the_hub_writes(tmp_path: Path) -> None:
    """verify on an open store, between batches: always ok (records and head in one read)."""
    path = tmp_path / "live.db"
    store = AuditStore(path, batch_size=50, flush_interval=0.005)
    store.open()
    try:
        for round_ in range(20):
            for i in range(200):
                store.record("accept", device_id=f"d{round_}", serial=f"{i:x}")
            report = verify(path)
            assert report.ok, report.problem
        store.flush()
        assert verify(path).records == 4000
    finally:
        store.close()


def test_an_edited_hash_is_told_from_edited_fields(db: Path) -> None:
    """Only the stored hash of #8 changed: its fields still seal to what #9 continues from."""
    sql(db, "UPDATE events SET hash = '" + "ab" * 32 + "' WHERE id = 8")
    text = problem(db)
    assert text.startswith("record #8 (")
    assert text.endswith("its stored hash was altered; its fields are as written (record #9 "
                         "continues from them)")
