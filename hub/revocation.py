"""Which certificates and devices the hub refuses, kept fresh from the registry and CRLs.

Sources, from ``[revocation]`` (DESIGN section 5):

- ``registry``: the CA's SQLite registry on the same host, opened read-only. ``PRAGMA
  data_version`` tells whether another connection committed since the last look, and
  ``meta.audit_head`` (moved by every CA action, DESIGN section 3) whether that commit was a CA
  action, so an unchanged registry costs one ``stat`` and one PRAGMA per refresh. The PRAGMA
  only sees commits made through SQLite: when the file itself changes under the connection
  (another inode, size or mtime: a restore, a checkpoint, or garbage written over it) the
  header is checked and the registry reopened and read in full, so a broken file is reported
  down instead of answering from the old connection's cache.
- ``crl-file``: a CRL file, re-read when its inode, mtime or size changes.
- ``crl-url``: a CRL over http(s), fetched every refresh with a conditional GET.

A CRL is used only when its signature verifies against a ``client_ca`` certificate whose subject
is the CRL's issuer, and never when its CRL number is below the last one accepted from the same
source (RFC 5280 §5.2.3: the number only grows, so a lower one is an old list replayed).
The number to beat is that of the last *good* CRL: one that arrived before its nextUpdate. A
higher-numbered CRL that arrives already past its nextUpdate (a CA with a slow clock) does not
replace the good list: it is enforced together with it (a serial listed by either is refused),
the source reports ``stale``, and the good CRL put back is not a rollback. A later fresh CRL
with a number at least the stale one's supersedes both. A first CRL that arrives stale is used
(better than nothing) and reported stale.

The :class:`Snapshot` is the union of every source's last good data and is replaced wholesale
on change, so a reader needs no lock. A source that cannot be read keeps its last good data and
reports ``ok=False``; a CRL past its nextUpdate is still used and reports ``stale=True``; each
change of state is logged once on ``hub.revocation`` and handed to ``on_source`` (the hub
audits it). Nothing fails open (drops entries) or closed (refuses everyone) without saying
so. Blocking work (SQLite, file reads, CRL parsing and signature checks) runs in worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from hub.config import RevocationConfig
from hub.errors import HubError

__all__ = [
    "RevocationError",
    "RevocationWatcher",
    "Snapshot",
    "SourceHealth",
    "SourceState",
    "load_ca_bundle",
    "refusal",
]

logger = logging.getLogger("hub.revocation")

HTTP_TIMEOUT_S: Final = 10.0  # one CRL fetch, connect to last byte
MAX_CRL_BYTES: Final = 64 * 1024 * 1024  # far above any fleet's CRL; bounds a hostile server
_AUDIT_HEAD_KEY: Final = "audit_head"  # provisioning.audit.HEAD_KEY (the hub may not import it)
_CERT_REASONS: Final = {"revoked": "revoked", "on_hold": "on-hold"}
_DEVICE_REASONS: Final = {"suspended": "device-suspended", "revoked": "device-revoked"}
_SQLITE_TIMEOUT_S: Final = 5.0
FAST_POLL_SECONDS: Final = 0.1
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"  # the first 16 bytes of every database file
_SQLITE_HEADER_BYTES: Final = 100


class RevocationError(HubError):
    """The watcher cannot start: no configured source could be loaded (one line)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The refused serials and devices at one moment; replaced wholesale, never mutated.

    ``groups`` (device id -> group, registry only) is beyond the revocation contract: it is
    there because the registry is the hub's only source for the ACL's ``{group}``.
    """

    revoked: Mapping[int, str]  # serial -> "revoked" | "on-hold"
    devices: Mapping[str, str]  # device id -> "suspended" | "revoked"; active devices absent
    password_hashes: Mapping[str, str]  # device id -> stored hash; registry only
    version: int  # +1 on every content change
    groups: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


_EMPTY_SNAPSHOT: Final = Snapshot(MappingProxyType({}), _EMPTY, _EMPTY, 0)


def refusal(snapshot: Snapshot, serial: int, device_id: str) -> str | None:
    """Why *serial* / *device_id* is refused, in DESIGN section 5's order; None when allowed.

    The certificate first (``revoked``, ``on-hold``), then its device (``device-suspended``,
    ``device-revoked``).
    """
    reason = snapshot.revoked.get(serial)
    if reason is not None:
        return reason
    status = snapshot.devices.get(device_id)
    if status is None:
        return None
    # A status this hub does not know is still not "active": refuse, reversibly.
    return _DEVICE_REASONS.get(status, "device-suspended")


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """One source as ``/healthz`` and ``/metrics`` show it; times are ``time.time()`` values."""

    name: str  # "registry" | "crl-file" | "crl-url"
    ok: bool  # the last attempt succeeded; False before the first one
    stale: bool  # the CRL in use is past its nextUpdate (it is still used)
    last_success: float | None
    last_error: str | None  # why the last attempt failed; None while ok
    entries: int  # revoked or held serials in the source's last good data
    next_update: float | None  # the CRL's nextUpdate; None for the registry
    warning: str | None = None  # why the source is stale, one line; None while fresh


class SourceState(enum.Enum):
    """A source's state as ``on_source`` hears of it, once per change."""

    DOWN = "down"  # the last attempt failed: the last good data stays in force
    STALE = "stale"  # loaded, but the list in use is past its nextUpdate
    UP = "up"  # loaded and fresh again


