"""The seam between the watcher and where refusals come from.

:class:`RevocationSource` is all the watcher asks of a source: poll it, read its last good
data and health, close it. :class:`PolledSource` is the behaviour every source of ours shares
(the registry, a CRL file or URL, and :class:`~hub.revocation.memory.MemorySource` for tests):
a failed attempt keeps the last good data and reports ``ok=False``; data past its nextUpdate is
still used and reports ``stale``; each change of state is logged once on ``hub.revocation``
and handed to ``on_state``. A subclass implements only :meth:`PolledSource._attempt`.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Protocol

from hub.errors import SourceError
from hub.revocation.model import (
    SourceCallback,
    SourceData,
    SourceHealth,
    SourceState,
    iso_utc,
    one_line,
)

__all__ = ["Outcome", "PolledSource", "RevocationSource", "Still"]

logger = logging.getLogger("hub.revocation")


class RevocationSource(Protocol):
    """A source of refusals as :class:`~hub.revocation.RevocationWatcher` uses it.

    ``poll`` never raises: a failure is kept in ``health()`` and told to ``on_state`` (set by
    the watcher before the first poll), while ``data`` keeps the last good list.
    """

    on_state: SourceCallback | None

    @property
    def name(self) -> str:
        """``registry``, ``crl-file``, ``crl-url`` (or a fake's own name)."""
        ...

    @property
    def where(self) -> str:
        """The path or URL, for log lines and the start error."""
        ...

    @property
    def local(self) -> bool:
        """Cheap to look at: polled every FAST_POLL_SECONDS, not only every refresh_seconds."""
        ...

    @property
    def data(self) -> SourceData | None:
        """The last good data; None until the first successful poll."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the last attempt failed; None while ok."""
        ...

    async def poll(self, budget: float | None) -> bool:
        """Look once, waiting at most *budget* seconds (None: until done); True when ``data``
        changed."""
        ...

    def health(self, now: float) -> SourceHealth:
        """The source's state at ``time.time()`` *now*."""
        ...

    async def close(self) -> None:
        """Release connections; a later poll reopens them."""
        ...


class Still(enum.Enum):
    """An attempt that brought no new data."""

    UNCHANGED = "unchanged"  # looked, nothing new: a success
    PENDING = "pending"  # a fetch is still in flight: no news either way


Outcome = SourceData | Still


class PolledSource:
    """Last good data, health and once-per-change logging; subclasses implement ``_attempt``."""

    name = "source"
    local = False  # cheap to look at: polled every FAST_POLL_SECONDS, not refresh_seconds

    def __init__(self, where: str) -> None:
        self.where = where
        self.data: SourceData | None = None
        self.ok = False
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.on_state: SourceCallback | None = None  # set by the watcher
        self._logged = ("ok", "")

    async def _attempt(self, budget: float | None) -> Outcome:
        """New data, or Still; raise SourceError when the source cannot be used now."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections; the source reopens them if polled again."""

    async def poll(self, budget: float | None) -> bool:
        """Look once; True when the source has new data. Never raises."""
        changed = False
        try:
            outcome = await self._attempt(budget)
        except SourceError as exc:
            self.ok, self.last_error = False, one_line(str(exc))
        except Exception as exc:  # a bug here must not silence the other sources
            logger.exception("revocation source %s (%s): unexpected error", self.name, self.where)
            self.ok, self.last_error = False, one_line(f"internal error: {exc!r}")
        else:
            if outcome is not Still.PENDING:
                if isinstance(outcome, SourceData):
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
        return f"past its nextUpdate {iso_utc(data.next_update)}"

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
