"""The audit store: batched writes off the caller's thread, nothing lost, and the read side."""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hub.audit import (
    EVENTS,
    AuditError,
    AuditRecord,
    AuditStats,
    AuditStore,
    parse_since,
    read_events,
    read_records,
)
from hub.errors import HubError, InvalidValueError

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hub-audit.db"


def rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        found = conn.execute(
            "SELECT event, device_id, serial, peer, reason FROM events ORDER BY id"
        ).fetchall()
    conn.close()
    return found


def test_open_creates_a_wal_database_with_the_events_table_and_indexes(db: Path) -> None:
    """open() creates the file in WAL mode with the documented columns and both indexes."""
    store = AuditStore(db)
    store.open()
    store.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
    finally:
        conn.close()
    assert columns == ["id", "time", "event", "device_id", "serial", "peer", "reason",
                       "evidence", "prev_hash", "hash"]
    assert indexes == {"events_device_time", "events_time", "events_findings"}


def test_records_from_many_threads_all_land(db: Path) -> None:
    """Eight threads recording at once: every record is committed exactly once, in batches."""
    store = AuditStore(db, batch_size=100, flush_interval=0.01)
    store.open()
    per_thread, threads = 1500, 8

    def worker(n: int) -> None:
        for i in range(per_thread):
            store.record("accept", device_id=f"dev-{n}", serial=f"{i:x}", peer="127.0.0.1:1",
                         reason=f"{n}-{i}")

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    store.close()
    reasons = [str(row[4]) for row in rows(db)]
    assert sorted(reasons) == sorted(f"{n}-{i}" for n in range(threads) for i in range(per_thread))
    stats = store.statistics()
    total = per_thread * threads
    assert stats.recorded == stats.written == total
    assert (stats.dropped, stats.queue_depth) == (0, 0)
    assert stats.batches >= total // 100
    # Each thread's records keep their order.
    for n in range(threads):
        mine = [r for r in reasons if r.startswith(f"{n}-")]
        assert mine == [f"{n}-{i}" for i in range(per_thread)]


def test_flush_commits_everything_recorded_so_far(db: Path) -> None:
    """flush() returns only once all earlier records are readable by another connection."""
    store = AuditStore(db, flush_interval=60)  # only flush() can wake the writer quickly
    store.open()
    try:
        store.record("accept", device_id="d1", serial="01", peer="10.0.0.1:5000")
        store.record("reject", device_id="d2", serial="02", peer="10.0.0.2:5000", reason="revoked")
        store.flush()
        assert rows(db) == [
            ("accept", "d1", "01", "10.0.0.1:5000", None),
            ("reject", "d2", "02", "10.0.0.2:5000", "revoked"),
        ]
        assert store.statistics() == AuditStats(
            recorded=2, written=2, dropped=0, queue_depth=0, batches=1
        )
    finally:
        store.close()


def test_close_loses_nothing_and_later_records_are_counted_dropped(db: Path) -> None:
    """A clean close writes the whole queue; a record after close is a counted drop."""
    store = AuditStore(db, flush_interval=60)
    store.open()
    for i in range(5000):
        store.record("acl-deny", device_id="d1", reason=f"publish {i}")
    store.close()
    store.close()  # idempotent
    assert len(rows(db)) == 5000
    store.record("disconnect", device_id="d1")
    stats = store.statistics()
    assert (stats.recorded, stats.written, stats.dropped, stats.queue_depth) == (5001, 5000, 1, 0)
    assert stats.batches >= 10  # at most batch_size (512) rows per transaction


