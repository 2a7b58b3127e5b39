"""The read-only view of the fleet's state: what a gateway decides with.

One reader for the hub's same-host registry source (``hub/revocation.py``), its trust-domain
lookup (``hub/trust.py``) and the fleet-state feed (DESIGN section 9). Stdlib-only: importing
it loads :mod:`sqlite3`, :mod:`provisioning.registry.schema`, :mod:`provisioning.serial`,
:mod:`provisioning.identity` and :mod:`provisioning.errors`, never sqlite-utils,
cryptography or the rest of the CA, so a gateway may import it (the import rule in
docs/provisioning.md). The connection is opened ``mode=ro`` with ``PRAGMA query_only``: the
view never writes the CA's registry, whatever a bug might try.

Polling, as the hub's registry source does every refresh::

    view = FleetView(path)
    seen = None                                   # a Position once something was read
    seen, state = view.read(seen)                 # state: a FleetState, or None
    if state is not None:                         # a CA action since *seen*
        revoked = {serial: r.status for serial, r in state.revoked.items()}
        ...                                       # state.device_status, .password_hashes, .groups

:meth:`FleetView.read` costs one ``PRAGMA data_version`` when no other connection has
committed since *seen*; otherwise it opens one read transaction, reads the audit head
(``meta.audit_head``, moved by every CA action) and, when that moved too, every refused
serial and every device that is not active, has a password hash or a group: all of one
commit. A commit that was no CA action (a promised file cleared) moves the position only.
``certificates=True`` adds each device's valid (active or superseded) serials, which the feed
serves and ``[auth] registered_only`` needs. Serials are integers, as a certificate or CRL
entry carries them (:func:`provisioning.serial.parse_serial`).

:meth:`FleetView.trust_domain` is the ``trust_domain`` of the registry's first ``pki.init``
event: written once by ``fleet-provision init`` and sealed in the hash chain.
:meth:`FleetView.gateways` lists the server (gateway) certificates the CA issued, from their
``server.issue`` events: the fleet-state feed serves only those (DESIGN section 9).

:meth:`FleetView.follow` is the feed's incremental read: in one read transaction, the audit
events after the head the caller last saw, classified by action (``QUIET_ACTIONS`` change
nothing a gateway decides with; ``DEVICE_ACTIONS`` change only the rows of the event's
device), then the current rows of just the devices they name (:class:`DeviceRows`), or the
whole state when an event is of an action it does not know, names no device, the chain does
not continue the caller's head, or too many devices moved. :meth:`FleetView.statistics`
counts what was read, for tests and benchmarks.

The view does not watch the file itself: a registry replaced or overwritten under an open
connection (another inode, size or mtime) must be reopened by the caller, as
``hub/revocation.py`` does. Every failure to read is a :class:`FleetViewError`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple, TypeVar

from provisioning.errors import RegistryError
from provisioning.identity import is_valid_trust_domain
from provisioning.registry.schema import (
    CERT_ACTIVE,
    CERT_SUPERSEDED,
    DEVICE_ACTIVE,
    HEAD_KEY,
    PKI_INIT_ACTION,
    REFUSED_CERT_STATUSES,
)
from provisioning.serial import parse_serial

__all__ = ["DEVICE_ACTIONS", "QUIET_ACTIONS", "DeviceRows", "FleetState", "FleetView",
           "FleetViewError", "Moves", "Position", "ReadStatistics", "Revocation"]

TIMEOUT_S: Final = 5.0  # waiting for a writer's lock; a reader in WAL mode rarely waits
_REFUSED: Final = "', '".join(REFUSED_CERT_STATUSES)  # constants: the f-string SQL is safe
_VALID: Final = f"{CERT_ACTIVE}', '{CERT_SUPERSEDED}"
SERVER_ISSUE_ACTION: Final = "server.issue"  # provisioning/servercert.py's audit event
_T = TypeVar("_T")
_CHUNK: Final = 500  # devices per "IN (...)" query (SQLite allows 999 parameters at least)

# Every action the code base audits (grep "audit" provisioning/), by what it changes of the
# state a gateway decides with. An enrollment's request record (est.enroll) changes nothing
# itself: its rows come with their own device.* and certificate.* events, in the same
# transaction. An action in neither set makes the feed read everything (a safe default).
QUIET_ACTIONS: Final = frozenset({
    PKI_INIT_ACTION, SERVER_ISSUE_ACTION, "crl.publish", "token.create", "token.revoke",
    "http.request", "est.cacerts", "est.csrattrs", "est.enroll", "est.reenroll", "crl.fetch",
    "ocsp.query", "feed.fetch", "certificate.renew.refuse", "policy.set",
    # No registry row moves; the feed re-reads the issuers (ca-chain.pem) when the head
    # moves (provisioning.feed.issuers), which moves its version: every gateway hears it.
    "issuing-ca.rotate", "issuing-ca.retire"})
DEVICE_ACTIONS: Final = frozenset({
    "device.create", "device.group", "device.suspend", "device.resume", "device.revoke",
    "device.password.set", "device.password.clear", "certificate.issue",
    "certificate.supersede", "certificate.revoke"})


class FleetViewError(RegistryError):
    """The registry cannot be opened or read, or holds what no CA wrote (a bad serial)."""


@dataclass(frozen=True, slots=True)
class Position:
    """How far a reader has read: the connection's data version and the audit head."""

    data_version: int  # PRAGMA data_version: moves when another connection commits
    audit_head: str | None  # "<event id>:<hash>"; None before the first CA action


