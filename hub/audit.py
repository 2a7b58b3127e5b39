"""The audit store: every connect decision, ACL denial and kick, in SQLite, written off the loop.

The broker's event loop only calls :meth:`AuditStore.record`, which appends to an in-memory queue
under a lock held for a few bytecodes: it never touches the disk and never waits for the writer.
One background thread drains the queue and writes batches (``executemany`` inside one
``BEGIN IMMEDIATE`` transaction each) to a WAL-mode database. When the database is busy (another
process holds the write lock) or the disk fails, the thread keeps the batch and retries with
backoff; the loop notices nothing. Records are dropped (counted, logged once per episode) only
when the queue holds ``max_queue`` records not yet committed, or when a row cannot be stored at
all (a string SQLite refuses, such as a lone surrogate).

``fleet-hub events`` reads the store with :func:`read_events` (or the typed :func:`read_records`),
read-only, while the hub runs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hub.errors import AuditError, InvalidValueError

__all__ = [
    "EVENTS",
    "AuditError",
    "AuditRecord",
    "AuditStats",
    "AuditStore",
    "format_time",
    "parse_since",
    "read_events",
    "read_records",
]

log = logging.getLogger(__name__)

# accept / reject (with reason) / acl-deny / kick (revocation, expiry) / disconnect;
# violation: an MQTT protocol violation closed the connection ("protocol-violation: what");
# limit: a [limits] value was hit (packet-too-large, rate-limited, topic-too-long,
# too-many-subscriptions, retained-quota, pending-tls); source: a revocation source went
# down, stale, or came back ("registry down: why"); finding: an audit check saw something
# (reason = the check's name, evidence = what it saw, DESIGN section 11).
EVENTS = ("accept", "reject", "acl-deny", "kick", "disconnect", "violation", "limit", "source",
          "finding")
_EVENT_SET = frozenset(EVENTS)

# 1: the six columns; 2: + evidence (JSON text, NULL when none), added in place on open.
_SCHEMA_VERSION = 2
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        event TEXT NOT NULL,
        device_id TEXT,
        serial TEXT,
        peer TEXT,
        reason TEXT,
        evidence TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_device_time ON events (device_id, time)",
    "CREATE INDEX IF NOT EXISTS events_time ON events (time)",
)
_INSERT = (
    "INSERT INTO events (time, event, device_id, serial, peer, reason, evidence) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The writer's own busy wait is short: it retries with its own backoff so that close() and
# flush() deadlines are honoured even while another connection holds the write lock.
_BUSY_TIMEOUT = 0.05
_RETRY_MIN, _RETRY_MAX = 0.01, 0.5


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of the store; ``time`` is seconds since the epoch (``time.time()``).

    ``evidence`` is the decoded JSON object a ``finding`` carries, None for other events.
    """

    time: float
    event: str
    device_id: str | None
    serial: str | None
    peer: str | None
    reason: str | None
    evidence: Mapping[str, object] | None = None

    def as_json(self) -> dict[str, object]:
        """The ``fleet-hub events --json`` form: ``time`` as ISO 8601 UTC with milliseconds."""
        return {
            "time": format_time(self.time),
            "event": self.event,
            "device_id": self.device_id,
            "serial": self.serial,
            "peer": self.peer,
            "reason": self.reason,
            "evidence": None if self.evidence is None else dict(self.evidence),
        }