def test_record_does_not_block_while_another_connection_holds_the_write_lock(db: Path) -> None:
    """With the database locked, record() still returns at once; the writer waits and retries."""
    store = AuditStore(db, flush_interval=0.01)
    store.open()
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the one write lock of a WAL database
        started = time.perf_counter()
        for i in range(2000):
            store.record("kick", device_id=f"d{i}", reason="revoked")
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5  # ~1 µs each; a disk write, let alone a lock wait, would show
        with pytest.raises(AuditError, match=r"2000 audit records not written within 0\.2 s"):
            store.flush(timeout=0.2)
        assert store.statistics().queue_depth == 2000
        blocker.execute("COMMIT")
        store.flush()
    finally:
        blocker.close()
        store.close()
    assert len(rows(db)) == 2000
    assert store.statistics().dropped == 0


def test_a_full_queue_drops_counts_and_logs_one_error(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past max_queue uncommitted records, record() drops (never blocks) and logs ERROR once."""
    store = AuditStore(db, max_queue=5)  # not open yet: nothing drains the queue
    with caplog.at_level(logging.ERROR, logger="hub.audit"):
        for i in range(8):
            store.record("accept", device_id=f"d{i}")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "audit queue full" in errors[0].getMessage()
    assert store.statistics() == AuditStats(
        recorded=8, written=0, dropped=3, queue_depth=5, batches=0
    )
    store.open()
    store.close()
    assert [row[1] for row in rows(db)] == [f"d{i}" for i in range(5)]


def test_a_row_sqlite_refuses_is_dropped_and_the_rest_of_its_batch_is_written(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone surrogate cannot be stored: that record is dropped and logged, the others land."""
    store = AuditStore(db, flush_interval=60)
    store.open()
    store.record("reject", device_id="d1", reason="client-id mismatch")
    store.record("reject", device_id="d2", reason="client id \ud800")
    store.record("reject", device_id="d3", reason="expired")
    with caplog.at_level(logging.ERROR, logger="hub.audit"):
        store.close()
    assert [row[1] for row in rows(db)] == ["d1", "d3"]
    assert store.statistics().dropped == 1
    assert any("SQLite refused" in r.getMessage() for r in caplog.records)


def test_record_refuses_an_unknown_event(db: Path) -> None:
    """The event must be one of EVENTS: a typo in the broker fails loudly in its tests."""
    store = AuditStore(db)
    with pytest.raises(ValueError, match="unknown audit event 'connect'"):
        store.record("connect")
    for event in EVENTS:
        store.record(event)
    assert store.statistics().recorded == len(EVENTS)


def test_open_fails_with_one_line_naming_the_path(tmp_path: Path) -> None:
    """A folder that does not exist: AuditError (a HubError), one line ending with the path."""
    path = tmp_path / "missing" / "hub-audit.db"
    with pytest.raises(AuditError) as caught:
        AuditStore(path).open()
    message = str(caught.value)
    assert isinstance(caught.value, HubError)
    assert "\n" not in message
    assert message.startswith("cannot create the audit store")
    assert message.endswith(f"({path})")


def test_open_fails_on_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    """A text file at the path is refused, not overwritten."""
    path = tmp_path / "hub-audit.db"
    path.write_text("not a database, just some text that is long enough to be a header\n" * 4)
    with pytest.raises(AuditError, match=r"file is not a database"):
        AuditStore(path).open()


# ---------------------------------------------------------------------------------------------
# read_events


def insert(path: Path, *events: tuple[float, str, str | None]) -> None:
    """Write rows with chosen times through a real store, then rewrite their times."""
    store = AuditStore(path)
    store.open()
    for _, event, device in events:
        store.record(event, device_id=device, serial="0a", peer="192.0.2.1:40000",
                     reason=None if event == "accept" else "revoked")
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for row_id, (when, _, _) in enumerate(events, start=1):
            conn.execute("UPDATE events SET time = ? WHERE id = ?", (when, row_id))
    finally:
        conn.close()


T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC).timestamp()


