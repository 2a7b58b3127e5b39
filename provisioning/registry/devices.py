"""The writes on devices: status, group, MQTT password hash.

:class:`DeviceWrites` is part of :class:`provisioning.registry.transactions.Transaction`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from provisioning.registry._sql import in_batches


class DeviceWrites:
    """Named reads and writes of ``devices`` under the write lock."""

    conn: sqlite3.Connection

    def device_status(self, device_id: str) -> str | None:
        """The device's status; None when the registry has no such device."""
        row = self.conn.execute("SELECT status FROM devices WHERE device_id = ?",
                                (device_id,)).fetchone()
        return None if row is None else str(row[0])

    def device_groups(self, device_ids: Sequence[str]) -> dict[str, str | None]:
        """device id -> group for those of *device_ids* that exist."""
        groups: dict[str, str | None] = {}
        for part, marks in in_batches(device_ids):
            groups.update(self.conn.execute(
                f'SELECT device_id, "group" FROM devices WHERE device_id IN ({marks})',  # noqa: S608
                part).fetchall())
        return groups

    def set_group(self, device_id: str, group: str | None, stamp: str) -> None:
        self.conn.execute('UPDATE devices SET "group" = ?, updated_at = ? WHERE device_id = ?',
                          (group, stamp, device_id))

    def set_device_status(self, device_id: str, status: str, stamp: str) -> None:
        self.conn.execute("UPDATE devices SET status = ?, updated_at = ? WHERE device_id = ?",
                          (status, stamp, device_id))

    def set_password_hash(self, device_id: str, stored: str | None, stamp: str) -> None:
        """The hub's second factor (``scrypt$...``); None clears it."""
        self.conn.execute("UPDATE devices SET password_hash = ?, updated_at = ? "
                          "WHERE device_id = ?", (stored, stamp, device_id))