SourceCallback = Callable[[str, SourceState, str | None], None]
"""``on_source(name, state, why)``: *why* is the error or the staleness; None for UP."""


def load_ca_bundle(path: Path | str) -> list[x509.Certificate]:
    """The PEM certificates of a CA bundle (``client_ca``); RevocationError if there are none."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise RevocationError(f"cannot read the CA bundle: {exc.strerror} ({file})") from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise RevocationError(f"the CA bundle holds no PEM certificate: {exc} ({file})") from exc


# -- one source's data and state ----------------------------------------------------------------


class _SourceError(Exception):
    """A source cannot be used now; the message says why, in one line."""


class _Still(enum.Enum):
    UNCHANGED = "unchanged"  # looked, nothing new: a success
    PENDING = "pending"  # a fetch is still in flight: no news either way


@dataclass(frozen=True, slots=True)
class _Data:
    revoked: dict[int, str]
    devices: dict[str, str] = field(default_factory=dict)
    password_hashes: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    next_update: float | None = None
    crl_number: int | None = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Source:
    """Last good data, health and once-per-change logging; subclasses implement ``_attempt``."""

    name = "source"
    local = False  # cheap to look at: polled every FAST_POLL_SECONDS, not refresh_seconds

    def __init__(self, where: str) -> None:
        self.where = where
        self.data: _Data | None = None
        self.ok = False
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.on_state: SourceCallback | None = None  # set by the watcher
        self._logged = ("ok", "")

    async def _attempt(self, budget: float | None) -> _Data | _Still:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections; the source reopens them if polled again."""

    async def poll(self, budget: float | None) -> bool:
        """Look once; True when the source has new data. Never raises."""
        changed = False
        try:
            outcome = await self._attempt(budget)
        except _SourceError as exc:
            self.ok, self.last_error = False, _one_line(str(exc))
        except Exception as exc:  # a bug here must not silence the other sources
            logger.exception("revocation source %s (%s): unexpected error", self.name, self.where)
            self.ok, self.last_error = False, _one_line(f"internal error: {exc!r}")
        else:
            if outcome is not _Still.PENDING:
                if isinstance(outcome, _Data):
                    self.data, changed = outcome, True
                self.ok, self.last_error, self.last_success = True, None, time.time()
        self._log_state()
        return changed

    def stale(self, now: float) -> bool:
        next_update = self.data.next_update if self.data is not None else None
        return next_update is not None and now > next_update

    def warning(self, now: float) -> str | None:
        """Why the source is stale, in one line that does not change while the state holds."""
        data = self.data
        if data is None or data.next_update is None or not self.stale(now):
            return None
        return f"past its nextUpdate {_iso(data.next_update)}"

    def health(self, now: float) -> SourceHealth:
        data = self.data
        return SourceHealth(
            name=self.name, ok=self.ok, stale=self.stale(now), last_success=self.last_success,
            last_error=self.last_error, entries=len(data.revoked) if data else 0,
            next_update=data.next_update if data else None, warning=self.warning(now),
        )

    def _log_state(self) -> None:
        if not self.ok:
            state = ("failed", self.last_error or "")
        else:
            warning = self.warning(time.time())
            state = ("ok", "") if warning is None else ("stale", warning)
        if state == self._logged:
            return
        self._logged = state
        data = self.data
        entries = len(data.revoked) if data is not None else 0
        if state[0] == "failed":
            kept = (f"keeping its last good list of {entries} entries"
                    if data is not None else "it has given no list yet")
            logger.warning("revocation source %s (%s) cannot be used: %s; %s",
                           self.name, self.where, state[1], kept)
            self._tell(SourceState.DOWN, state[1])
        elif state[0] == "stale":
            logger.warning("revocation source %s (%s) is stale: %s; still using its list of "
                           "%d entries", self.name, self.where, state[1], entries)
            self._tell(SourceState.STALE, state[1])
        else:
            logger.info("revocation source %s (%s) is ok again", self.name, self.where)
            self._tell(SourceState.UP, None)

    def _tell(self, state: SourceState, why: str | None) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(self.name, state, why)
        except Exception:  # the watcher goes on whatever the integrator's callback does
            logger.exception("revocation on_source callback failed")


