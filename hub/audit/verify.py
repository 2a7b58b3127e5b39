"""``fleet-hub events verify``: recompute the chain and name the first record that does not fit.

One read transaction (a consistent snapshot while the hub writes), records in id order, one
SHA-256 each, constant memory. What it proves and what it cannot (docs/audit-log.md): any
record edited, removed or moved in the middle shows, and so does one removed from the end
while the store's head (``meta.head``, moved by the writer in the same transaction as each
batch) still names it. Someone who can write the file can also rewrite the head, or recompute
every hash after an edit: only a copy held elsewhere shows that, a shipped line
(``events --follow --json`` carries each record's id and hash; ``--anchor ID:HASH``) or a
signed checkpoint (which a forger cannot sign without the hub's key).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hub.audit.chain import GENESIS, seal
from hub.audit.checkpoint import Checkpoint, CheckpointTrust, check
from hub.audit.records import connect_readonly, format_time
from hub.audit.schema import HEAD_KEY, MIGRATED_KEY
from hub.errors import AuditError

__all__ = ["Break", "ChainReport", "verify_chain", "verify_store"]

# How far from its place verify looks for a record that was moved (reordered rows).
_MOVED_WINDOW = 64


@dataclass(frozen=True, slots=True)
class Break:
    """Where the chain stops holding: the first altered or missing record (or checkpoint)."""

    record_id: int | None
    time: float | None
    what: str
    checkpoint_id: int | None = None

    def __str__(self) -> str:
        if self.checkpoint_id is not None:
            return f"checkpoint #{self.checkpoint_id}: {self.what}"
        when = f" ({format_time(self.time)})" if self.time is not None else ""
        return f"record #{self.record_id}{when}: {self.what}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of a verification: what holds and, if anything, where it breaks."""

    records: int
    first: tuple[int, float] | None = None  # id and time of the oldest record left
    last: tuple[int, float] | None = None
    checkpoints: tuple[Checkpoint, ...] = ()
    migrated: Mapping[str, object] | None = None
    anchors: int = 0  # --anchor values checked against the store
    problem: Break | None = None
    notes: tuple[str, ...] = ()  # what could not be checked (an --anchor since pruned)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def pruned(self) -> int:
        return sum(c.count for c in self.checkpoints)


def verify_store(path: Path, trust: CheckpointTrust,
                 anchors: Iterable[tuple[int, str]] = ()) -> ChainReport:
    """Verify the store at *path* read-only; AuditError when it cannot be read at all."""
    conn, present = connect_readonly(path)
    try:
        if "hash" not in present:
            raise AuditError("the audit store has no hash chain yet: a hub of this version "
                             f"seals it when it next opens the store ({path})")
        conn.execute("BEGIN")  # one snapshot: the records and the head agree
        return verify_chain(conn, trust, anchors)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit store: {exc} ({path})") from exc
    finally:
        conn.close()


def verify_chain(conn: sqlite3.Connection, trust: CheckpointTrust,
                 anchors: Iterable[tuple[int, str]] = ()) -> ChainReport:
    """Checkpoints first (they anchor the records), then every record, then the head."""
    checkpoints = tuple(Checkpoint(*row) for row in conn.execute(
        "SELECT id, time, first_id, first_prev_hash, head_id, head_hash, count, certificate, "
        "signature FROM checkpoints ORDER BY id"))
    migrated = _meta_json(conn, MIGRATED_KEY)
    wanted = dict(anchors)
    problem = _check_checkpoints(checkpoints, trust)
    walk = _Walk(checkpoints[-1] if checkpoints else None, wanted, conn)
    if problem is None:
        problem = walk.run(conn.execute(
            "SELECT id, time, event, device_id, serial, peer, reason, evidence, prev_hash, hash "
            "FROM events ORDER BY id"))
    if problem is None:
        problem = _check_head(conn, walk)
    notes: list[str] = []
    if problem is None:
        problem = _check_anchors(wanted, walk, checkpoints, notes)
    return ChainReport(walk.count, walk.first, walk.last, checkpoints, migrated,
                       len(wanted) - len(notes), problem, tuple(notes))


