"""The audit store's tables, and how an older store is brought up to date in place.

Versions (``PRAGMA user_version``):

1. ``events``: id, time, event, device_id, serial, peer, reason.
2. + ``evidence`` (JSON text of a finding, NULL otherwise).
3. + ``prev_hash``, ``hash`` (the chain, hub/audit/chain.py), an index of findings, ``meta``
   (``head`` = ``id:hash`` of the last sealed record, ``migrated`` = what an upgrade found
   unsealed) and ``checkpoints`` (the signed heads of pruned records, hub/audit/checkpoint.py).

Migrating is cheap and done by :func:`prepare` at open (ALTER TABLE adds NULL columns). The
records a version 1 or 2 hub wrote have no hash: the writer thread seals them, oldest first
from :data:`~hub.audit.chain.GENESIS`, before it writes anything new (off the event loop), and
``meta.migrated`` keeps how many there were and when, because the chain proves them unchanged
only since that moment.
"""

from __future__ import annotations

import json
import sqlite3
import time

from hub.audit.chain import GENESIS

__all__ = ["SCHEMA_VERSION", "columns", "head", "prepare", "set_head"]

SCHEMA_VERSION = 3

_EVENTS = """CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    device_id TEXT,
    serial TEXT,
    peer TEXT,
    reason TEXT,
    evidence TEXT,
    prev_hash TEXT,
    hash TEXT
)"""
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS events_device_time ON events (device_id, time)",
    "CREATE INDEX IF NOT EXISTS events_time ON events (time)",
    # fleet-hub audit reads only findings, which are rare: a partial index costs the writer
    # nothing for the other events (version 3).
    "CREATE INDEX IF NOT EXISTS events_findings ON events (time) WHERE event = 'finding'",
)
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_CHECKPOINTS = """CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    first_id INTEGER NOT NULL,
    first_prev_hash TEXT NOT NULL,
    head_id INTEGER NOT NULL,
    head_hash TEXT NOT NULL,
    count INTEGER NOT NULL,
    certificate TEXT NOT NULL,
    signature TEXT NOT NULL
)"""
# Columns added in place, in version order, to a store an older hub created.
_ADDED = (("evidence", "TEXT"), ("prev_hash", "TEXT"), ("hash", "TEXT"))
HEAD_KEY = "head"
MIGRATED_KEY = "migrated"


def prepare(conn: sqlite3.Connection) -> str:
    """Switch to WAL, create or migrate the schema; return the journal mode SQLite chose.

    Raises sqlite3.DatabaseError for a store a newer hub wrote (it is not touched).
    """
    mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    # NORMAL in WAL mode survives a crash of the hub; a power cut may lose the last batches,
    # the price of not waiting for fsync on every commit.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        _migrate(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return mode


def _migrate(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this hub's {SCHEMA_VERSION}")
    conn.execute(_EVENTS)
    for statement in (*_INDEXES, _META, _CHECKPOINTS):
        conn.execute(statement)
    present = columns(conn)
    for name, kind in _ADDED:
        if name not in present:
            conn.execute(f"ALTER TABLE events ADD COLUMN {name} {kind}")
    if conn.execute("SELECT 1 FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone() is None:
        unsealed, last = conn.execute(
            "SELECT COUNT(*), MAX(id) FROM events WHERE hash IS NULL").fetchone()
        if unsealed:
            found = {"from_version": version, "records": unsealed, "last_id": last,
                     "time": time.time()}
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (MIGRATED_KEY, json.dumps(found, sort_keys=True)))
        set_head(conn, 0, GENESIS)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def columns(conn: sqlite3.Connection) -> list[str]:
    """The events table's column names, in order."""
    return [str(row[1]) for row in conn.execute("PRAGMA table_info(events)")]


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """The id and hash of the last sealed record (``0, GENESIS`` before any)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone()
    if row is None:
        return 0, GENESIS
    record_id, _, digest = str(row[0]).partition(":")
    return int(record_id), digest


def set_head(conn: sqlite3.Connection, record_id: int, digest: str) -> None:
    """Store the head (inside the caller's transaction)."""
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                 (HEAD_KEY, f"{record_id}:{digest}"))