# -- the registry -------------------------------------------------------------------------------


def _open_read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: the hub never writes the CA's registry, whatever a bug might try.
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                           timeout=_SQLITE_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _check_header(path: Path) -> None:
    """Refuse a file that is no SQLite database before SQLite reads it (or a WAL masks it)."""
    try:
        with path.open("rb") as file:
            header = file.read(_SQLITE_HEADER_BYTES)
    except FileNotFoundError:
        raise _SourceError("no such file") from None
    except OSError as exc:
        raise _SourceError(f"cannot read the registry: {exc.strerror}") from exc
    if len(header) < _SQLITE_HEADER_BYTES:
        raise _SourceError(f"the registry is truncated: {len(header)} bytes, shorter than an "
                           "SQLite header")
    if not header.startswith(_SQLITE_MAGIC):
        raise _SourceError("the registry is not an SQLite database any more (its header is "
                           "gone: overwritten?)")


class _RegistrySource(_Source):
    """The same-host registry; its connection is used by one worker thread at a time."""

    name = "registry"
    local = True

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int, int, int] | None = None  # dev, inode, size, mtime
        self._seen: tuple[int, str | None] | None = None  # (data_version, audit head) loaded
        # The watcher's asyncio lock already serialises polls; this one also covers a poll
        # whose awaiting coroutine was cancelled while its thread still runs.
        self._thread_lock = threading.Lock()

    async def _attempt(self, budget: float | None) -> _Data | _Still:
        return await asyncio.to_thread(self._read)

    async def close(self) -> None:
        await asyncio.to_thread(self._disconnect)

    def _disconnect(self) -> None:
        with self._thread_lock:
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._file_id, self._seen = None, None, None

    def _read(self) -> _Data | _Still:
        with self._thread_lock:
            return self._read_locked()

    def _read_locked(self) -> _Data | _Still:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            self._drop_connection()
            raise _SourceError("no such file") from None
        except OSError as exc:
            self._drop_connection()
            raise _SourceError(f"cannot stat the registry: {exc.strerror}") from exc
        file_id = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        try:
            if self._conn is None or file_id != self._file_id:
                # First look, or the file changed under the connection. A restore (another
                # inode) leaves the old connection reading the old file; garbage written over
                # the same inode leaves it answering from its cache and data_version unmoved.
                # So: check the header, reopen, and read everything afresh.
                self._drop_connection()
                _check_header(self._path)
                self._conn, self._file_id = _open_read_only(self._path), file_id
            return self._query(self._conn)
        except _SourceError:
            self._drop_connection()
            raise
        except sqlite3.Error as exc:
            self._drop_connection()
            raise _SourceError(f"cannot read the registry: {exc}") from exc

    def _query(self, conn: sqlite3.Connection) -> _Data | _Still:
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if self._seen is not None and self._seen[0] == version:
            return _Still.UNCHANGED  # no other connection has committed since the last look
        conn.execute("BEGIN")  # one read transaction: the head and the rows of one commit
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = ?",
                               (_AUDIT_HEAD_KEY,)).fetchone()
            head = None if row is None else str(row[0])
            if self._seen is not None and self._seen[1] == head:
                self._seen = (version, head)  # a write that was no CA action
                return _Still.UNCHANGED
            revoked = {
                int(serial, 16): _CERT_REASONS[status]
                for serial, status in conn.execute(
                    "SELECT serial, status FROM certificates "
                    "WHERE status IN ('revoked', 'on_hold')")
            }
            devices, hashes, groups = {}, {}, {}
            for device_id, status, password_hash, group in conn.execute(
                    'SELECT device_id, status, password_hash, "group" FROM devices '
                    "WHERE status != 'active' OR password_hash IS NOT NULL "
                    'OR "group" IS NOT NULL'):
                if status != "active":
                    devices[device_id] = "revoked" if status == "revoked" else "suspended"
                if password_hash is not None:
                    hashes[device_id] = password_hash
                if group is not None:
                    groups[device_id] = group
        except ValueError as exc:  # a serial that is not hex
            raise _SourceError(f"the registry holds a malformed serial: {exc}") from exc
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        self._seen = (version, head)
        return _Data(revoked, devices, hashes, groups)


