"""The writes of issuing: device and certificate rows, renewals, the files promised.

:class:`IssuanceWrites` is part of :class:`provisioning.registry.transactions.Transaction`;
:class:`ChunkRows` holds one chunk's rows between its decisions. The issuer
(``provisioning.issuer``) decides; these store what it decided.
"""

from __future__ import annotations

import sqlite3

from provisioning.errors import RegistryError
from provisioning.registry._sql import in_batches
from provisioning.registry.schema import CERT_ACTIVE, CURRENT_CERT_STATUSES, DEVICE_ACTIVE

# (serial, device id, fingerprint, public-key hash, not_before, not_after, issued_at, pem,
#  issuer_key_id)
CertificateInsert = tuple[str, str, str, str, str, str, str, str, str]
# device id -> (status, group)
DeviceStates = dict[str, tuple[str, str | None]]
# device id -> [[serial, status, public-key hash, pem], ...], oldest first
DeviceCertificates = dict[str, list[list[str]]]

_INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial, device_id, fingerprint, public_key_sha256, not_before, "
    "not_after, status, issued_at, pem, issuer_key_id) "
    "VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?, ?)")


class SerialCollisionError(RegistryError):
    """A certificate row hit an existing serial or fingerprint (2^-159 odds, or a bug).

    Never shown to a user: the issuer rolls the transaction back and mints again.
    """


class IssuanceWrites:
    """Issuing's named writes; the rows of one ``sign`` chunk in a few statements."""

    conn: sqlite3.Connection

    def defer_foreign_keys(self) -> None:
        """Check the certificates -> devices reference at COMMIT, not per statement, so a
        chunk's certificate rows may precede their device rows (switches itself off there;
        a COMMIT that fails the check rolls back)."""
        self.conn.execute("PRAGMA defer_foreign_keys = ON")

    def chunk_rows(self, device_ids: list[str]) -> tuple[DeviceStates, DeviceCertificates]:
        """What a chunk's decisions need about its devices, read under the write lock."""
        devices: DeviceStates = {}
        certs: DeviceCertificates = {}
        for part, marks in in_batches(sorted(set(device_ids))):
            for row in self.conn.execute('SELECT device_id, status, "group" FROM devices '  # noqa: S608
                                         f"WHERE device_id IN ({marks})", part):
                devices[row[0]] = (row[1], row[2])
            for row in self.conn.execute(
                    "SELECT device_id, serial, status, public_key_sha256, pem "  # noqa: S608
                    f"FROM certificates WHERE device_id IN ({marks}) "
                    "ORDER BY issued_at, rowid", part):
                certs.setdefault(row[0], []).append([row[1], row[2], row[3], row[4]])
        return devices, certs

    def add_devices(self, rows: list[tuple[str, str | None, str, str]]) -> None:
        """New active devices: (device id, group, created_at, updated_at)."""
        self.conn.executemany('INSERT INTO devices (device_id, status, "group", created_at, '
                              "updated_at, metadata) VALUES (?, 'active', ?, ?, ?, '{}')", rows)

    def store_certificates(self, rows: list[CertificateInsert]) -> None:
        """Active certificate rows in one statement; :class:`SerialCollisionError` when one's
        serial or fingerprint is taken (the rows before it are in: roll back the whole)."""
        try:
            self.conn.executemany(_INSERT_CERTIFICATE, rows)
        except sqlite3.IntegrityError as exc:
            raise SerialCollisionError(str(exc)) from exc

    def store_certificate(self, row: CertificateInsert) -> bool:
        """One active certificate row; False (nothing written) when its serial is taken."""
        try:
            self.conn.execute(_INSERT_CERTIFICATE, row)
        except sqlite3.IntegrityError:
            return False
        return True

    def supersede(self, serial: str, stamp: str) -> None:
        """A renewed certificate: valid for the fleet's ``renew_grace`` from *stamp*, then
        revoked with reason superseded (:mod:`provisioning.grace`), unless it expires first."""
        self.conn.execute("UPDATE certificates SET status = 'superseded', superseded_at = ? "
                          "WHERE serial = ?", (stamp, serial))

    def renewal_target(self, serial: str) -> tuple[str, str] | None:
        """(device id, status) of the certificate a renewal replaces; None when unknown."""
        row = self.conn.execute("SELECT device_id, status FROM certificates WHERE serial = ?",
                                (serial,)).fetchone()
        return (row[0], row[1]) if row else None

    def promise_outputs(self, rows: list[tuple[str, str]]) -> None:
        """(path, serial): files written right after this commit, or by the next ``sign``."""
        self.conn.executemany("INSERT OR REPLACE INTO pending_outputs (path, serial) "
                              "VALUES (?, ?)", rows)

    def clear_promises(self, paths: list[str]) -> None:
        """These promised files are written."""
        self.conn.executemany("DELETE FROM pending_outputs WHERE path = ?",
                              [(p,) for p in paths])