# What the queue holds: a plain tuple in column order, ~15x cheaper to build than AuditRecord
# (a frozen dataclass) and bound by executemany as it is. evidence is JSON text already.
_Row = tuple[float, str, str | None, str | None, str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class AuditStats:
    """A snapshot of the store's counters: ``recorded == written + dropped + queue_depth``.

    ``recorded`` counts every call to ``record()``; ``dropped`` those refused for a full queue,
    made after ``close()``, or that SQLite could not store; ``queue_depth`` the records accepted
    but not yet committed (including a batch being retried); ``batches`` committed transactions.
    """

    recorded: int
    written: int
    dropped: int
    queue_depth: int
    batches: int


class AuditStore:
    """Audit records queued by the event loop and committed in batches by one writer thread.

    ``record()`` may be called from any thread, before ``open()`` too (records wait in the
    queue). ``open()`` and ``close()`` do disk I/O: call them at start-up and shutdown, not from
    a coroutine on the hot path.
    """

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int = 512,
        flush_interval: float = 0.1,
        max_queue: int = 1_000_000,
    ) -> None:
        if batch_size < 1 or max_queue < 1 or not flush_interval > 0:
            raise ValueError("batch_size and max_queue must be at least 1, flush_interval > 0")
        self.path = Path(path)
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_queue = max_queue
        self._queue: deque[_Row] = deque()
        self._lock = threading.Lock()
        self._settled_cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        # Counters, all guarded by _lock. accepted = entered the queue; settled = left it for
        # good (committed, or refused by SQLite); flush() waits for settled to reach accepted.
        self._recorded = 0
        self._accepted = 0
        self._written = 0
        self._settled = 0
        self._dropped = 0
        self._batches = 0
        self._overflowing = False
        self._warned_closed = False
        self._last_error: str | None = None

    # -- the loop's side --------------------------------------------------------------------

    def record(
        self,
        event: str,
        *,
        device_id: str | None = None,
        serial: str | None = None,
        peer: str | None = None,
        reason: str | None = None,
        evidence: Mapping[str, object] | None = None,
    ) -> None:
        """Queue one record stamped with ``time.time()``; never blocks, never touches the disk.

        *evidence* (findings) is encoded to JSON text here, so later changes to the mapping do
        not reach the store; findings are rare, the common events pass None and pay nothing.
        Raises ValueError for an event not in EVENTS or evidence that is not JSON-serialisable,
        TypeError for evidence that is not a mapping (bugs in the caller, not runtime states).
        """
        if event not in _EVENT_SET:
            raise ValueError(f"unknown audit event {event!r}: want one of {', '.join(EVENTS)}")
        encoded = None if evidence is None else _encode_evidence(evidence)
        item: _Row = (time.time(), event, device_id, serial, peer, reason, encoded)
        wake = overflow = after_close = False
        with self._lock:
            self._recorded += 1
            if self._closed:
                self._dropped += 1
                after_close = not self._warned_closed
                self._warned_closed = True
            elif self._accepted - self._settled >= self._max_queue:
                self._dropped += 1
                overflow = not self._overflowing
                self._overflowing = True
            else:
                self._accepted += 1
                self._queue.append(item)
                wake = len(self._queue) == self._batch_size
        if wake:
            self._wake.set()
        elif overflow:
            log.error(
                "audit queue full (%d records not yet written to %s): dropping audit records "
                "until the writer catches up; last write error: %s",
                self._max_queue, self.path, self._last_error or "none",
            )
        elif after_close:
            log.warning("audit store %s is closed: dropping audit records", self.path)

    def statistics(self) -> AuditStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return AuditStats(
                recorded=self._recorded,
                written=self._written,
                dropped=self._dropped,
                queue_depth=self._accepted - self._settled,
                batches=self._batches,
            )

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the file and table if needed, switch to WAL and start the writer thread."""
        if self._thread is not None or self._closed:
            raise AuditError(f"the audit store is already open or closed ({self.path})")
        try:
            conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise AuditError(f"cannot create the audit store: {exc} ({self.path})") from exc
        try:
            mode = _prepare(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise AuditError(f"cannot create the audit store: {exc} ({self.path})") from exc
        if mode != "wal":
            conn.close()
            raise AuditError(f"cannot switch the audit store to WAL, got {mode} ({self.path})")
        # From here on only the writer thread uses the connection.
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="hub-audit-writer", daemon=True
        )
        self._thread.start()

    def flush(self, timeout: float = 5.0) -> None:
        """Block until every record queued before the call is committed (or refused by SQLite).

        Raises AuditError if that takes longer than *timeout* seconds (say, the database stays
        locked by another process); nothing is lost, the writer keeps trying.
        """
        with self._lock:
            target = self._accepted
            if self._settled >= target:
                return
            if self._thread is None:
                raise AuditError(f"the audit store is not open ({self.path})")
        self._wake.set()
        with self._settled_cond:
            if self._settled_cond.wait_for(lambda: self._settled >= target, timeout):
                return
            pending = target - self._settled
        raise AuditError(self._late(pending, timeout))

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, stop the writer and close the database; idempotent.

        Records made after close() are counted as dropped. Raises AuditError if the writer has
        not finished within *timeout*; it then keeps trying in the background until exit.
        """
        with self._lock:
            self._closed = True
            self._stopping = True
            thread = self._thread
        if thread is None:
            return
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            raise AuditError(self._late(self.statistics().queue_depth, timeout))
        self._thread = None

    def _late(self, pending: int, timeout: float) -> str:
        error = f"; last error: {self._last_error}" if self._last_error else ""
        return (
            f"{pending} audit records not written within {timeout:g} s{error} ({self.path})"
        )

    # -- the writer thread ------------------------------------------------------------------

    def _run(self, conn: sqlite3.Connection) -> None:
        pending: deque[_Row] = deque()
        delay = _RETRY_MIN
        try:
            while True:
                self._wake.wait(self._flush_interval)
                self._wake.clear()
                with self._lock:
                    stopping = self._stopping
                    # Swap the whole queue out: record() never waits for more than this.
                    if self._queue and not pending:
                        pending, self._queue = self._queue, deque()
                while pending:
                    count = min(self._batch_size, len(pending))
                    batch = list(itertools.islice(pending, count))
                    if not self._write(conn, batch):
                        break
                    for _ in range(count):
                        pending.popleft()
                    delay = _RETRY_MIN
                if pending:
                    # Busy or failing disk: keep the batch and retry after a growing pause.
                    time.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
                    self._wake.set()
                    continue
                if stopping:
                    with self._lock:
                        if not self._queue:
                            return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[_Row]) -> bool:
        """Commit *batch* in one transaction; False (batch kept) if SQLite is busy or failing."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, batch)
            except (sqlite3.InterfaceError, sqlite3.ProgrammingError, UnicodeError):
                # A row SQLite refuses would block every later record: store the rest.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                written = self._write_rows(conn, batch)
            else:
                written = len(batch)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):  # a failing disk may refuse this too
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if self._last_error is None:
                log.warning("audit store %s: write failed, retrying: %s", self.path, exc)
            self._last_error = str(exc)
            return False
        if self._last_error is not None:
            log.info("audit store %s: writing again", self.path)
            self._last_error = None
        with self._settled_cond:
            self._written += written
            self._dropped += len(batch) - written
            self._settled += len(batch)
            self._batches += 1
            if self._overflowing and self._accepted - self._settled < self._max_queue // 2:
                self._overflowing = False
            self._settled_cond.notify_all()
        return True

    def _write_rows(self, conn: sqlite3.Connection, batch: list[_Row]) -> int:
        refused: list[tuple[_Row, Exception]] = []
        for item in batch:
            try:
                conn.execute(_INSERT, item)
            except (sqlite3.InterfaceError, sqlite3.ProgrammingError, UnicodeError) as exc:
                refused.append((item, exc))
        for item, problem in refused:
            log.error("audit record dropped, SQLite refused it (%s): %r", problem, item)
        return len(batch) - len(refused)


def _encode_evidence(evidence: Mapping[str, object]) -> str:
    if not isinstance(evidence, Mapping):
        raise TypeError(f"audit evidence must be a mapping, got {type(evidence).__name__}")
    try:
        return json.dumps(dict(evidence), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit evidence is not JSON-serialisable: {exc}") from None


def _decode_evidence(text: str | None) -> Mapping[str, object] | None:
    """The stored JSON object; text that is not one (edited by hand) comes back as ``raw``."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"raw": text}


