"""An in-memory revocation source for tests: no file, no thread, no network, no sleeping.

It behaves like the real sources (the same :class:`~hub.revocation.sources.PolledSource`: last
good data kept on failure, stale past ``next_update``, one log line and one ``on_source`` call
per change of state), but its list is what the test last gave::

    source = MemorySource()
    watcher = RevocationWatcher.over([source], on_change=gatekeeper.revocation_changed)
    await watcher.start()                   # loads the empty list
    source.set(revoked={serial: "revoked"})
    await watcher.refresh()                 # on_change(old, new): the session is kicked
    source.fail("registry gone")            # next poll: down, the list above kept
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hub.errors import SourceError
from hub.revocation.model import SourceData
from hub.revocation.sources import Outcome, PolledSource, Still

__all__ = ["MemorySource"]


class MemorySource(PolledSource):
    """A source whose next poll loads what :meth:`set` gave, or fails as :meth:`fail` said.

    Starts with an empty list ready, so the watcher's start() loads; ``polls`` counts looks.
    """

    def __init__(self, name: str = "memory", *, local: bool = True) -> None:
        super().__init__(f"memory:{name}")
        self.name = name
        self.local = local
        self.polls = 0
        self._next: SourceData | None = SourceData({})
        self._failure: str | None = None

    def set(
        self,
        *,
        revoked: Mapping[int, str] | None = None,
        devices: Mapping[str, str] | None = None,
        password_hashes: Mapping[str, str] | None = None,
        groups: Mapping[str, str] | None = None,
        next_update: float | None = None,
        certificates: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """The whole list the next poll loads (what is not given is empty), as a registry read
        or a new CRL would: ``revoked`` serial -> ``revoked`` | ``on-hold``, ``devices`` id ->
        ``suspended`` | ``revoked``, ``next_update`` a ``time.time()`` value (past: stale),
        ``certificates`` id -> valid serials (None: the source lists no certificates)."""
        listed = None if certificates is None else {
            device_id: frozenset(serials) for device_id, serials in certificates.items()}
        self._next = SourceData(dict(revoked or {}), dict(devices or {}),
                                dict(password_hashes or {}), dict(groups or {}),
                                next_update=next_update, certificates=listed)
        self._failure = None

    def fail(self, why: str) -> None:
        """Every poll fails with *why* (the last list stays in force) until :meth:`recover` or
        :meth:`set`."""
        self._failure = why

    def recover(self) -> None:
        """Polls succeed again (with nothing new unless :meth:`set` was called)."""
        self._failure = None

    async def _attempt(self, budget: float | None) -> Outcome:
        self.polls += 1
        if self._failure is not None:
            raise SourceError(self._failure)
        data, self._next = self._next, None
        return Still.UNCHANGED if data is None else data