class ChunkRows:
    """The registry rows one ``sign`` chunk's decisions need, read in two queries under the
    write lock (:meth:`IssuanceWrites.chunk_rows`).

    Decisions update the rows as they go, so two CSRs of one chunk see each other; inserts of
    devices, certificates (when *batched*) and promises wait here and are written by
    :meth:`flush`, which the caller runs before anything that reads or updates those rows
    (certificate rows may precede their device row: :meth:`IssuanceWrites.defer_foreign_keys`).
    """

    def __init__(self, tx: IssuanceWrites, device_ids: list[str], *,
                 batched: bool = True) -> None:
        self.tx = tx
        self.batched = batched  # certificate rows wait in certificate_rows for flush()
        self.certificate_rows: list[CertificateInsert] = []
        self.new_devices: list[tuple[str, str | None, str, str]] = []
        self.promises: list[tuple[str, str]] = []
        self.devices, self.certs = tx.chunk_rows(device_ids)

    def newest_with_key(self, device_id: str, key_sha256: str) -> tuple[str, str, str] | None:
        """(serial, status, pem) of the device's newest certificate for this key."""
        for serial, status, key, pem in reversed(self.certs.get(device_id, [])):
            if key == key_sha256:
                return serial, status, pem
        return None

    def live_serials(self, device_id: str) -> list[str]:
        """The device's current certificates (:data:`CURRENT_CERT_STATUSES`), oldest first."""
        return [c[0] for c in self.certs.get(device_id, []) if c[1] in CURRENT_CERT_STATUSES]

    def current_statuses(self, device_id: str) -> list[tuple[str, str]]:
        """(serial, status) of the device's current certificates, oldest first."""
        return [(c[0], c[1]) for c in self.certs.get(device_id, [])
                if c[1] in CURRENT_CERT_STATUSES]

    def set_status(self, device_id: str, serial: str, status: str) -> None:
        for cert in self.certs.get(device_id, []):
            if cert[0] == serial:
                cert[1] = status

    def add_device(self, device_id: str, group: str | None, stamp: str) -> None:
        self.devices[device_id] = (DEVICE_ACTIVE, group)
        self.new_devices.append((device_id, group, stamp, stamp))

    def add_certificate(self, device_id: str, serial: str, key_sha256: str, pem: str) -> None:
        self.certs.setdefault(device_id, []).append([serial, CERT_ACTIVE, key_sha256, pem])

    def promise_output(self, path: str, serial: str) -> None:
        """*path* is promised in this transaction (:meth:`IssuanceWrites.promise_outputs`)."""
        self.promises.append((path, serial))

    def flush(self) -> None:
        """Write the waiting rows; :class:`SerialCollisionError` from a certificate row."""
        if self.certificate_rows:
            # On a collision the rows before it are in: the caller rolls back the whole
            # transaction, never committing the chunk in part.
            self.tx.store_certificates(self.certificate_rows)
            self.certificate_rows.clear()
        if self.new_devices:
            self.tx.add_devices(self.new_devices)
            self.new_devices.clear()
        if self.promises:
            self.tx.promise_outputs(self.promises)
            self.promises.clear()