class Revocation(NamedTuple):
    """A refused certificate: ``status`` is ``revoked`` or ``on_hold``."""

    status: str
    reason: str | None  # RFC 5280 name (certificateHold for a hold); None: unspecified
    revoked_at: str | None  # ISO 8601 UTC
    device_id: str


@dataclass(frozen=True, slots=True)
class FleetState:
    """The fleet as of one commit; immutable, replaced whole by the next read."""

    position: Position
    revoked: MappingProxyType[int, Revocation]  # every revoked or held serial
    device_status: MappingProxyType[str, str]  # device -> "suspended" | "revoked"; active absent
    password_hashes: MappingProxyType[str, str]  # device -> scrypt$... (the second factor)
    groups: MappingProxyType[str, str]  # device -> group; devices in no group absent
    # device -> {serial: "active" | "superseded"}: with read(certificates=True), else None
    certificates: MappingProxyType[str, MappingProxyType[int, str]] | None = None


class DeviceRows(NamedTuple):
    """One device's rows as the feed lists them (a device with no row: active, nothing)."""

    status: str
    group: str | None
    password_hash: str | None
    certificates: MappingProxyType[int, str]  # valid serial -> active|superseded, issue order
    refused: MappingProxyType[int, Revocation]  # its revoked or held serials


@dataclass(frozen=True, slots=True)
class Moves:
    """What the audit events after a head changed, read in one transaction."""

    position: Position
    devices: Mapping[str, DeviceRows] | None  # the rows of each device named; None: everything
    state: FleetState | None  # the whole state (certificates=True): when devices is None,
    # or asked for (then both are of the same commit)


@dataclass(frozen=True, slots=True)
class ReadStatistics:
    """What :meth:`FleetView.follow` read so far, as of one moment (counts only grow)."""

    events: int = 0  # audit events read and classified
    devices: int = 0  # devices whose rows were read one by one
    full: int = 0  # reads of the whole state
    by_action: Mapping[str, int] = field(default_factory=dict)  # events per action


