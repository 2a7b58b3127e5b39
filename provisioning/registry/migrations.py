"""The registry's migrations (sqlite-utils), one function per schema version.

Run by :class:`provisioning.registry.store.Registry` under the write lock when a registry is
older than :data:`provisioning.registry.schema.SCHEMA_VERSION`; each step ends by setting
``PRAGMA user_version``. The tables and columns are described in
:mod:`provisioning.registry.schema`.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from provisioning.registry.schema import SCHEMA_VERSION
from provisioning.timefmt import iso, utcnow


def _migrate_v1(db: sqlite_utils.Database) -> None:
    devices, certificates = db.table("devices"), db.table("certificates")
    events = db.table("events")
    devices.create(
        {"device_id": str, "status": str, "group": str, "created_at": str,
         "updated_at": str, "metadata": str, "password_hash": str},
        pk="device_id", not_null={"status", "created_at", "updated_at", "metadata"},
    )
    certificates.create(
        {"serial": str, "device_id": str, "fingerprint": str, "public_key_sha256": str,
         "not_before": str, "not_after": str, "status": str, "revoked_at": str,
         "reason": str, "hold_prior_status": str, "issued_at": str, "pem": str},
        pk="serial", foreign_keys=[("device_id", "devices", "device_id")],
        not_null={"device_id", "fingerprint", "public_key_sha256", "not_before",
                  "not_after", "status", "issued_at", "pem"},
    )
    certificates.create_index(["device_id", "public_key_sha256"])
    certificates.create_index(["fingerprint"], unique=True)
    events.create(
        {"id": int, "time": str, "actor": str, "action": str, "device_id": str,
         "serial": str, "detail": str, "prev_hash": str, "hash": str},
        pk="id", not_null={"time", "actor", "action", "detail", "prev_hash", "hash"},
    )
    events.create_index(["device_id"])
    db.table("meta").create({"key": str, "value": str}, pk="key")
    # Files the registry promised to write: finished by the next sign after a crash.
    db.table("pending_outputs").create({"path": str, "serial": str}, pk="path")


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Enrollment tokens for the EST service: the secret itself is never stored, only its hash."""
    db.table("tokens").create(
        {"name": str, "hash": str, "created_at": str, "revoked_at": str},
        pk="name", not_null={"hash", "created_at"},
    )


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """``certificates.superseded_at``: when a renewal superseded it, the start of its
    ``renew_grace`` (:mod:`provisioning.grace`). Certificates superseded before this version
    had no grace to keep: theirs starts now, at the upgrade, rather than revoking them all
    at the first sweep under a policy they were never issued against."""
    db.table("certificates").add_column("superseded_at", str)
    # The sweep's query (provisioning.registry.revocation): only superseded rows, by time.
    db.conn.execute("CREATE INDEX certificates_superseded ON certificates (superseded_at) "
                    "WHERE status = 'superseded'")
    db.conn.execute("UPDATE certificates SET superseded_at = ? WHERE status = 'superseded' "
                    "OR hold_prior_status = 'superseded'", (iso(utcnow()),))


def _migrate_v4(db: sqlite_utils.Database) -> None:
    """``certificates.issuer_key_id``: which issuing CA signed the certificate (issue 14's
    issuing-CA rotation). Rows from before stay NULL: they were all signed by the one
    issuing CA the PKI had, and ``issuing-ca rotate`` stamps them with its key identifier
    before a second one exists (an UPDATE of the NULL rows, no PEM parsed)."""
    db.table("certificates").add_column("issuer_key_id", str)


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_v1, 2: _migrate_v2, 3: _migrate_v3, 4: _migrate_v4}


def upgrade(db: sqlite_utils.Database, version: int) -> None:
    """Bring a registry at *version* to :data:`SCHEMA_VERSION`; the caller holds the lock."""
    for target in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[target](db)
        db.conn.execute(f"PRAGMA user_version = {target}")
