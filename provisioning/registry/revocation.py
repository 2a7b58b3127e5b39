"""The writes of revocation: revoke, hold, release, and the CRL's entries and number.

:class:`RevocationWrites` is part of :class:`provisioning.registry.transactions.Transaction`;
``provisioning.authority`` decides what to revoke and ``provisioning.crl`` signs the list.
"""

from __future__ import annotations

import sqlite3

from provisioning.registry.schema import CRL_NUMBER_KEY

# (serial, status, revoked_at, reason) of a CRL entry
CRLEntry = tuple[str, str, str, str | None]
# (serial, device id, superseded_at) of a superseded certificate whose grace is over
SupersededRow = tuple[str, str, str]
# Written so the partial index of migration v3 (status = 'superseded') serves it.
_SUPERSEDED_DUE = ("SELECT serial, device_id, superseded_at FROM certificates "
                   "WHERE status = 'superseded' AND superseded_at < ? "
                   "ORDER BY superseded_at, serial LIMIT ?")


def superseded_due(conn: sqlite3.Connection, cutoff: str, limit: int = -1,
                   ) -> list[SupersededRow]:
    """Superseded certificates superseded before *cutoff* (ISO text), oldest first."""
    return [(r[0], r[1], r[2]) for r in conn.execute(_SUPERSEDED_DUE, (cutoff, limit))]


class RevocationWrites:
    """Revocation's named reads and writes under the write lock."""

    conn: sqlite3.Connection

    def certificate_status(self, serial: str, device_id: str) -> str | None:
        """The status of the device's certificate *serial*; None when it has none such."""
        row = self.conn.execute("SELECT status FROM certificates WHERE serial = ? AND "
                                "device_id = ?", (serial, device_id)).fetchone()
        return None if row is None else str(row[0])

    def unrevoked_serials(self, device_id: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT serial FROM certificates WHERE device_id = ? AND status != 'revoked'",
            (device_id,))]

    def revoke_device(self, device_id: str, stamp: str) -> None:
        """The device may never enroll again under its id (its certificates: :meth:`revoke`)."""
        self.conn.execute("UPDATE devices SET status = 'revoked', updated_at = ? WHERE "
                          "device_id = ? AND status != 'revoked'", (stamp, device_id))

    def revoke(self, serial: str, stamp: str, reason: str) -> None:
        """Revoke one certificate with an RFC 5280 reason name; a hold it had is forgotten."""
        self.conn.execute("UPDATE certificates SET status = 'revoked', revoked_at = ?, "
                          "reason = ?, hold_prior_status = NULL WHERE serial = ?",
                          (stamp, reason, serial))

    def superseded_due(self, cutoff: str) -> list[SupersededRow]:
        """Under the write lock: the superseded certificates whose grace ended by *cutoff*."""
        return superseded_due(self.conn, cutoff)

    def hold(self, device_id: str, stamp: str) -> list[str]:
        """certificateHold on the device's active and superseded certificates; their serials.

        Each remembers its status for :meth:`release`.
        """
        serials = [r[0] for r in self.conn.execute(
            "SELECT serial FROM certificates WHERE device_id = ? AND status IN "
            "('active', 'superseded')", (device_id,))]
        for s in serials:
            self.conn.execute("UPDATE certificates SET hold_prior_status = status, "
                              "status = 'on_hold', revoked_at = ?, reason = "
                              "'certificateHold' WHERE serial = ?", (stamp, s))
        return serials

    def release(self, device_id: str) -> list[str]:
        """Lift the device's holds: each certificate returns to its status before; serials."""
        serials = [r[0] for r in self.conn.execute(
            "SELECT serial FROM certificates WHERE device_id = ? AND status = 'on_hold'",
            (device_id,))]
        for s in serials:
            self.conn.execute("UPDATE certificates SET status = COALESCE(hold_prior_status, "
                              "'active'), hold_prior_status = NULL, revoked_at = NULL, "
                              "reason = NULL WHERE serial = ?", (s,))
        return serials

    def crl_entries(self, now_iso: str, issuer_key_id: str | None = None,
                    *, unstamped: bool = True) -> list[CRLEntry]:
        """Revoked and held certificates not yet expired at *now_iso*, oldest first.

        With *issuer_key_id*: only that issuing CA's, plus (*unstamped*) the rows from before
        the registry recorded issuers (the current CA's, see :mod:`.schema`)."""
        if issuer_key_id is None:
            return self.conn.execute(
                "SELECT serial, status, revoked_at, reason FROM certificates "
                "WHERE status IN ('revoked', 'on_hold') AND not_after > ? "
                "ORDER BY revoked_at, serial", (now_iso,)).fetchall()
        null = " OR issuer_key_id IS NULL" if unstamped else ""
        return self.conn.execute(
            "SELECT serial, status, revoked_at, reason FROM certificates "  # noqa: S608
            f"WHERE status IN ('revoked', 'on_hold') AND not_after > ? "
            f"AND (issuer_key_id = ?{null}) ORDER BY revoked_at, serial",
            (now_iso, issuer_key_id)).fetchall()

    def stamp_issuer(self, issuer_key_id: str) -> int:
        """Record *issuer_key_id* on every certificate row that names no issuer (written
        before v4, when the PKI had one issuing CA); how many rows."""
        return self.conn.execute("UPDATE certificates SET issuer_key_id = ? WHERE "
                                 "issuer_key_id IS NULL", (issuer_key_id,)).rowcount

    def crl_number(self) -> int:
        """The number of the last CRL published (0 before the first)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?",
                                (CRL_NUMBER_KEY,)).fetchone()
        return int(row[0]) if row else 0

    def set_crl_number(self, number: int) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (CRL_NUMBER_KEY, str(number)))
