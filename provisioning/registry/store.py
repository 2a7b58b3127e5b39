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
from provisioning.registry._sql import in_batches
from provisioning.registry.audit import ChainReport, verify_chain
from provisioning.registry.expiry import ExpiringRow, expiring_before
from provisioning.registry.migrations import upgrade
from provisioning.registry.revocation import SupersededRow, superseded_due
from provisioning.registry.schema import SCHEMA_VERSION
from provisioning.registry.transactions import Transaction

# Long enough to ride out another process's batch; "database is locked" must never surface.
BUSY_TIMEOUT_S = 60.0
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
class CertificateHolder:
    """A certificate's status with its device's, as the enrollment service checks them."""

    device_id: str
    status: str
    fingerprint: str
    device_status: str
    group: str | None


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

    def settle(self) -> None:
        """Wait until no other connection is writing: take the write lock and give it back
        (an empty ``BEGIN IMMEDIATE``/``COMMIT``)."""
        try:
            with self._transaction():
                pass
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"registry write lock not available: {exc}",
                                str(self.path)) from exc

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
        for part, marks in in_batches(sorted({device_id for device_id, _ in pairs})):
            for row in self.conn.execute(
                    "SELECT device_id, public_key_sha256 FROM certificates "  # noqa: S608
                    f"WHERE device_id IN ({marks})", part):
                if (row[0], row[1]) in wanted:
                    found.add((row[0], row[1]))
        return found

    def certificate_holder(self, serial: str) -> CertificateHolder | None:
        """A certificate with its device's state, for authenticating by certificate."""
        row = self.conn.execute(
            'SELECT c.device_id, c.status, c.fingerprint, d.status, d."group" FROM certificates '
            "c JOIN devices d ON d.device_id = c.device_id WHERE c.serial = ?",
            (serial,)).fetchone()
        return CertificateHolder(*row) if row else None

    def issued_status(self, serial: str,
                      ) -> tuple[str, str | None, str | None, str | None] | None:
        """(status, revoked_at, reason, issuer_key_id) of a certificate, for OCSP (which of
        the live issuing CAs answers for it); None when unknown."""
        row = self.conn.execute("SELECT status, revoked_at, reason, issuer_key_id FROM "
                                "certificates WHERE serial = ?", (serial,)).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

    def in_service_by_issuer(self, now_iso: str) -> dict[str | None, tuple[int, str]]:
        """issuer_key_id (None: not recorded, from before v4) -> (how many certificates are
        still in service, the latest not-after among them): active, superseded (grace not
        over) or on hold, not expired at *now_iso*. What ``issuing-ca retire`` checks and
        ``issuing-ca show`` counts: one scan of the table, no PEM parsed."""
        return {row[0]: (int(row[1]), str(row[2])) for row in self.conn.execute(
            "SELECT issuer_key_id, count(*), max(not_after) FROM certificates WHERE status IN "
            "('active', 'superseded', 'on_hold') AND not_after > ? GROUP BY issuer_key_id",
            (now_iso,))}

    def count_events(self, action: str) -> int:
        """How many audit events of *action* the chain holds."""
        return int(self.conn.execute("SELECT count(*) FROM events WHERE action = ?",
                                     (action,)).fetchone()[0])

    def superseded_due(self, cutoff: str, limit: int = -1) -> list[SupersededRow]:
        """(serial, device id, superseded_at) of superseded certificates superseded before
        *cutoff*; the sweep's look before it takes the write lock."""
        return superseded_due(self.conn, cutoff, limit)

    def expiring(self, cutoff: str) -> list[ExpiringRow]:
        """Active and superseded certificates with not-after at or before *cutoff* (ISO
        text), the soonest first: ``fleet-provision expiring``."""
        return expiring_before(self.conn, cutoff)

    def pending_outputs(self) -> list[tuple[str, str]]:
        """(path, pem) of the files a committed ``sign`` promised and has not written."""
        rows = self.conn.execute(
            "SELECT p.path, c.pem FROM pending_outputs p JOIN certificates c "
            "ON c.serial = p.serial").fetchall()
        return [(path, pem) for path, pem in rows]

    def tokens(self) -> list[tuple[str, str, str | None]]:
        """Every enrollment token: (name, stored hash, revoked_at)."""
        return self.conn.execute("SELECT name, hash, revoked_at FROM tokens").fetchall()

    def data_version(self) -> int:
        """Moves when another connection commits (``PRAGMA data_version``): re-read then."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def verify_audit(self) -> ChainReport:
        return verify_chain(self.conn)

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None


def _device(row: tuple[Any, ...]) -> DeviceRow:
    return DeviceRow(row[0], row[1], row[2], row[3], row[4], json.loads(row[5] or "{}"))


def operator() -> str:
    """Who acts, for the audit log: the OS user and host of the operator's shell."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
