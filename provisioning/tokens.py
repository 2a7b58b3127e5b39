"""Enrollment tokens: a name and a secret shown once, stored only as a scrypt hash.

A factory line authenticates to the enrollment service with HTTP Basic, user = token name,
password = the secret (DESIGN section 7). The registry keeps ``scrypt$...`` hashes
(:func:`provisioning.identity.hash_password`), never the secret.

The service side (:class:`TokenBook`) must not pay scrypt's ~50 ms on every request: once a
secret has verified against a stored hash, an HMAC of it under a per-process key is
remembered, and later requests with the same secret cost one HMAC. Revocation still takes
effect at once: the rows are re-read whenever the registry changes (``PRAGMA data_version``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from enum import Enum

from provisioning.errors import ConflictError, NotFoundError, UsageError
from provisioning.identity import DEVICE_ID_PATTERN, hash_password, is_valid_device_id
from provisioning.registry.store import Registry
from provisioning.registry.tokens import TOKEN_REVOKED
from provisioning.timefmt import iso, utcnow

SECRET_BYTES = 32


def new_secret() -> str:
    """32 random bytes, URL-safe base64 without padding (43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def check_name(name: str) -> None:
    """Token names follow the device-id rules: no ':' (HTTP Basic splits on it), no spaces."""
    if not is_valid_device_id(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise UsageError(f"token name {shown!r} is not valid (want {DEVICE_ID_PATTERN}, "
                         "1-64 characters)", "NAME")


def create(registry: Registry, name: str, actor: str) -> str:
    """Insert a token with its audit event in one transaction; returns the secret."""
    check_name(name)
    secret = new_secret()
    stored = hash_password(secret)  # scrypt outside the write lock
    stamp = iso(utcnow())
    with registry.write(actor) as tx:
        status = tx.token_status(name)
        if status is not None:
            why = " (revoked; token names are never reused)" if status == TOKEN_REVOKED else ""
            raise ConflictError(f"token {name!r} already exists{why}", name)
        tx.add_token(name, stored, stamp)
        tx.audit(stamp, "token.create", None, None, {"name": name})
    return secret


def revoke(registry: Registry, name: str, actor: str) -> bool:
    """Mark the token revoked; False (and no event) when it already was."""
    stamp = iso(utcnow())
    with registry.write(actor) as tx:
        status = tx.token_status(name)
        if status is None:
            raise NotFoundError(f"no enrollment token {name!r} in the registry", name)
        if status == TOKEN_REVOKED:
            return False
        tx.revoke_token(name, stamp)
        tx.audit(stamp, "token.revoke", None, None, {"name": name})
    return True


class TokenCheck(Enum):
    """What :meth:`TokenBook.check` decided without running scrypt."""

    OK = "ok"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    VERIFY = "verify"  # a secret not seen before: scrypt must decide


@dataclass(frozen=True)
class TokenRow:
    name: str
    hash: str
    revoked: bool


class TokenBook:
    """The service's view of the tokens table plus the secrets already verified.

    ``refresh`` and ``check`` run on the thread that owns the registry connection;
    ``remember`` may run elsewhere (single dict assignments are atomic in CPython). *key*
    is the HMAC key (random by default): another process computes the same ``mac`` with it.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        self._rows: dict[str, TokenRow] = {}
        self._verified: dict[str, tuple[str, bytes]] = {}
        self._version: int | None = None

    def mac(self, name: str, secret: str) -> bytes:
        """What the cache compares: never the secret itself."""
        message = name.encode() + b"\0" + secret.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def refresh(self, registry: Registry) -> None:
        """Re-read the rows when another connection committed anything since last time."""
        version = registry.data_version()
        if version == self._version:
            return
        self._rows = {name: TokenRow(name, stored, revoked is not None) for name, stored, revoked
                      in registry.tokens()}
        self._version = version

    def check(self, name: str, mac: bytes) -> tuple[TokenCheck, str | None]:
        """The decision and, for ``VERIFY``, the stored hash to run scrypt against."""
        row = self._rows.get(name)
        if row is None:
            return TokenCheck.UNKNOWN, None
        if row.revoked:
            return TokenCheck.REVOKED, None
        known = self._verified.get(name)
        if known is not None and known[0] == row.hash and hmac.compare_digest(known[1], mac):
            return TokenCheck.OK, None
        return TokenCheck.VERIFY, row.hash

    def remember(self, name: str, stored_hash: str, mac: bytes) -> None:
        """Record a secret that scrypt accepted for *stored_hash*."""
        self._verified[name] = (stored_hash, mac)