def _meta_json(conn: sqlite3.Connection, key: str) -> Mapping[str, object] | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    try:
        value = json.loads(row[0])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _check_checkpoints(checkpoints: tuple[Checkpoint, ...], trust: CheckpointTrust
                       ) -> Break | None:
    prev_id, prev_hash = 0, GENESIS
    for number, checkpoint in enumerate(checkpoints, start=1):
        if checkpoint.id != number:
            return Break(None, None, f"missing (the next checkpoint is #{checkpoint.id})",
                         checkpoint_id=number)
        wrong = check(checkpoint, trust)
        if wrong is not None:
            return Break(None, checkpoint.time, wrong, checkpoint_id=checkpoint.id)
        if checkpoint.first_prev_hash != prev_hash or checkpoint.first_id <= prev_id:
            return Break(None, checkpoint.time,
                         "does not continue from the checkpoint before it (a checkpoint was "
                         "removed or replaced)", checkpoint_id=checkpoint.id)
        if checkpoint.head_id < checkpoint.first_id or checkpoint.count < 1:
            return Break(None, checkpoint.time, "covers no records", checkpoint_id=checkpoint.id)
        prev_id, prev_hash = checkpoint.head_id, checkpoint.head_hash
    return None


class _Walk:
    """The record-by-record part: state kept between rows, the first Break returned."""

    def __init__(self, anchor: Checkpoint | None, wanted: Mapping[int, str],
                 conn: sqlite3.Connection) -> None:
        self.anchor = anchor
        self.conn = conn  # to look at the next record once something does not fit
        self.prev_id = anchor.head_id if anchor else 0
        self.prev_hash = anchor.head_hash if anchor else GENESIS
        self.prev_time: float | None = None
        self.count = 0
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None
        self.wanted = wanted
        self.seen: dict[int, str] = {}

    def run(self, rows: Iterable[tuple[object, ...]]) -> Break | None:
        for row in rows:
            problem = self.step(row)
            if problem is not None:
                return problem
        return None

    def step(self, row: tuple[object, ...]) -> Break | None:
        record_id = int(str(row[0]))
        at = row[1] if isinstance(row[1], float) else None
        prev_hash, digest = row[8], row[9]
        if digest is None:
            return Break(record_id, at, "not sealed: an older hub wrote it and no hub of this "
                         "version has opened the store since")
        fields = row[1:8]
        if _seal(record_id, fields, prev_hash) != digest:
            return Break(record_id, at, self._altered(record_id, fields, row))
        if prev_hash != self.prev_hash:
            return self._unlinked(record_id, at)
        if record_id in self.wanted:
            self.seen[record_id] = str(digest)
        self.prev_id, self.prev_hash, self.prev_time = record_id, str(digest), at
        self.count += 1
        if self.first is None:
            self.first = (record_id, at or 0.0)
        self.last = (record_id, at or 0.0)
        return None

    def _altered(self, record_id: int, fields: tuple[object, ...], row: tuple[object, ...]
                 ) -> str:
        for other in range(max(1, record_id - _MOVED_WINDOW), record_id + _MOVED_WINDOW + 1):
            if other != record_id and _seal(other, fields, row[8]) == row[9]:
                return (f"holds what was sealed as record #{other}: records were moved or "
                        "reordered")
        # The next record sealed this one's hash as its prev_hash: it says which side moved.
        after = self.conn.execute("SELECT id, prev_hash FROM events WHERE id > ? ORDER BY id "
                                  "LIMIT 1", (record_id,)).fetchone()
        if after is not None and after[1] != row[9] \
                and after[1] == _seal(record_id, fields, row[8]):
            return (f"its stored hash was altered; its fields are as written (record #{after[0]} "
                    "continues from them)")
        hint = ""
        at = row[1]
        if not isinstance(at, float):
            hint = f" (its time is {type(at).__name__} {at!r}, the hub writes a float)"
        elif self.prev_time is not None and at < self.prev_time - 1:
            hint = " (its time is earlier than the record before it)"
        return ("altered after it was written: its fields (time, event, device, serial, peer, "
                f"reason, evidence) no longer match its hash{hint}")

    def _unlinked(self, record_id: int, at: float | None) -> Break:
        """The record is intact but does not continue from the one before it."""
        before = f"#{self.prev_id}" if self.prev_id else "the start of the chain"
        if self.count == 0 and self.anchor is None and self.prev_id == 0:
            if record_id > 1:
                return Break(1, None, f"missing: records #1..#{record_id - 1} are gone from "
                             f"the start and no checkpoint covers them (#{record_id} is the "
                             "first left)")
            return Break(record_id, at, "does not start the chain (its previous hash is not "
                         "the genesis): rewritten, or the records before it were removed")
        if record_id > self.prev_id + 1:
            span = f"#{self.prev_id + 1}" if record_id == self.prev_id + 2 \
                else f"#{self.prev_id + 1}..#{record_id - 1}"
            where = (f"between {before} ({format_time(self.prev_time)}) and "
                     if self.prev_time is not None else f"after {before} and before ")
            return Break(self.prev_id + 1, None,
                         f"missing: {span} removed, {where}#{record_id}"
                         f"{f' ({format_time(at)})' if at is not None else ''}")
        if self.count == 0 and self.anchor is not None:
            return Break(record_id, at, f"does not continue from {self.anchor.describe()}: "
                         "rewritten, or records after the checkpoint were removed")
        return Break(self.prev_id, self.prev_time,
                     f"rewritten with a new hash: record #{record_id} sealed another one for "
                     "it (the record and its hash were both changed)")


