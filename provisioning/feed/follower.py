"""The CA's current fleet state for the feed: the registry followed through a read-only
:class:`~provisioning.registry.view.FleetView`, on the HTTP process's event loop.

Every ``POLL_SECONDS`` the loop asks the view whether anything was committed (one ``PRAGMA
data_version``, on the loop itself: no thread, no transaction). When something was, a worker
thread reads what moved incrementally (:meth:`FleetView.follow`): the audit events since the
last head, classified by action. Most CA actions change nothing a gateway decides with (every
EST request and every ``feed.fetch`` is audited): nothing more is read. A device action
(issue, revoke, suspend, group, password...) reads only the rows of the devices it names,
which are compared with what the state holds for them and patched in place. An action the
view does not know, or a chain that does not continue the last head, reads the whole state
as before. So an action costs the follower what it touched, not the fleet.

When something did change, the version becomes the audit event id of the head (never less
than the last version plus one, even if the registry file was replaced by an older copy), the
change set goes into the :class:`~provisioning.feed.history.History`, and every long-poll
waiting on the old version wakes at once.

A safety net: at most every ``CHECK_SECONDS`` (and no more than one percent of the time,
``CHECK_SHARE``), when the head moved, the whole state is read in the same transaction as the
events and compared with the patched one. A difference is a bug (or a row changed with no
audit event): it is logged once as a WARNING and the whole state is taken. An unplanned full
read still makes the next poll wait ``READ_SHARE`` times as long as it took, so following
the registry never takes more than a tenth of a core from the HTTP loop.

The state's mappings are the follower's own, patched in place on the event loop when the
version moves: read them without awaiting in between (the route builds each document at
once). The same poll reads the gateway certificates the CA issued (``server.issue``
events, only the new ones each time) for :mod:`provisioning.feed.gateway`.

The live issuing CAs (the documents' ``issuers``) come from *issuers*, asked whenever the
head moved (:class:`provisioning.feed.issuers.ChainIssuers`: one ``stat`` unless
``ca-chain.pem`` changed). ``issuing-ca rotate`` and ``retire`` rewrite that file before
their audit event commits, so the read that sees the event sees the new list: a new list
moves the version like any change (long-polls wake, every gateway hears it at once), and
*on_issuers* is told, on the loop (the service re-reads its trust and ``cacerts`` then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from provisioning.feed.history import KEEP_VERSIONS, History
from provisioning.registry.feeddoc import Changes, Device, FeedState, changes, state_from_view
from provisioning.registry.view import (
    DeviceRows,
    FleetView,
    FleetViewError,
    Moves,
    Position,
    Revocation,
)

__all__ = ["CHECK_SECONDS", "POLL_SECONDS", "STALE_SECONDS", "Follower"]

log = logging.getLogger("provisioning.feed")

POLL_SECONDS: Final = 0.025
READ_SHARE: Final = 10.0  # after an unplanned full read, wait this many times its duration
CHECK_SECONDS: Final = 60.0  # the safety net: a full read compared with the patched state
CHECK_SHARE: Final = 100.0  # ... and at least this many times its duration apart
MOST_SHARE: Final = 4  # more devices moved than a 1/MOST_SHARE of the state: read it whole
MOST_FLOOR: Final = 1000
# Reads failing this long: the service stops vouching for its last state (/feed answers 503,
# a hub keeps its own last good state and ages it) rather than heartbeat a stale one.
STALE_SECONDS: Final = 5.0
_PLAIN: Final = Device()


def head_id(position: Position) -> int:
    """The audit event id of the registry's head (0 before any CA action)."""
    head = position.audit_head
    return int(head.split(":", 1)[0]) if head else 0


@dataclass(frozen=True, slots=True)
class _Update:
    """What one read found, prepared in the worker thread: *moved* turns the current state
    into the new one; *whole*, when set, replaces the state (a full read was taken)."""

    moved: Changes
    whole: tuple[dict[str, Device], dict[int, Revocation]] | None = None
    full: bool = False  # the whole state was read
    planned: bool = False  # ... as the safety net asked (no READ_SHARE pause after it)
    diverged: bool = False  # the safety net found the patched state wrong
    issuers: tuple[bytes, ...] | None = None  # the live issuing CAs, when they changed