def test_read_events_returns_exact_dicts_oldest_first_with_utc_millisecond_times(
    db: Path,
) -> None:
    """Each event is exactly the documented keys (evidence null but for findings); time is
    ISO 8601 UTC, ms, with 'Z'."""
    insert(db, (T0 + 60.5, "kick", "d1"), (T0 + 0.123, "accept", "d1"))
    assert read_events(db) == [
        {"time": "2026-11-27T10:00:00.123Z", "event": "accept", "device_id": "d1",
         "serial": "0a", "peer": "192.0.2.1:40000", "reason": None, "evidence": None},
        {"time": "2026-11-27T10:01:00.500Z", "event": "kick", "device_id": "d1",
         "serial": "0a", "peer": "192.0.2.1:40000", "reason": "revoked", "evidence": None},
    ]


def test_read_records_returns_audit_records_with_epoch_times(db: Path) -> None:
    """read_records is the typed form behind read_events: epoch floats, oldest first."""
    insert(db, (T0 + 1, "reject", "d2"), (T0, "accept", "d1"))
    assert read_records(db) == [
        AuditRecord(T0, "accept", "d1", "0a", "192.0.2.1:40000", None),
        AuditRecord(T0 + 1, "reject", "d2", "0a", "192.0.2.1:40000", "revoked"),
    ]


def test_a_finding_keeps_its_evidence_as_json_text_and_reads_back_as_an_object(db: Path) -> None:
    """record(..., evidence=) stores compact JSON text; read_* decode it; None stays NULL."""
    store = AuditStore(db)
    store.open()
    evidence: dict[str, object] = {"peers": ["192.0.2.1:1", "192.0.2.2:2"], "times": [1.5, 2.5]}
    store.record("finding", device_id="d1", serial="0a", peer="192.0.2.2:2",
                 reason="certificate-shared", evidence=evidence)
    evidence["peers"] = []  # the store took a copy at record() time
    store.record("accept", device_id="d1")
    store.close()
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT evidence FROM events ORDER BY id").fetchall()
    conn.close()
    assert stored == [('{"peers":["192.0.2.1:1","192.0.2.2:2"],"times":[1.5,2.5]}',), (None,)]
    finding, accept = read_records(db)
    assert finding.evidence == {"peers": ["192.0.2.1:1", "192.0.2.2:2"], "times": [1.5, 2.5]}
    assert accept.evidence is None
    assert read_events(db)[0]["evidence"] == finding.evidence
    assert read_events(db)[0]["reason"] == "certificate-shared"


@pytest.mark.parametrize("evidence", [{"when": datetime.now(UTC)}, {"x": float("nan")},
                                      ["not", "a", "mapping"]])
def test_record_refuses_evidence_that_is_not_a_json_object(db: Path, evidence: object) -> None:
    """Evidence that cannot be a JSON object is a caller bug: ValueError, nothing queued."""
    store = AuditStore(db)
    with pytest.raises((TypeError, ValueError), match="audit evidence"):
        store.record("finding", reason="weak-key", evidence=evidence)  # type: ignore[arg-type]
    assert store.statistics().recorded == 0


def _v1_store(path: Path) -> None:
    """A store as the version 1 hub left it: six columns, user_version 1, WAL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
                 "event TEXT NOT NULL, device_id TEXT, serial TEXT, peer TEXT, reason TEXT)")
    conn.execute("CREATE INDEX events_device_time ON events (device_id, time)")
    conn.execute("CREATE INDEX events_time ON events (time)")
    conn.execute("INSERT INTO events (time, event, device_id, serial, peer, reason) "
                 "VALUES (?, 'reject', 'd0', '0b', '192.0.2.9:9', 'revoked')", (T0,))
    conn.execute("PRAGMA user_version=1")
    conn.close()


def test_a_version_1_store_is_read_as_is_and_migrated_on_open(db: Path) -> None:
    """read_* work on a v1 file (no evidence column); open() adds the column, keeps the rows."""
    _v1_store(db)
    assert read_events(db)[0]["evidence"] is None
    store = AuditStore(db)
    store.open()
    store.record("finding", device_id="d1", reason="weak-key", evidence={"bits": 1024})
    store.close()
    assert [(r.event, r.device_id, r.evidence) for r in read_records(db)] == [
        ("reject", "d0", None), ("finding", "d1", {"bits": 1024})]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 2
    conn.close()


def test_a_store_from_a_newer_hub_is_refused(db: Path) -> None:
    """A schema version this hub does not know is refused with one line, not rewritten."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(AuditError, match=r"schema version 99 is newer"):
        AuditStore(db).open()