class FleetView:
    """A read-only connection to ``registry.db``; one thread at a time uses it."""

    def __init__(self, path: Path, *, timeout: float = TIMEOUT_S) -> None:
        self.path = path
        self._timeout_ms = int(timeout * 1000)
        try:
            self._conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                                         timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA query_only = ON")
            self._reads = [0, 0, 0]  # events, devices, full (ReadStatistics)
            self._by_action: dict[str, int] = {}
        except sqlite3.Error as exc:
            raise FleetViewError(f"registry cannot be opened read-only: {exc}",
                                 str(path)) from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FleetView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def position(self) -> Position:
        """Where the registry is now (what :meth:`read` would compare against)."""
        return self._guarded(lambda: Position(self._data_version(), self._head()))

    def read(self, since: Position | None = None, *,
             certificates: bool = False) -> tuple[Position, FleetState | None]:
        """The position now and the fleet's state, or None when no CA action moved the
        audit head since *since* (None: read in any case)."""
        return self._guarded(lambda: self._read(since, certificates=certificates))

    def moved(self, since: Position) -> bool:
        """Whether another connection committed since *since* (one ``PRAGMA data_version``,
        no transaction): cheap enough to ask on an event loop, and it never waits for a
        lock (a busy registry raises FleetViewError: ask :meth:`follow` in a thread)."""
        def probe() -> int:
            self._conn.execute("PRAGMA busy_timeout = 0")
            try:
                return self._data_version()
            finally:
                self._conn.execute(f"PRAGMA busy_timeout = {self._timeout_ms}")
        return self._guarded(probe) != since.data_version

    def follow(self, since: Position | None, *, whole: bool = False,
               most: int = 10_000) -> tuple[Position, Moves | None]:
        """The position now and what the audit events after ``since.audit_head`` changed,
        or None when the head has not moved. The whole state (``certificates=True``) comes
        instead of the devices' rows when *since* is None or names a head that is not in
        this chain, when an event's action is not known or names no device that it should,
        or when more than *most* devices moved; with *whole*, always (and the rows too)."""
        return self._guarded(lambda: self._follow(since, whole=whole, most=most))

    def statistics(self) -> ReadStatistics:
        """A snapshot of what :meth:`follow` read since the view was opened."""
        events, devices, full = self._reads
        return ReadStatistics(events, devices, full, MappingProxyType(dict(self._by_action)))

    def valid_serials(self, device_ids: Iterable[str]) -> dict[str, frozenset[int]]:
        """Each named device's active and superseded serials (a device with none is left
        out): a point read for one check, where :meth:`read` lists the whole fleet."""
        ids = sorted(set(device_ids))

        def query() -> dict[str, frozenset[int]]:
            found: dict[str, set[int]] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ", ".join("?" * len(chunk))
                for device_id, serial in self._conn.execute(
                        "SELECT device_id, serial FROM certificates "  # noqa: S608
                        f"WHERE status IN ('{_VALID}') AND device_id IN ({marks})", chunk):
                    found.setdefault(device_id, set()).add(parse_serial(serial))
            return {device_id: frozenset(serials) for device_id, serials in found.items()}
        return self._guarded(query)

    def trust_domain(self) -> str | None:
        """``trust_domain`` of the first ``pki.init`` event; None when it names none."""
        row = self._guarded(lambda: self._conn.execute(
            "SELECT detail FROM events WHERE action = ? ORDER BY id LIMIT 1",
            (PKI_INIT_ACTION,)).fetchone())
        if row is None:
            return None
        try:
            value = json.loads(row[0]).get("trust_domain")
        except (TypeError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and is_valid_trust_domain(value) else None

    def gateways(self, after: int = 0) -> tuple[int, dict[int, str | None]]:
        """Server certificates the CA issued in audit events after the event id *after*:
        ``(the last event id now, {serial: the SPIFFE URI it was issued for, or None})``.
        Hand the id back next time to read only what came since (a range of the rowid)."""
        return self._guarded(lambda: self._gateways(after))

    def _gateways(self, after: int) -> tuple[int, dict[int, str | None]]:
        conn = self._conn
        conn.execute("BEGIN")  # the last id and the rows of one commit
        try:
            last = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            issued: dict[int, str | None] = {}
            for serial, detail in conn.execute(
                    "SELECT serial, detail FROM events WHERE id > ? AND id <= ? "
                    "AND action = ? AND serial IS NOT NULL",
                    (after, last, SERVER_ISSUE_ACTION)):
                try:
                    uri = json.loads(detail).get("uri")
                except (TypeError, ValueError, AttributeError):
                    uri = None
                issued[parse_serial(serial)] = uri if isinstance(uri, str) else None
            return int(last), issued
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    # -- reading -----------------------------------------------------------------------------

    def _guarded(self, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except sqlite3.Error as exc:
            raise FleetViewError(f"registry cannot be read: {exc}", str(self.path)) from exc
        except ValueError as exc:  # a serial that is not hex
            raise FleetViewError(f"the registry holds a malformed serial: {exc}",
                                 str(self.path)) from exc

    def _data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _head(self) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone()
        return None if row is None else str(row[0])

    def _read(self, since: Position | None, *,
              certificates: bool) -> tuple[Position, FleetState | None]:
        version = self._data_version()
        if since is not None and since.data_version == version:
            return since, None  # no other connection has committed since
        conn = self._conn
        conn.execute("BEGIN")  # one read transaction: the head and the rows of one commit
        try:
            position = Position(version, self._head())
            if since is not None and since.audit_head == position.audit_head:
                return position, None  # a write that was no CA action
            return position, self._state(position, certificates=certificates)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _state(self, position: Position, *, certificates: bool) -> FleetState:
        conn = self._conn
        revoked = {
            parse_serial(serial): Revocation(status, reason, revoked_at, device_id)
            for serial, status, reason, revoked_at, device_id in conn.execute(
                "SELECT serial, status, reason, revoked_at, device_id FROM certificates "  # noqa: S608
                f"WHERE status IN ('{_REFUSED}')")
        }
        statuses: dict[str, str] = {}
        hashes: dict[str, str] = {}
        groups: dict[str, str] = {}
        for device_id, status, password_hash, group in conn.execute(
                'SELECT device_id, status, password_hash, "group" FROM devices '
                "WHERE status != ? OR password_hash IS NOT NULL OR \"group\" IS NOT NULL",
                (DEVICE_ACTIVE,)):
            if status != DEVICE_ACTIVE:
                statuses[device_id] = status
            if password_hash is not None:
                hashes[device_id] = password_hash
            if group is not None:
                groups[device_id] = group
        return FleetState(position, MappingProxyType(revoked), MappingProxyType(statuses),
                          MappingProxyType(hashes), MappingProxyType(groups),
                          self._certificates() if certificates else None)

    def _follow(self, since: Position | None, *, whole: bool,
                most: int) -> tuple[Position, Moves | None]:
        version = self._data_version()
        if since is not None and since.data_version == version:
            return since, None
        conn = self._conn
        conn.execute("BEGIN")  # the events, the head and the rows of one commit
        try:
            position = Position(version, self._head())
            if since is not None and since.audit_head == position.audit_head:
                return position, None  # a write that was no CA action
            touched = self._touched(since.audit_head if since else None, most)
            rows = None if touched is None else self._rows(touched)
            state = None
            if rows is None or whole:
                self._reads[2] += 1
                state = self._state(position, certificates=True)
            return position, Moves(position, rows, state)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _touched(self, head: str | None, most: int) -> set[str] | None:
        """The devices the events after *head* name; None: read everything."""
        after, _, digest = (head or "").partition(":")
        if not after.isdigit():
            return None
        row = self._conn.execute("SELECT hash FROM events WHERE id = ?", (int(after),)).fetchone()
        if row is None or row[0] != digest:
            return None  # not this chain's event: a registry replaced under the view
        touched: set[str] = set()
        counts = self._by_action
        for action, device_id in self._conn.execute(
                "SELECT action, device_id FROM events WHERE id > ? ORDER BY id", (int(after),)):
            self._reads[0] += 1
            counts[action] = counts.get(action, 0) + 1
            if action in QUIET_ACTIONS:
                continue
            if action not in DEVICE_ACTIONS or device_id is None:
                return None
            touched.add(device_id)
        return touched if len(touched) <= most else None

    def _rows(self, devices: Iterable[str]) -> dict[str, DeviceRows]:
        conn = self._conn
        ids = sorted(devices)
        self._reads[1] += len(ids)
        found: dict[str, tuple[str, str | None, str | None]] = {}
        valid: dict[str, dict[int, str]] = {}
        refused: dict[str, dict[int, Revocation]] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            for device_id, status, password_hash, group in conn.execute(
                    'SELECT device_id, status, password_hash, "group" FROM devices '  # noqa: S608
                    f"WHERE device_id IN ({marks})", chunk):
                found[device_id] = (status, group, password_hash)
            for device_id, serial, status, reason, revoked_at in conn.execute(
                    "SELECT device_id, serial, status, reason, revoked_at "  # noqa: S608
                    f"FROM certificates WHERE device_id IN ({marks}) "
                    "ORDER BY issued_at, rowid", chunk):
                if status in (CERT_ACTIVE, CERT_SUPERSEDED):
                    valid.setdefault(device_id, {})[parse_serial(serial)] = status
                elif status in REFUSED_CERT_STATUSES:
                    refused.setdefault(device_id, {})[parse_serial(serial)] = Revocation(
                        status, reason, revoked_at, device_id)
        return {device_id: DeviceRows(*found.get(device_id, (DEVICE_ACTIVE, None, None)),
                                      MappingProxyType(valid.get(device_id, {})),
                                      MappingProxyType(refused.get(device_id, {})))
                for device_id in ids}

    def _certificates(self) -> MappingProxyType[str, MappingProxyType[int, str]]:
        valid: dict[str, dict[int, str]] = {}
        for device_id, serial, status in self._conn.execute(
                "SELECT device_id, serial, status FROM certificates "  # noqa: S608
                f"WHERE status IN ('{_VALID}') ORDER BY issued_at, rowid"):
            valid.setdefault(device_id, {})[parse_serial(serial)] = status
        return MappingProxyType({device_id: MappingProxyType(serials)
                                 for device_id, serials in valid.items()})