def _prepare(conn: sqlite3.Connection) -> str:
    """Switch to WAL, create or migrate the schema; return the journal mode SQLite chose."""
    mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    # NORMAL in WAL mode survives a crash of the hub; a power cut may lose the last batches,
    # the price of not waiting for fsync on every commit.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        _check_version(conn)
        for statement in _SCHEMA:
            conn.execute(statement)
        if "evidence" not in _columns(conn):  # a version 1 store: add the column in place
            conn.execute("ALTER TABLE events ADD COLUMN evidence TEXT")
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT * 1000)}")
    return mode


def _check_version(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > _SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this hub's {_SCHEMA_VERSION}"
        )


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [str(row[1]) for row in conn.execute("PRAGMA table_info(events)")]


# -- reading ----------------------------------------------------------------------------------


def format_time(seconds: float) -> str:
    """``2026-11-27T10:00:00.123Z``: ISO 8601, UTC, milliseconds."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_records(
    path: Path,
    *,
    device_id: str | None = None,
    since: float | None = None,
    limit: int | None = None,
) -> list[AuditRecord]:
    """Records oldest first; the file is opened read-only, safe while the hub writes.

    *since* keeps events at or after that epoch time; *limit* keeps the most recent *limit*
    events (still oldest first, like ``tail``).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    path = Path(path)
    if not path.exists():
        raise AuditError(f"no audit store: the file does not exist ({path})")
    where: list[str] = []
    params: list[object] = []
    if device_id is not None:
        where.append("device_id = ?")
        params.append(device_id)
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    sql = "SELECT time, event, device_id, serial, peer, reason, {evidence} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit store: {exc} ({path})") from exc
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
        if found is None:
            raise AuditError(f"not an audit store: it has no events table ({path})")
        # A version 1 store (not yet opened by this hub) has no evidence column.
        evidence = "evidence" if "evidence" in _columns(conn) else "NULL"
        rows = conn.execute(sql.format(evidence=evidence), params).fetchall()
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit store: {exc} ({path})") from exc
    finally:
        conn.close()
    rows.reverse()
    return [AuditRecord(time=row[0], event=row[1], device_id=row[2], serial=row[3], peer=row[4],
                        reason=row[5], evidence=_decode_evidence(row[6])) for row in rows]


def read_events(
    path: Path,
    *,
    device_id: str | None = None,
    since: float | None = None,
    limit: int | None = None,
) -> list[dict[str, object]]:
    """:func:`read_records` as ``fleet-hub events --json`` prints them (AuditRecord.as_json)."""
    records = read_records(path, device_id=device_id, since=since, limit=limit)
    return [record.as_json() for record in records]


_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[smhdw])+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float | None = None) -> float:
    """An epoch time from ISO 8601 or from a duration ago (``30s``, ``10m``, ``2h``, ``1d``).

    ISO 8601 takes a date (midnight UTC), a date and time with ``Z`` or an offset, or a naive
    date and time read as UTC (the store prints UTC). Durations may combine: ``1h30m``. Raises
    InvalidValueError (a ValueError) saying what was expected.
    """
    value = text.strip()
    if _DURATION_RE.fullmatch(value):
        ago = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART_RE.findall(value))
        return (time.time() if now is None else now) - ago
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidValueError(
            f"{text!r} is not a time: want ISO 8601 (2026-11-27T10:00:00Z, 2026-11-27) "
            "or a duration ago (30s, 10m, 2h, 1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