class Follower:
    """The feed's state and version, kept up with the registry; one per service."""

    def __init__(self, view: FleetView, trust_domain: str, *, interval: float = POLL_SECONDS,
                 keep: int = KEEP_VERSIONS, stale_seconds: float = STALE_SECONDS,
                 check_seconds: float = CHECK_SECONDS,
                 issuers: Callable[[], tuple[bytes, ...]] | None = None,
                 on_issuers: Callable[[tuple[bytes, ...]], None] | None = None) -> None:
        self.view = view
        self._read_issuers = issuers
        self._on_issuers = on_issuers
        self.trust_domain = trust_domain
        self._interval = interval
        self._keep = keep
        self._stale_seconds = stale_seconds
        self._check_seconds = check_seconds  # 0: check on every read (tests)
        self._next_check = 0.0  # monotonic time the safety net is due (when the head moves)
        self._diverged = False  # the safety net's WARNING, logged once
        self._position: Position | None = None
        self._state: FeedState | None = None
        # The state's mappings, patched in place; _refused_by: device -> its refused serials
        self._devices: dict[str, Device] = {}
        self._revoked: dict[int, Revocation] = {}
        self._refused_by: dict[str, set[int]] = {}
        self._history: History | None = None
        self._events_read = 0
        self._gateways: dict[int, str | None] = {}
        self._changed = asyncio.Event()  # set (then replaced) when the version moves
        self._closing = False
        self._lock = asyncio.Lock()  # one read at a time: the view is one connection
        self._task: asyncio.Task[None] | None = None
        self._trouble: str | None = None  # the last read's failure, logged once
        self._failing_since: float | None = None  # monotonic time of the first failed read
        self._pause = 0.0  # the last unplanned full read's duration (READ_SHARE)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the state once (raising FleetViewError when the registry cannot be read),
        then follow it in the background."""
        await self.sync()
        self._task = asyncio.create_task(self._follow(), name="feed-follower")

    def stop_waiting(self) -> None:
        """The service is stopping: every long-poll answers now, and every later one at once."""
        self._closing = True
        self._changed.set()

    async def close(self) -> None:
        self.stop_waiting()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            self.view.close()

    # -- what the route reads ------------------------------------------------------------

    @property
    def state(self) -> FeedState:
        if self._state is None:
            raise RuntimeError("the follower is not started")
        return self._state

    @property
    def gateways(self) -> Mapping[int, str | None]:
        """Serial -> SPIFFE URI of every server certificate the CA issued (None: not named)."""
        return self._gateways

    def trouble(self) -> str | None:
        """Why the state can no longer be vouched for (reads failing for STALE_SECONDS)."""
        if self._failing_since is None or self._trouble is None:
            return None
        if time.monotonic() - self._failing_since < self._stale_seconds:
            return None
        return self._trouble

    def since(self, version: int) -> Changes | None:
        """The merged changes from *version* to :attr:`state`, or None (a snapshot then)."""
        return None if self._history is None else self._history.since(version)

    async def wait_change(self, version: int, timeout: float) -> None:
        """Return once the version is no longer *version*, after *timeout* seconds, or when
        the service stops, whichever comes first."""
        if self._closing or timeout <= 0 or self.state.version != version:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- following -----------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(max(self._interval, READ_SHARE * self._pause))
            if self._unmoved():
                continue
            with contextlib.suppress(FleetViewError):  # logged once by sync
                await self.sync()

    def _unmoved(self) -> bool:
        """Nothing committed since the last read: asked on the loop (no thread hop), while no
        read holds the connection. A failure is left to sync, which logs it."""
        if self._position is None or self._lock.locked() or self._trouble is not None:
            return False
        try:
            return not self.view.moved(self._position)
        except FleetViewError:
            return False

    async def sync(self) -> float:
        """Read what moved now; returns how long the read took (seconds)."""
        async with self._lock:
            started = time.perf_counter()
            check = time.monotonic() >= self._next_check
            try:
                position, update, gateways = await asyncio.to_thread(self._read, check)
            except FleetViewError as exc:
                self._failed(exc)
                raise
            if self._trouble is not None:
                log.info("feed: reading the registry again")
            self._trouble = self._failing_since = None
            took = time.perf_counter() - started
            self._position = position
            if gateways is not None:
                self._events_read, issued = gateways
                self._gateways.update(issued)
            self._pause = 0.0
            if update is not None:
                self._take(position, update)
                if update.full and self._check_seconds > 0:  # as good as a check: wait
                    self._next_check = time.monotonic() + max(self._check_seconds,
                                                              CHECK_SHARE * took)
                    self._pause = 0.0 if update.planned else took
            return took

    def _failed(self, exc: FleetViewError) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        if str(exc) != self._trouble:
            log.warning("feed: cannot read the registry (the last state stays): %s", exc)
            self._trouble = str(exc)

    async def refresh_gateways(self) -> None:
        """Read the gateway certificates issued since the last read now (one range of the
        audit log's rowid), for a client certificate that is not known yet."""
        async with self._lock:
            self._events_read, issued = await asyncio.to_thread(self.view.gateways,
                                                                self._events_read)
            self._gateways.update(issued)

    # -- in the worker thread: reads, and what they change (the state is only read here) ----

    def _read(self, check: bool) -> tuple[Position, _Update | None,
                                          tuple[int, dict[int, str | None]] | None]:
        """What moved since the last read, and the new gateways."""
        most = max(MOST_FLOOR, len(self._devices) // MOST_SHARE)
        position, moves = self.view.follow(self._position, whole=check, most=most)
        if moves is None:
            return position, None, None
        update = self._prepare(position, moves)
        if self._read_issuers is not None:
            issuers = self._read_issuers()
            if self._state is None or issuers != self._state.issuers:
                update = replace(update, issuers=issuers)
        return position, update, self.view.gateways(self._events_read)

    def _prepare(self, position: Position, moves: Moves) -> _Update:
        if moves.state is None:
            assert moves.devices is not None  # noqa: S101  (FleetView.follow: one or both)
            return _Update(self._patch(moves.devices))
        new = state_from_view(moves.state, max(1, head_id(position)), self.trust_domain)
        whole = dict(new.devices), dict(new.revoked)
        total = changes(self._state, new) if self._state is not None else Changes()
        if moves.devices is None:
            return _Update(total, whole, full=True)
        moved = self._patch(moves.devices)
        if total.devices == moved.devices and total.revoked == moved.revoked:
            return _Update(moved, full=True, planned=True)  # the patched state is right
        return _Update(total, whole, full=True, planned=True, diverged=True)

    def _patch(self, rows: Mapping[str, DeviceRows]) -> Changes:
        """What the devices' current *rows* change in the state."""
        moved = Changes()
        for device_id, row in rows.items():
            device: Device | None = Device(row.status, row.group, row.password_hash,
                                           row.certificates)
            if device == _PLAIN:
                device = None
            if self._devices.get(device_id) != device:
                moved.devices[device_id] = device
            for serial in self._refused_by.get(device_id, ()):
                if serial not in row.refused:
                    moved.revoked[serial] = None
            for serial, entry in row.refused.items():
                if self._revoked.get(serial) != entry:
                    moved.revoked[serial] = entry
        return moved

    # -- on the loop: the new state ------------------------------------------------------

    def _take(self, position: Position, update: _Update) -> None:
        current = self._state
        version = max(1, head_id(position))
        if update.diverged and not self._diverged:
            self._diverged = True
            log.warning("feed: the state followed event by event differs from the registry "
                        "read whole at event %d (%d devices, %d serials; a bug, or a row "
                        "changed without an audit event): taking the whole state", version,
                        len(update.moved.devices), len(update.moved.revoked))
        if current is not None and not update.moved and update.issuers is None:
            return
        issuers = update.issuers if update.issuers is not None else (
            current.issuers if current is not None else ())
        if update.whole is not None:
            self._devices, self._revoked = update.whole
            self._refused_by = {}
            for serial, entry in self._revoked.items():
                self._refused_by.setdefault(entry.device_id, set()).add(serial)
        else:
            self._apply(update.moved)
        if current is None:
            self._state = FeedState(version, self.trust_domain,
                                    MappingProxyType(self._devices),
                                    MappingProxyType(self._revoked), issuers)
            self._history = History(version, keep=self._keep)
            return
        version = max(version, current.version + 1)
        new = FeedState(version, self.trust_domain, MappingProxyType(self._devices),
                        MappingProxyType(self._revoked), issuers)
        assert self._history is not None  # noqa: S101  (made with the first state)
        self._history.record(version, update.moved)
        self._state = new
        changed, self._changed = self._changed, asyncio.Event()
        if self._closing:
            self._changed.set()
        changed.set()
        if update.issuers is not None and self._on_issuers is not None:
            try:
                self._on_issuers(issuers)
            except Exception:  # the feed goes on; the service logs what it could not do
                log.exception("feed: taking the new issuing CAs failed")

    def _apply(self, moved: Changes) -> None:
        for device_id, device in moved.devices.items():
            if device is None:
                self._devices.pop(device_id, None)
            else:
                self._devices[device_id] = device
        for serial, entry in moved.revoked.items():
            old = self._revoked.pop(serial, None)
            if old is not None:
                serials = self._refused_by.get(old.device_id, set())
                serials.discard(serial)
                if not serials:
                    self._refused_by.pop(old.device_id, None)
            if entry is not None:
                self._revoked[serial] = entry
                self._refused_by.setdefault(entry.device_id, set()).add(serial)
