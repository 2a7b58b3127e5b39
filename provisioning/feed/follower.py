"""The CA's current fleet state for the feed: the registry followed through a read-only
:class:`~provisioning.registry.view.FleetView`, on the HTTP process's event loop.

Every ``POLL_SECONDS`` a worker thread asks the view what moved; an unchanged registry costs
one ``PRAGMA data_version``. When the audit head moved, the state is read whole (with every
device's valid serials) and compared with the current one: most CA actions (every EST request
is audited) change nothing a gateway decides with, and the version stays. When something did
change, the version becomes the audit event id of the head (never less than the last version
plus one, even if the registry file was replaced by an older copy), the change set goes into
the :class:`~provisioning.feed.history.History`, and every long-poll waiting on the old
version wakes at once.

A full read of a large fleet takes milliseconds; the next poll then waits at least
``READ_SHARE`` times as long as that read took, so following the registry never takes more
than a tenth of a core from the HTTP loop, however busy enrollment keeps the audit head.

The same poll reads the gateway certificates the CA issued (``server.issue`` events, only
the new ones each time) for :mod:`provisioning.feed.gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Final

from provisioning.feed.history import KEEP_VERSIONS, History
from provisioning.registry.feeddoc import Changes, FeedState, changes, state_from_view
from provisioning.registry.view import FleetState, FleetView, FleetViewError, Position

__all__ = ["POLL_SECONDS", "STALE_SECONDS", "Follower"]

log = logging.getLogger("provisioning.feed")

POLL_SECONDS: Final = 0.025
READ_SHARE: Final = 10.0  # wait at least this many times a full read's duration
# Reads failing this long: the service stops vouching for its last state (/feed answers 503,
# a hub keeps its own last good state and ages it) rather than heartbeat a stale one.
STALE_SECONDS: Final = 5.0


def head_id(position: Position) -> int:
    """The audit event id of the registry's head (0 before any CA action)."""
    head = position.audit_head
    return int(head.split(":", 1)[0]) if head else 0


class Follower:
    """The feed's state and version, kept up with the registry; one per service."""

    def __init__(self, view: FleetView, trust_domain: str, *, interval: float = POLL_SECONDS,
                 keep: int = KEEP_VERSIONS, stale_seconds: float = STALE_SECONDS) -> None:
        self.view = view
        self.trust_domain = trust_domain
        self._interval = interval
        self._keep = keep
        self._stale_seconds = stale_seconds
        self._position: Position | None = None
        self._state: FeedState | None = None
        self._history: History | None = None
        self._events_read = 0
        self._gateways: dict[int, str | None] = {}
        self._changed = asyncio.Event()  # set (then replaced) when the version moves
        self._closing = False
        self._lock = asyncio.Lock()  # one read at a time: the view is one connection
        self._task: asyncio.Task[None] | None = None
        self._trouble: str | None = None  # the last read's failure, logged once
        self._failing_since: float | None = None  # monotonic time of the first failed read

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
        delay = self._interval
        while True:
            await asyncio.sleep(delay)
            took = 0.0
            with contextlib.suppress(FleetViewError):  # logged once by sync
                took = await self.sync()
            delay = max(self._interval, READ_SHARE * took)

    async def sync(self) -> float:
        """Read what moved now; returns how long the read took (seconds)."""
        async with self._lock:
            started = time.perf_counter()
            try:
                position, read, gateways = await asyncio.to_thread(self._read)
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
            if read is not None:
                self._take(position, read)
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

    def _read(self) -> tuple[Position, FleetState | None,
                             tuple[int, dict[int, str | None]] | None]:
        """In a worker thread: the state when the audit head moved, and new gateways."""
        position, read = self.view.read(self._position, certificates=True)
        if read is None:
            return position, None, None
        return position, read, self.view.gateways(self._events_read)

    def _take(self, position: Position, read: FleetState) -> None:
        current = self._state
        version = max(1, head_id(position))
        new = state_from_view(read, version, self.trust_domain)
        if current is None:
            self._state, self._history = new, History(version, keep=self._keep)
            return
        moved = changes(current, new)
        if not moved:
            return
        new = replace(new, version=max(version, current.version + 1))
        assert self._history is not None  # noqa: S101  (made with the first state)
        self._history.record(new.version, moved)
        self._state = new
        changed, self._changed = self._changed, asyncio.Event()
        if self._closing:
            self._changed.set()
        changed.set()
