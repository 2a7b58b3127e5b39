"""The open registry: the connection, its migrations, its reads and ``write()`` transactions."""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from provisioning.errors import RegistryError
from provisioning.registry.audit import GENESIS, ChainReport, seal, verify_chain
from provisioning.registry.migrations import upgrade
from provisioning.registry.schema import HEAD_KEY, SCHEMA_VERSION

# Ids per "IN (...)" query: far below SQLite's default limit of 32766 variables.
IN_BATCH = 500
# Long enough to ride out another process's batch; "database is locked" must never surface.
BUSY_TIMEOUT_S = 60.0
# An audit event's detail as stored: compact JSON with sorted keys (one encoder, not one per
# event as json.dumps with options would build).
_DETAIL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def detail_json(detail: dict[str, Any] | None) -> str:
    """The ``detail`` text of an audit event."""
    return _DETAIL_ENCODER.encode(detail or {})


@dataclass(frozen=True)
class CertificateRow:
    serial: str
    device_id: str
    fingerprint: str
    public_key_sha256: str
    not_before: str
    not_after: str
    status: str
    revoked_at: str | None
    reason: str | None
    issued_at: str
    pem: str


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    status: str
    group: str | None
    created_at: str
    updated_at: str
    metadata: dict[str, Any]


# A constant, never user input: the f-strings that use it are safe.
_CERT_COLUMNS = ("serial, device_id, fingerprint, public_key_sha256, not_before, not_after, "
                 "status, revoked_at, reason, issued_at, pem")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Registry:
    """One open registry; write with ``with registry.write() as tx:``."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.is_file():
            raise RegistryError("registry.db is missing", str(path))
        self.path = path
        try:
            self.conn = connect(path)
            self.db = sqlite_utils.Database(self.conn)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry cannot be opened: {exc}", str(path)) from exc

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry schema v{version} is newer than this tool (v{SCHEMA_VERSION})",
                str(self.path),
            )
        if version == SCHEMA_VERSION:
            return
        with self._transaction():
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            upgrade(self.db, version)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            # A COMMIT refused (a deferred foreign key, I/O) leaves the transaction open.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def write(self, actor: str) -> Iterator[Transaction]:
        """One atomic unit: rows and their audit events commit together or not at all."""
        try:
            with self._transaction():
                tx = Transaction(self.conn, actor)
                yield tx
                tx.flush()
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"registry write failed: {exc}", str(self.path)) from exc

    # -- reads -------------------------------------------------------------------------

    def device(self, device_id: str) -> DeviceRow | None:
        row = self.conn.execute(
            'SELECT device_id, status, "group", created_at, updated_at, metadata '
            "FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        return _device(row) if row else None

    def devices(self, status: str | None = None) -> list[DeviceRow]:
        sql = ('SELECT device_id, status, "group", created_at, updated_at, metadata '
               "FROM devices")
        args: tuple[str, ...] = ()
        if status:
            sql += " WHERE status = ?"
            args = (status,)
        return [_device(r) for r in self.conn.execute(sql + " ORDER BY device_id", args)]

    def certificates(self, device_id: str | None = None) -> list[CertificateRow]:
        sql = f"SELECT {_CERT_COLUMNS} FROM certificates"  # noqa: S608
        args: tuple[str, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            args = (device_id,)
        return [CertificateRow(*r) for r in
                self.conn.execute(sql + " ORDER BY issued_at, rowid", args)]

    def certificate(self, serial: str) -> CertificateRow | None:
        row = self.conn.execute(
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
            (serial,)
        ).fetchone()
        return CertificateRow(*row) if row else None

    def known_keys(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (device id, public-key hash) pairs already have a certificate."""
        wanted = set(pairs)
        found: set[tuple[str, str]] = set()
        ids = sorted({device_id for device_id, _ in pairs})
        for start in range(0, len(ids), IN_BATCH):
            part = ids[start:start + IN_BATCH]
            marks = ",".join("?" * len(part))
            for row in self.conn.execute(
                    "SELECT device_id, public_key_sha256 FROM certificates "  # noqa: S608
                    f"WHERE device_id IN ({marks})", part):
                if (row[0], row[1]) in wanted:
                    found.add((row[0], row[1]))
        return found

    def verify_audit(self) -> ChainReport:
        return verify_chain(self.conn)

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None


def _device(row: tuple[Any, ...]) -> DeviceRow:
    return DeviceRow(row[0], row[1], row[2], row[3], row[4], json.loads(row[5] or "{}"))


class Transaction:
    """Writes inside one ``BEGIN IMMEDIATE``; the audit head is read under the same lock."""

    def __init__(self, conn: sqlite3.Connection, actor: str) -> None:
        self.conn = conn
        self.actor = actor
        head = conn.execute("SELECT value FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone()
        if head:
            last_id, _, last_hash = head[0].partition(":")
            self._last_id, self._last_hash = int(last_id), last_hash
        else:
            self._last_id, self._last_hash = 0, GENESIS
        self._events: list[tuple[Any, ...]] = []

    def audit(self, time: str, action: str, device_id: str | None = None,
              serial: str | None = None, detail: dict[str, Any] | None = None,
              actor: str | None = None) -> None:
        """Queue one event; *actor* overrides the transaction's (a batch serves many callers)."""
        self.audit_text(time, action, device_id, serial, detail_json(detail), actor)

    def audit_text(self, time: str, action: str, device_id: str | None, serial: str | None,
                   text: str, actor: str | None = None) -> None:
        """:meth:`audit` with the detail already encoded as :func:`detail_json` does."""
        who = actor or self.actor
        event_id = self._last_id + 1
        digest = seal(event_id, time, who, action, device_id, serial, text, self._last_hash)
        self._events.append((event_id, time, who, action, device_id, serial, text,
                             self._last_hash, digest))
        self._last_id, self._last_hash = event_id, digest

    def flush(self) -> None:
        """Write queued events and the new head, just before the commit."""
        if not self._events:
            return
        self.conn.executemany(
            "INSERT INTO events (id, time, actor, action, device_id, serial, detail, "
            "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", self._events)
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (HEAD_KEY, f"{self._last_id}:{self._last_hash}"),
        )
        self._events.clear()

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql, rows)

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))


def operator() -> str:
    """Who acts, for the audit log: the OS user and host of the operator's shell."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
