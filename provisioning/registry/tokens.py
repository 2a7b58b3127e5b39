"""The writes on enrollment tokens (``provisioning.tokens`` decides; the secret is never here).

:class:`TokenWrites` is part of :class:`provisioning.registry.transactions.Transaction`.
"""

from __future__ import annotations

import sqlite3

TOKEN_ACTIVE = "active"  # noqa: S105 (a status, not a secret)
TOKEN_REVOKED = "revoked"  # noqa: S105 (a status, not a secret)


class TokenWrites:
    """Named reads and writes of ``tokens`` under the write lock."""

    conn: sqlite3.Connection

    def token_status(self, name: str) -> str | None:
        """:data:`TOKEN_ACTIVE`, :data:`TOKEN_REVOKED`, or None when there is no such token."""
        row = self.conn.execute("SELECT revoked_at FROM tokens WHERE name = ?",
                                (name,)).fetchone()
        if row is None:
            return None
        return TOKEN_ACTIVE if row[0] is None else TOKEN_REVOKED

    def add_token(self, name: str, stored_hash: str, stamp: str) -> None:
        self.conn.execute("INSERT INTO tokens (name, hash, created_at) VALUES (?, ?, ?)",
                          (name, stored_hash, stamp))

    def revoke_token(self, name: str, stamp: str) -> None:
        self.conn.execute("UPDATE tokens SET revoked_at = ? WHERE name = ?", (stamp, name))