def test_read_events_filters_by_device_since_and_limit(db: Path) -> None:
    """--device matches exactly, --since is inclusive, limit keeps the most recent N."""
    insert(
        db,
        (T0, "accept", "d1"),
        (T0 + 10, "accept", "d2"),
        (T0 + 20, "acl-deny", "d1"),
        (T0 + 30, "disconnect", "d1"),
    )
    assert [e["event"] for e in read_events(db, device_id="d1")] == [
        "accept", "acl-deny", "disconnect"
    ]
    assert [e["device_id"] for e in read_events(db, since=T0 + 10)] == ["d2", "d1", "d1"]
    assert [e["event"] for e in read_events(db, device_id="d1", since=T0 + 11)] == [
        "acl-deny", "disconnect"
    ]
    assert [e["event"] for e in read_events(db, limit=2)] == ["acl-deny", "disconnect"]
    assert read_events(db, device_id="nobody") == []
    assert all(ISO_MS_Z.match(str(e["time"])) for e in read_events(db))


def test_read_events_works_while_the_hub_is_writing(db: Path) -> None:
    """The read-only reader sees committed records while the store is still open."""
    store = AuditStore(db)
    store.open()
    try:
        store.record("accept", device_id="d1")
        store.flush()
        assert [e["device_id"] for e in read_events(db)] == ["d1"]
    finally:
        store.close()


def test_read_events_on_a_missing_file_names_it(tmp_path: Path) -> None:
    """No file: AuditError "no audit store ..." ending with the path, and no file is created."""
    path = tmp_path / "hub-audit.db"
    with pytest.raises(AuditError, match=r"^no audit store") as caught:
        read_events(path)
    assert str(caught.value).endswith(f"({path})")
    assert not path.exists()


def test_read_events_on_another_sqlite_database_says_so(tmp_path: Path) -> None:
    """A SQLite file without the events table is not an audit store."""
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE certificates (serial TEXT)")
    conn.close()
    with pytest.raises(AuditError, match=r"^not an audit store: .*registry\.db\)$"):
        read_events(path)


# ---------------------------------------------------------------------------------------------
# parse_since

NOW = T0 + 3600


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T10:00:00Z", T0),
        ("2026-11-27T10:00:00", T0),  # naive: UTC, as the store prints
        ("2026-11-27T11:00:00+01:00", T0),
        ("2026-11-27T10:00:00.250Z", T0 + 0.25),
        ("2026-11-27 10:00", T0),
        ("2026-11-27", T0 - 10 * 3600),
        ("30s", NOW - 30),
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1w", NOW - 604800),
        ("1h30m", NOW - 5400),
        ("1.5h", NOW - 5400),
        ("  10m ", NOW - 600),
    ],
)
def test_parse_since_accepts_iso_8601_and_durations(text: str, expected: float) -> None:
    """ISO 8601 (Z, offset, naive=UTC, date only) and durations ago, combined or decimal."""
    assert parse_since(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "yesterday", "10", "10y", "-5m", "m10", "2026-13-01",
                                  "10 minutes"])
def test_parse_since_refuses_anything_else_with_a_clear_message(text: str) -> None:
    """Anything else is an InvalidValueError (a ValueError) showing both accepted forms."""
    with pytest.raises(ValueError, match=r"is not a time: want ISO 8601 .* or a duration") as e:
        parse_since(text, now=NOW)
    assert isinstance(e.value, InvalidValueError)


def test_parse_since_uses_the_current_time_by_default() -> None:
    """Without now=, a duration counts back from time.time()."""
    assert parse_since("1h") == pytest.approx(time.time() - 3600, abs=5)