# -- CRLs ---------------------------------------------------------------------------------------

_SIGNER_KEYS = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey,
                ed448.Ed448PublicKey, dsa.DSAPublicKey)


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    with contextlib.suppress(x509.ExtensionNotFound):
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    with contextlib.suppress(x509.ExtensionNotFound):
        # RFC 5280 §4.2.1.3: a CRL signer's key usage must include cRLSign.
        if not ca.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign:
            return False
    key = ca.public_key()
    return isinstance(key, _SIGNER_KEYS) and crl.is_signature_valid(key)


class _CrlVerifier:
    """Parse a CRL (PEM or DER) and accept it only from a client_ca CA (rollbacks: _CrlLists)."""

    def __init__(self, ca_certs: Sequence[x509.Certificate]) -> None:
        self._cas = tuple(ca_certs)

    def check(self, blob: bytes) -> _Data:
        """Runs in a worker thread: parsing and signature checks are CPU work."""
        try:
            return self._check(blob)
        except ValueError as exc:  # cryptography's word for malformed DER, anywhere in it
            raise _SourceError(f"not a valid CRL: {exc}") from exc

    def _check(self, blob: bytes) -> _Data:
        if not blob.strip():
            raise _SourceError("empty CRL")
        if b"-----BEGIN X509 CRL-----" in blob:
            crl = x509.load_pem_x509_crl(blob)
        else:
            crl = x509.load_der_x509_crl(blob)
        issuer = crl.issuer.rfc4514_string()
        signers = [ca for ca in self._cas if ca.subject == crl.issuer]
        if not signers:
            raise _SourceError(f"CRL issuer {issuer!r} is not a CA of the client_ca bundle")
        if not any(_signed_by(crl, ca) for ca in signers):
            raise _SourceError(f"CRL signature does not verify against the client_ca "
                                 f"certificate of {issuer!r}")
        _refuse_unusable_extensions(crl)
        number = _crl_number(crl)
        next_update = crl.next_update_utc
        return _Data(_entries(crl), crl_number=number,
                     next_update=None if next_update is None else next_update.timestamp())


