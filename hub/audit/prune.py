"""``fleet-hub events prune``: drop old audit records, leaving a signed checkpoint in their place.

Runs in its own process (a CLI, from cron or a systemd timer), never on the hub's loop: one
``BEGIN IMMEDIATE`` transaction verifies the chain, signs the checkpoint, inserts it and
deletes the records, so a crash leaves either everything or nothing. The hub's writer waits for
the write lock like for any other busy moment (it retries, nothing is lost) and, since only
the oldest records go, never notices otherwise. The file does not shrink: SQLite reuses the
freed pages for new records.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from hub.audit.checkpoint import Checkpoint, CheckpointSigner, CheckpointTrust
from hub.audit.verify import Break, verify_chain
from hub.errors import AuditError

__all__ = ["PruneResult", "prune"]

_NO_LIMIT = 2**63 - 1  # above every SQLite rowid


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did: the checkpoint it wrote (None: nothing was old enough), or why it
    refused (the chain is broken: pruning would sign over the damage)."""

    checkpoint: Checkpoint | None
    kept: int
    refused: Break | None = None


def prune(path: Path, *, before: float, signer: CheckpointSigner, trust: CheckpointTrust,
          now: float | None = None, timeout: float = 30.0) -> PruneResult:
    """Delete the records older than *before* (epoch seconds), oldest first, up to the first
    record that is not: a run from the start of what is left, so the chain stays whole."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"no audit store: the file does not exist ({path})")
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit store: {exc} ({path})") from exc
    try:
        return _prune(conn, before, signer, trust, time.time() if now is None else now)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot prune the audit store: {exc} ({path})") from exc
    finally:
        conn.close()


def _prune(conn: sqlite3.Connection, before: float, signer: CheckpointSigner,
           trust: CheckpointTrust, now: float) -> PruneResult:
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                         "name = 'checkpoints'").fetchone()
    if found is None:
        raise sqlite3.DatabaseError("no checkpoints table: not an audit store this hub has "
                                    "opened (start the hub once to migrate it)")
    conn.execute("BEGIN IMMEDIATE")
    try:
        report = verify_chain(conn, trust)
        total = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        if report.problem is not None:
            conn.execute("ROLLBACK")
            return PruneResult(None, total, report.problem)
        keep_from = conn.execute("SELECT MIN(id) FROM events WHERE time >= ?",
                                 (before,)).fetchone()[0]
        below = _NO_LIMIT if keep_from is None else int(keep_from)
        first = conn.execute("SELECT id, prev_hash FROM events ORDER BY id LIMIT 1").fetchone()
        last = conn.execute("SELECT id, hash FROM events WHERE id < ? ORDER BY id DESC LIMIT 1",
                            (below,)).fetchone()
        if first is None or last is None:
            conn.execute("ROLLBACK")
            return PruneResult(None, total)
        count = int(conn.execute("SELECT COUNT(*) FROM events WHERE id < ?",
                                 (below,)).fetchone()[0])
        number = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM checkpoints")
                     .fetchone()[0]) + 1
        checkpoint = signer.sign(number, now, int(first[0]), str(first[1]), int(last[0]),
                                 str(last[1]), count)
        conn.execute(
            "INSERT INTO checkpoints (id, time, first_id, first_prev_hash, head_id, head_hash, "
            "count, certificate, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (checkpoint.id, checkpoint.time, checkpoint.first_id, checkpoint.first_prev_hash,
             checkpoint.head_id, checkpoint.head_hash, checkpoint.count,
             checkpoint.certificate, checkpoint.signature))
        conn.execute("DELETE FROM events WHERE id <= ?", (checkpoint.head_id,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return PruneResult(checkpoint, total - count)
