"""A registry write transaction: the audit chain plus the writes named for CA actions."""

from __future__ import annotations

import sqlite3
from typing import Any

from provisioning.registry.audit import GENESIS, detail_json, seal
from provisioning.registry.devices import DeviceWrites
from provisioning.registry.issuance import IssuanceWrites
from provisioning.registry.revocation import RevocationWrites
from provisioning.registry.schema import HEAD_KEY
from provisioning.registry.tokens import TokenWrites


class Transaction(IssuanceWrites, RevocationWrites, DeviceWrites, TokenWrites):
    """Writes inside one ``BEGIN IMMEDIATE``; the audit head is read under the same lock.

    Rows are written through the writes named for CA actions, from the mixins: issuing
    (:class:`IssuanceWrites`: devices, certificates, renewals, promised files), revocation
    (:class:`RevocationWrites`: revoke, hold, release, CRL entries and number), devices
    (:class:`DeviceWrites`: status, group, password hash) and tokens (:class:`TokenWrites`).
    Audit events are queued by :meth:`audit` and written by :meth:`flush` just before the
    commit (``Registry.write`` does both). :meth:`execute` is raw SQL for tests and repairs.
    """

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
        """Raw SQL in this transaction: for tests and repairs, not for the CA's code."""
        return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql, rows)

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