@dataclass(frozen=True, slots=True)
class _CrlLists:
    """What one CRL source enforces: its last good CRL, and a newer one that arrived stale.

    DESIGN section 5: a CRL already past its nextUpdate when it arrives (a CA with a slow
    clock) must not replace the last good list, yet it is genuine and newer, so both are
    enforced (``data`` is their union). Only a CRL that arrives fresh moves the rollback floor;
    otherwise the stale one would make the good one, put back, look like a rollback.
    """

    good: _Data | None = None  # the last CRL that arrived before its nextUpdate
    newer: _Data | None = None  # a higher-numbered CRL that arrived past its nextUpdate
    data: _Data | None = None  # the union, computed once (in the worker thread)

    def take(self, incoming: _Data, now: float) -> _CrlLists:
        """The lists once *incoming* (signature already verified) is taken; raises on a
        rollback. Runs in a worker thread: the union of two large lists is CPU work."""
        number = incoming.crl_number
        assert number is not None  # noqa: S101 - the verifier refuses a CRL without one
        good, newer = self.good, self.newer
        floor = good.crl_number if good is not None else None
        if floor is not None and number < floor:
            raise _SourceError(f"CRL number {number} is below {floor}, the last good one: "
                               "refusing a rollback")
        arrived_stale = incoming.next_update is not None and incoming.next_update <= now
        if not arrived_stale or number == floor:
            # Fresh (or the good CRL itself again, now past its nextUpdate): the new good list.
            # A stale-on-arrival CRL numbered above it is still newer: it stays in the union.
            kept = newer if newer is not None and _number(newer) > number else None
            return _CrlLists.of(incoming, kept)
        if newer is not None and number < _number(newer):
            raise _SourceError(f"CRL number {number} is below {_number(newer)}, a newer one "
                               "already taken (past its nextUpdate): refusing a rollback")
        return _CrlLists.of(good, incoming)

    @classmethod
    def of(cls, good: _Data | None, newer: _Data | None) -> _CrlLists:
        if good is None or newer is None:
            return cls(good, newer, good or newer)
        revoked = dict(newer.revoked)
        for serial, reason in good.revoked.items():
            if reason == "revoked" or serial not in revoked:  # revoked outranks on-hold
                revoked[serial] = reason
        next_update = min(t for t in (good.next_update, newer.next_update) if t is not None)
        return cls(good, newer, _Data(revoked, next_update=next_update,
                                      crl_number=good.crl_number))

    def warning(self, now: float) -> str | None:
        """Why these lists are stale; None while fresh. Stable while the lists are unchanged."""
        good, newer = self.good, self.newer
        if newer is not None and newer.next_update is not None:
            arrived = (f"CRL number {_number(newer)} arrived already past its nextUpdate "
                       f"{_iso(newer.next_update)}")
            if good is None:
                return f"{arrived}; used, as no earlier good CRL is known"
            return (f"{arrived}; enforced together with CRL number {_number(good)}, the last "
                    "good one")
        if good is not None and good.next_update is not None and now > good.next_update:
            return f"CRL number {_number(good)} is past its nextUpdate {_iso(good.next_update)}"
        return None


def _number(data: _Data) -> int:
    return data.crl_number if data.crl_number is not None else -1


def _refuse_unusable_extensions(crl: x509.CertificateRevocationList) -> None:
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            raise _SourceError("a delta CRL; want a complete CRL")
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            # RFC 5280 §5.2: a critical extension we cannot process voids the CRL.
            raise _SourceError(f"unknown critical CRL extension {ext.oid.dotted_string}")


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        raise _SourceError("CRL has no CRL number (RFC 5280 §5.2.3)") from None


def _entries(crl: x509.CertificateRevocationList) -> dict[int, str]:
    revoked: dict[int, str] = {}
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = x509.ReasonFlags.unspecified
        if reason is x509.ReasonFlags.remove_from_crl:
            continue  # only meaningful in delta CRLs (RFC 5280 §5.3.1)
        revoked[entry.serial_number] = (
            "on-hold" if reason is x509.ReasonFlags.certificate_hold else "revoked")
    return revoked


class _CrlSource(_Source):
    """A source of CRLs: keeps the last good CRL and a newer one that arrived stale."""

    def __init__(self, where: str, verifier: _CrlVerifier) -> None:
        super().__init__(where)
        self._verifier = verifier
        self.lists = _CrlLists()

    def _take(self, blob: bytes, lists: _CrlLists) -> _CrlLists:
        """Verify *blob* and fold it into *lists*; runs in a worker thread."""
        return lists.take(self._verifier.check(blob), time.time())

    def _accept(self, lists: _CrlLists) -> _Data:
        """On the event loop: the new lists are the source's, their union its data."""
        self.lists = lists
        assert lists.data is not None  # noqa: S101 - take() always leaves one list
        return lists.data

    def warning(self, now: float) -> str | None:
        return self.lists.warning(now) if self.stale(now) else None


