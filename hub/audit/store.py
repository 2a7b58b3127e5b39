"""The audit store: every connect decision, ACL denial and kick, in SQLite, written off the loop.

The broker's event loop only calls :meth:`AuditStore.record`, which appends to an in-memory queue
under a lock held for a few bytecodes: it never touches the disk, never hashes and never waits
for the writer. One background thread drains the queue and writes batches (``executemany``
inside one ``BEGIN IMMEDIATE`` transaction each) to a WAL-mode database, sealing each record
into the hash chain as it goes (hub/audit/chain.py: the head is read and moved inside the same
transaction, so a crash leaves no half-sealed batch). When the database is busy (another process
holds the write lock, e.g. ``fleet-hub events prune``) or the disk fails, the thread keeps the
batch and retries with backoff; the loop notices nothing. Records are dropped (counted, logged
once per episode) only when the queue holds ``max_queue`` records not yet committed, or when a
row cannot be stored at all (a string UTF-8 cannot encode, such as a lone surrogate).

A store an older hub wrote is migrated at open (hub/audit/schema.py); its unsealed records are
sealed by the writer thread, oldest first, before anything new is written.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hub.audit.chain import seal
from hub.audit.records import EVENTS, encode_evidence
from hub.audit.schema import head, prepare, set_head
from hub.errors import AuditError

__all__ = ["AuditStats", "AuditStore"]

log = logging.getLogger("hub.audit")

_EVENT_SET = frozenset(EVENTS)
_INSERT = (
    "INSERT INTO events (id, time, event, device_id, serial, peer, reason, evidence, prev_hash, "
    "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The writer's own busy wait is short: it retries with its own backoff so that close() and
# flush() deadlines are honoured even while another connection holds the write lock.
_BUSY_TIMEOUT = 0.05
_RETRY_MIN, _RETRY_MAX = 0.01, 0.5
# Records an older hub left unsealed are sealed this many per transaction.
_BACKLOG_CHUNK = 5000

# What the queue holds: a plain tuple in column order, ~15x cheaper to build than AuditRecord
# (a frozen dataclass); evidence is JSON text already. The writer adds id and hashes.
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
        encoded = None if evidence is None else encode_evidence(evidence)
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
            mode = prepare(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise AuditError(f"cannot create the audit store: {exc} ({self.path})") from exc
        if mode != "wal":
            conn.close()
            raise AuditError(f"cannot switch the audit store to WAL, got {mode} ({self.path})")
        conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT * 1000)}")
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
        backlog = True  # records an older hub left unsealed: sealed before anything new
        try:
            while True:
                if not backlog:
                    self._wake.wait(self._flush_interval)
                self._wake.clear()
                with self._lock:
                    stopping = self._stopping
                    # Swap the whole queue out: record() never waits for more than this.
                    if self._queue and not pending:
                        pending, self._queue = self._queue, deque()
                while backlog:
                    sealed = self._seal_backlog(conn)
                    if sealed is None:
                        break
                    backlog = sealed > 0
                while pending and not backlog:
                    count = min(self._batch_size, len(pending))
                    batch = list(itertools.islice(pending, count))
                    if not self._write(conn, batch):
                        break
                    for _ in range(count):
                        pending.popleft()
                    delay = _RETRY_MIN
                if pending or backlog:
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
        """Seal and commit *batch* in one transaction; False (batch kept) if SQLite is busy or
        failing. The head is read inside the transaction, so another writer (a second hub on
        the same file, by mistake) or a prune in between cannot fork the chain."""
        refused: list[tuple[_Row, Exception]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows = self._seal(conn, batch, refused)
            conn.executemany(_INSERT, rows)
            if rows:
                set_head(conn, int(str(rows[-1][0])), str(rows[-1][-1]))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):  # a failing disk may refuse this too
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if self._last_error is None:
                log.warning("audit store %s: write failed, retrying: %s", self.path, exc)
            self._last_error = str(exc)
            return False
        for item, problem in refused:
            log.error("audit record dropped, SQLite refused it (%s): %r", problem, item)
        if self._last_error is not None:
            log.info("audit store %s: writing again", self.path)
            self._last_error = None
        written = len(batch) - len(refused)
        with self._settled_cond:
            self._written += written
            self._dropped += len(refused)
            self._settled += len(batch)
            self._batches += 1
            if self._overflowing and self._accepted - self._settled < self._max_queue // 2:
                self._overflowing = False
            self._settled_cond.notify_all()
        return True

    @staticmethod
    def _seal(conn: sqlite3.Connection, batch: list[_Row],
              refused: list[tuple[_Row, Exception]]) -> list[tuple[object, ...]]:
        """The batch's rows with ids and hashes, continuing the chain from the stored head."""
        last_id, prev = head(conn)
        top = conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
        # Never reuse an id, even if the head was set back by hand (verify will say so).
        next_id = max(last_id, top or 0) + 1
        rows: list[tuple[object, ...]] = []
        for item in batch:
            try:
                # The row's text must encode as UTF-8 for SQLite too: what seal() refuses
                # (a lone surrogate), SQLite would, and it would block every later record.
                digest = seal(next_id, *item, prev)
            except UnicodeError as exc:
                refused.append((item, exc))
                continue
            rows.append((next_id, *item, prev, digest))
            prev = digest
            next_id += 1
        return rows

    def _seal_backlog(self, conn: sqlite3.Connection) -> int | None:
        """Seal up to _BACKLOG_CHUNK records an older hub wrote; how many (0: none left), or
        None if SQLite is busy or failing (retried like a batch)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            last_id, prev = head(conn)
            found = conn.execute(
                "SELECT id, time, event, device_id, serial, peer, reason, evidence FROM events "
                "WHERE id > ? AND hash IS NULL ORDER BY id LIMIT ?",
                (last_id, _BACKLOG_CHUNK)).fetchall()
            updates: list[tuple[str, str, int]] = []
            for row in found:
                digest = seal(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                              prev)
                updates.append((prev, digest, row[0]))
                prev = digest
            conn.executemany("UPDATE events SET prev_hash = ?, hash = ? WHERE id = ?", updates)
            if updates:
                set_head(conn, updates[-1][2], updates[-1][1])
            conn.execute("COMMIT")
        except (sqlite3.Error, UnicodeError) as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if self._last_error is None:
                log.warning("audit store %s: sealing older records failed, retrying: %s",
                            self.path, exc)
            self._last_error = str(exc)
            return None
        if found and len(found) < _BACKLOG_CHUNK:
            log.info("audit store %s: sealed the records an older hub wrote into the chain",
                     self.path)
        return len(found)