def _seal(record_id: int, fields: tuple[object, ...], prev_hash: object) -> str | None:
    """seal() over a row as read (any types: a hand-edited row may hold anything); None when
    its text cannot be encoded (then it cannot be what the writer sealed)."""
    at, event, device_id, serial, peer, reason, evidence = fields
    try:
        return seal(record_id, at, event, device_id, serial, peer,  # type: ignore[arg-type]
                    reason, evidence, prev_hash)  # type: ignore[arg-type]
    except UnicodeError:
        return None


def _check_head(conn: sqlite3.Connection, walk: _Walk) -> Break | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone()
    if row is None:
        return Break(None, None, "the store's head (meta.head) is missing")
    text = str(row[0])
    head_id_text, _, head_hash = text.partition(":")
    try:
        head_id = int(head_id_text)
    except ValueError:
        return Break(None, None, f"the store's head (meta.head) is not ID:HASH: {text!r}")
    if head_id > walk.prev_id:
        span = f"#{walk.prev_id + 1}" if head_id == walk.prev_id + 1 \
            else f"#{walk.prev_id + 1}..#{head_id}"
        last = f"#{walk.prev_id}" + (f" ({format_time(walk.prev_time)})"
                                      if walk.prev_time is not None else "")
        return Break(walk.prev_id + 1, None,
                     f"missing: {span} removed from the end (the store's head names "
                     f"#{head_id}; the last record left is {last})")
    if head_id < walk.prev_id:
        return Break(head_id + 1, None, f"records after #{head_id} were not written by the "
                     "hub's writer (the store's head names an earlier record)")
    if head_hash != walk.prev_hash:
        return Break(head_id, walk.prev_time, "rewritten: the store's head holds another hash "
                     "for it")
    return None


def _check_anchors(wanted: Mapping[int, str], walk: _Walk,
                   checkpoints: tuple[Checkpoint, ...], notes: list[str]) -> Break | None:
    """Each --anchor against the store; one that was pruned (and is no checkpoint's head)
    cannot be checked any more: a note, not a match."""
    pruned = {c.head_id: c.head_hash for c in checkpoints}
    for record_id, digest in sorted(wanted.items()):
        if record_id in walk.seen:
            if walk.seen[record_id] != digest:
                return Break(record_id, None, "differs from the copy shipped elsewhere "
                             f"(--anchor hash {digest[:12]}…, the store has "
                             f"{walk.seen[record_id][:12]}…): the chain was rewritten from "
                             "there on")
        elif record_id in pruned:
            if pruned[record_id] != digest:
                return Break(record_id, None, "differs from the copy shipped elsewhere (it is "
                             "a checkpoint's head, with another hash)")
        elif record_id > walk.prev_id:
            return Break(record_id, None, "missing: shipped elsewhere (--anchor) but no longer "
                         f"in the store, which ends at #{walk.prev_id}: records were removed "
                         "from the end and the head rewritten")
        else:
            notes.append(f"anchor #{record_id} was pruned: not checked")
    return None