class _CrlFileSource(_CrlSource):
    name = "crl-file"
    local = True

    def __init__(self, path: Path, verifier: _CrlVerifier) -> None:
        super().__init__(str(path), verifier)
        self._path = path
        self._key: tuple[int, int, int, int] | None = None  # the file last accepted

    async def _attempt(self, budget: float | None) -> _Data | _Still:
        outcome = await asyncio.to_thread(self._read, self.lists)
        return outcome if isinstance(outcome, _Still) else self._accept(outcome)

    def _read(self, lists: _CrlLists) -> _CrlLists | _Still:
        try:
            stat = self._path.stat()
            key = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if key == self._key:
                return _Still.UNCHANGED
            blob = self._path.read_bytes()
        except FileNotFoundError:
            raise _SourceError("no such file") from None
        except OSError as exc:
            raise _SourceError(f"cannot read the CRL: {exc.strerror}") from exc
        self._key = None  # until this content is accepted, look again every time
        taken = self._take(blob, lists)
        self._key = key
        return taken


def _tls_context(cadata: str) -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system's trust store, hostname checks
    if cadata:
        context.load_verify_locations(cadata=cadata)  # plus the fleet's own CAs
    return context


class _CrlUrlSource(_CrlSource):
    """A CRL over http(s). A slow fetch carries on across refresh cycles, never blocking them."""

    name = "crl-url"

    def __init__(self, url: str, verifier: _CrlVerifier, cadata: str) -> None:
        super().__init__(url, verifier)
        self._url = url
        self._cadata = cadata
        self._session: aiohttp.ClientSession | None = None
        self._validators: dict[str, str] = {}  # conditional-GET headers of the accepted CRL
        self._inflight: asyncio.Task[_CrlLists | _Still] | None = None

    async def _attempt(self, budget: float | None) -> _Data | _Still:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name=f"fetch {self._url}")
        done, _ = await asyncio.wait({self._inflight}, timeout=budget)
        if not done:
            return _Still.PENDING
        task, self._inflight = self._inflight, None
        outcome = task.result()
        return outcome if isinstance(outcome, _Still) else self._accept(outcome)

    async def _fetch(self) -> _CrlLists | _Still:
        if self._session is None:
            context = await asyncio.to_thread(_tls_context, self._cadata)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
            )
        headers = self._validators if self.data is not None else {}
        try:
            async with self._session.get(self._url, headers=headers) as response:
                if response.status == 304 and self.data is not None:
                    return _Still.UNCHANGED
                if response.status != 200:
                    raise _SourceError(f"HTTP {response.status} {response.reason or ''}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_CRL_BYTES:
                        raise _SourceError(f"CRL larger than {MAX_CRL_BYTES} bytes")
                validators = {
                    request: response.headers[reply]
                    for request, reply in (("If-None-Match", "ETag"),
                                           ("If-Modified-Since", "Last-Modified"))
                    if reply in response.headers
                }
        except TimeoutError:
            raise _SourceError(f"no answer within {HTTP_TIMEOUT_S:g} s") from None
        except aiohttp.ClientError as exc:
            raise _SourceError(f"cannot fetch the CRL: {exc}") from exc
        taken = await asyncio.to_thread(self._take, bytes(body), self.lists)
        self._validators = validators
        return taken

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# -- the watcher --------------------------------------------------------------------------------


class RevocationWatcher:
    """Keeps :attr:`snapshot` fresh from the configured sources, every ``refresh_seconds``.

    ``on_change(old, new)`` is called on the event loop after each content change made by
    :meth:`refresh` or the refresh loop (not for the first load in :meth:`start`).
    ``on_source(name, state, why)`` is called on the event loop once per change of a source's
    state (down, stale, up again), including a failure in :meth:`start`.
    """

    def __init__(
        self,
        config: RevocationConfig,
        ca_certs: Sequence[x509.Certificate],
        on_change: Callable[[Snapshot, Snapshot], None] | None = None,
        *,
        on_source: SourceCallback | None = None,
    ) -> None:
        self._config = config
        self._on_change = on_change
        verifier = _CrlVerifier(ca_certs)
        self._sources: list[_Source] = []
        if config.registry is not None:
            self._sources.append(_RegistrySource(config.registry))
        if config.crl_file is not None:
            self._sources.append(_CrlFileSource(config.crl_file, verifier))
        if config.crl_url is not None:
            cadata = "".join(cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
                             for cert in ca_certs)
            self._sources.append(_CrlUrlSource(config.crl_url, verifier, cadata))
        for source in self._sources:
            source.on_state = on_source
        self._snapshot = _EMPTY_SNAPSHOT
        self._lock = asyncio.Lock()  # one refresh cycle at a time
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def snapshot(self) -> Snapshot:
        """The current refusals; empty until :meth:`start` has loaded them."""
        return self._snapshot

    async def start(self) -> None:
        """Load every source once, then refresh every ``refresh_seconds`` in one task.

        Raises RevocationError when no source can be loaded; a source that fails here while
        another loads is reported unhealthy and retried on every refresh.
        """
        if self._task is not None:
            raise RevocationError("the revocation watcher is already running")
        if not self._sources:
            raise RevocationError("no revocation source configured: set revocation.registry "
                                  "or revocation.crl")
        await self._cycle(budget=None, notify=False)
        if all(source.data is None for source in self._sources):
            problems = "; ".join(f"{s.name} {s.where}: {s.last_error}" for s in self._sources)
            async with self._lock:
                await self._close_sources()
            raise RevocationError(_one_line(f"no revocation source could be loaded: {problems}"))
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="hub.revocation refresh")

    async def stop(self) -> None:
        """Stop the refresh loop (letting a cycle in progress finish) and close connections."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            await task
        async with self._lock:
            await self._close_sources()

    async def refresh(self) -> bool:
        """One refresh cycle now, waiting for every source; True if the content changed."""
        return await self._cycle(budget=None, notify=True)

    def health(self) -> list[SourceHealth]:
        """Each configured source's state, in the order registry, crl-file, crl-url."""
        now = time.time()
        return [source.health(now) for source in self._sources]

    @property
    def healthy(self) -> bool:
        """Every source loaded on its last attempt and none is past its nextUpdate."""
        return all(h.ok and not h.stale for h in self.health())

    async def _run(self) -> None:
        interval = self._config.refresh_seconds
        # Local sources (the registry: one PRAGMA; a CRL file: one stat) are looked at every
        # FAST_POLL_SECONDS, so a revocation closes sessions within a tenth of a second; a
        # CRL URL is fetched every refresh_seconds.
        local = [source for source in self._sources if source.local]
        tick = min(interval, FAST_POLL_SECONDS) if local else interval
        loop = asyncio.get_running_loop()
        due_all = loop.time() + interval
        due = loop.time() + tick
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(0.0, due - loop.time()))
            if self._stopping.is_set():
                return
            now = loop.time()
            everything = now >= due_all - tick / 2
            if everything:
                due_all = now + interval
            due = now + tick
            try:
                # A slow CRL fetch may take longer than one interval: it carries on in the
                # background rather than delay the registry's news.
                await self._cycle(budget=interval, notify=True,
                                  sources=None if everything else local)
            except Exception:  # the loop must outlive any bug: a dead loop would fail open
                logger.exception("revocation refresh failed")

    async def _cycle(self, *, budget: float | None, notify: bool,
                     sources: list[_Source] | None = None) -> bool:
        async with self._lock:
            polled = await asyncio.gather(*(source.poll(budget)
                                            for source in sources or self._sources))
            return any(polled) and self._publish(notify=notify)

    def _publish(self, *, notify: bool) -> bool:
        revoked: dict[int, str] = {}
        devices: dict[str, str] = {}
        hashes: dict[str, str] = {}
        groups: dict[str, str] = {}
        for source in self._sources:
            data = source.data
            if data is None:
                continue
            for serial, reason in data.revoked.items():
                # Union: revoked in any source is revoked; held only where none revokes it.
                if reason == "revoked" or serial not in revoked:
                    revoked[serial] = reason
            devices.update(data.devices)
            hashes.update(data.password_hashes)
            groups.update(data.groups)
        old = self._snapshot
        if (revoked == old.revoked and devices == old.devices
                and hashes == old.password_hashes and groups == old.groups):
            return False
        new = Snapshot(MappingProxyType(revoked), MappingProxyType(devices),
                       MappingProxyType(hashes), old.version + 1, MappingProxyType(groups))
        self._snapshot = new
        if notify and self._on_change is not None:
            try:
                self._on_change(old, new)
            except Exception:  # the new list stands whatever the callback does
                logger.exception("revocation on_change callback failed")
        return True

    async def _close_sources(self) -> None:
        for source in self._sources:
            await source.close()
