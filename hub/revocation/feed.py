"""The ``feed`` source: the CA service's signed fleet-state feed, long-polled (DESIGN section 9).

One background task asks ``GET /feed?since=<version in force>&wait=30``; the CA answers at
once when something changed and otherwise holds the request up to 30 s and sends a heartbeat.
Each answer is verified and applied in a worker thread (:mod:`~hub.revocation.feed_verify`),
and an accepted change wakes the watcher (``on_news``), so it reaches the gatekeeper at once,
not at the next refresh; :meth:`FeedSource.poll` only hands over what the task has accepted.

- Start: the last good state from ``feed_cache`` when there is one (the CA is then asked in
  the background); else the first poll waits up to ``start_budget`` (30 s) for a snapshot.
- A gap (a delta that does not build on the version in force) asks for a snapshot
  (``since=0``); a refused document is logged, counted by reason and reported, and the last
  good state stays, as it does while the CA is unreachable (retried after 0.5 s, doubling to
  10 s).
- Age: the time since the CA issued the last accepted document (heartbeats included). While
  it is below ``max_age_seconds`` an unreachable CA is reported (``ok`` false, once in the log
  and the audit) but the source is in its ``grace``: ``/healthz`` stays 200. Past it the state
  is stale: 503, metric, log; still enforced, never dropped.
- Each accepted change is written to ``feed_cache`` in a worker thread (and a heartbeat's
  fresher ``issued`` once an hour), one write at a time.
- Issuers (contract C1): the state's ``issuers`` (every live issuing CA) are verified against
  client_ca's roots with each accepted document (:mod:`~hub.revocation.feed_issuers`); when
  the verified set changes, ``on_issuers`` hears it (the hub's trust:
  :meth:`hub.cabundle.BundleWatcher.announce`). None: the feed names no issuer (an older CA),
  or none of those it names verifies (logged): client_ca alone decides then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hub.errors import FeedGapError, FeedRefusedError, SourceError
from hub.revocation.feed_cache import FeedCache
from hub.revocation.feed_client import FeedClient
from hub.revocation.feed_issuers import verify_issuers
from hub.revocation.feed_state import FeedStatus, source_data
from hub.revocation.feed_verify import REASONS, FeedVerifier, issued_time
from hub.revocation.model import SourceData, SourceHealth, SourceState, one_line
from hub.revocation.sources import PolledSource
from hub.tasks import cancel_and_wait
from provisioning.registry.feeddoc import Document, FeedState, apply

__all__ = ["BACKOFF_MAX_S", "BACKOFF_MIN_S", "START_BUDGET_S", "WAIT_SECONDS", "FeedSource"]

logger = logging.getLogger("hub.revocation")

WAIT_SECONDS: Final = 30.0  # the long-poll's wait; tests pass a shorter one
START_BUDGET_S: Final = 30.0  # with no cache: how long start waits for the first snapshot
BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 1.0  # a CA back after an outage is followed within ~1 s
CACHE_REFRESH_S: Final = 3600.0  # a heartbeat rewrites the cache when its issued is this old
REFUSAL_LOG_S: Final = 60.0  # one WARNING per refusal reason per minute, however many
# What a refusal says in health and audit: fixed per reason, so one line per change of state.
_REFUSED_TEXT: Final = {
    "envelope": "not the feed's JWS envelope (truncated?)",
    "signer": "not signed by a CA certificate of client_ca",
    "signature": "its signature does not verify",
    "format": "its document is malformed",
    "trust-domain": "it is for another trust domain",
    "gateway": "it was served to another gateway",
    "rollback": "its version goes back",
    "replay": "it was issued no later than the last one accepted",
}


Issuers = tuple[x509.Certificate, ...] | None  # verified issuing CAs; None: the feed names none


class _Issuers(NamedTuple):
    """The state's issuers as verified against client_ca: taken, and why others were not."""

    taken: Issuers
    problems: tuple[str, ...]


class _Taken(NamedTuple):
    doc: Document
    state: FeedState
    data: SourceData | None  # None: a heartbeat, nothing changed
    issuers: _Issuers


class FeedSource(PolledSource):
    """The fleet-state feed as a revocation source; its long-poll runs in its own task."""

    name = "feed"

    def __init__(self, client: FeedClient, verifier: FeedVerifier, cache: FeedCache | None,
                 *, max_age_seconds: float, certificates: bool = False,
                 wait: float = WAIT_SECONDS, start_budget: float = START_BUDGET_S) -> None:
        super().__init__(client.url)
        self._client, self._verifier, self._cache = client, verifier, cache
        self._max_age, self._wait, self._start_budget = max_age_seconds, wait, start_budget
        self._certificates = certificates
        self.on_news: Callable[[], None] | None = None  # set by the watcher: wake up
        self.on_issuers: Callable[[Issuers], None] | None = None  # set by the runtime
        self.issuers: Issuers = None  # the verified issuers in force
        self._issuer_problems: tuple[str, ...] = ()
        self._state: FeedState | None = None
        self._issued: str | None = None
        self._issued_at: float | None = None  # issued as time.time()
        self._cached_at: float | None = None  # issued of what the cache holds
        self._news: SourceData | None = None  # accepted, not yet handed to the watcher
        self._resync = False
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._dirty = False
        self._told_stale = False
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._refusal_logged: dict[str, float] = {}

    @property
    def version(self) -> int:
        return 0 if self._state is None else self._state.version

    # -- the watcher's side --------------------------------------------------------------

    async def poll(self, budget: float | None) -> bool:
        """Hand over the state accepted since the last poll; the first poll starts the task
        (and, with no cache, waits up to the start budget for a snapshot)."""
        if self._task is None:
            await self._start()
        news, self._news = self._news, None
        if news is not None:
            self.data = news
        self._log_state()
        return news is not None

    async def _start(self) -> None:
        if self._state is None and self._cache is not None:
            cached = await asyncio.to_thread(self._cache.load)
            if cached is not None:
                data = await asyncio.to_thread(source_data, cached.state,
                                               certificates=self._certificates)
                issuers = await asyncio.to_thread(self._verify_issuers, cached.state)
                self._set_state(cached.state, cached.issued, data)
                self._set_issuers(issuers)
                self._cached_at = self._issued_at
                logger.info("feed: starting from the cache %s (version %d, issued %s)",
                            self._cache.path, cached.state.version, cached.issued)
        self._task = asyncio.create_task(self._run(), name=f"feed {self.where}")
        if self._news is None and self.data is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), self._start_budget)
            if self.data is None and self._news is None and self.last_error is None:
                self.last_error = f"no snapshot within {self._start_budget:g} s"

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        saver = self._saver
        if saver is not None:
            with contextlib.suppress(Exception):
                await saver
        await self._client.close()

    def reload_tls(self) -> None:
        """Re-read feed_cert/feed_key (a rotated gateway certificate) for the next request."""
        self._client.reload()

    def replace_ca_certs(self, ca_certs: Sequence[x509.Certificate], cadata: str) -> None:
        """A reloaded client_ca: documents are checked against its CAs from now on, and the
        next request trusts them for the CA service's certificate."""
        self._verifier.replace(ca_certs)
        self._client.reload(cadata)

    def stale(self, now: float) -> bool:
        return self._issued_at is not None and now - self._issued_at > self._max_age

    def warning(self, now: float) -> str | None:
        if not self.stale(now):
            return None
        return (f"its state was issued by the CA at {self._issued}, more than "
                f"max_age_seconds ({self._max_age:g} s) ago; still enforced")

    def _log_state(self) -> None:
        if not self.ok and self.last_error is None:
            return  # nothing tried yet: started from the cache, the CA not asked yet
        super()._log_state()
        now = time.time()
        if not self.stale(now):
            self._told_stale = False
        elif not self.ok and not self._told_stale:
            # Down *and* too old: the base class tells only the one; say both.
            self._told_stale = True
            logger.warning("revocation source %s (%s) is stale: %s", self.name, self.where,
                           self.warning(now))
            self._tell(SourceState.STALE, self.warning(now))

    def health(self, now: float) -> SourceHealth:
        health = super().health(now)
        return dataclasses.replace(health, grace=self.data is not None and not health.stale)

    def status(self, now: float) -> FeedStatus:
        age = None if self._issued_at is None else max(0.0, now - self._issued_at)
        return FeedStatus(self.where, self._verifier.gateway, self.version, self._issued, age,
                          self._max_age, self.stale(now), MappingProxyType(dict(self.refused)))

    # -- the long-poll ---------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            since = 0 if self._state is None or self._resync else self._state.version
            try:
                body = await self._client.fetch(since, self._wait)
                taken = await asyncio.to_thread(self._take, body, self._state, self._issued)
            except FeedGapError as gap:
                if since == 0:  # a CA that answers a delta to since=0 is broken: back off
                    self._failed(f"the CA answered a delta to since=0: {gap}")
                else:
                    logger.info("feed %s: %s; asking for a snapshot", self.where, gap)
                    self._resync = True
                    continue
            except FeedRefusedError as refused:
                self._refuse(refused)
            except SourceError as exc:
                self._failed(str(exc))
            except Exception as exc:  # a bug here must not end the feed: the hub would freeze
                logger.exception("feed %s: unexpected error", self.where)
                self._failed(f"internal error: {exc!r}")
            else:
                self._accept(taken)
                backoff = BACKOFF_MIN_S
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _take(self, body: bytes, state: FeedState | None, issued: str | None) -> _Taken:
        """Verify and apply one answer (worker thread)."""
        doc = self._verifier.check(body, 0 if state is None else state.version, issued)
        if doc.heartbeat and state is not None:
            new, data = state, None
        else:
            new = apply(state, doc)
            data = source_data(new, certificates=self._certificates)
        # Every document: an issuer's validity ends, and a heartbeat carries them too.
        return _Taken(doc, new, data, self._verify_issuers(new))

    def _verify_issuers(self, state: FeedState) -> _Issuers:
        """The state's issuers checked against client_ca's roots (worker thread)."""
        ders = state.issuers  # contract C1; (): the CA named none
        if not ders:
            return _Issuers(None, ())
        taken, problems = verify_issuers(ders, self._verifier.ca_certs, dt.datetime.now(dt.UTC))
        return _Issuers(taken or None, problems)

    def _set_issuers(self, issuers: _Issuers) -> None:
        """On the loop: log what could not be taken (once per change), tell a changed set."""
        if issuers.problems != self._issuer_problems:
            self._issuer_problems = issuers.problems
            if issuers.problems:
                kept = ("the others are taken" if issuers.taken is not None else
                        "none is taken: client_ca alone says which intermediates may issue")
                logger.warning("feed %s: issuers refused: %s; %s", self.where,
                               "; ".join(issuers.problems), kept)
        if _ders(issuers.taken) == _ders(self.issuers):
            return
        self.issuers = issuers.taken
        names = ("none named" if issuers.taken is None else
                 ", ".join(repr(c.subject.rfc4514_string()) for c in issuers.taken))
        logger.warning("feed %s: issuing CAs now %s", self.where, names)
        if self.on_issuers is not None:
            self.on_issuers(issuers.taken)

    def _accept(self, taken: _Taken) -> None:
        self.ok, self.last_error, self.last_success = True, None, time.time()
        self._resync = False
        self._set_state(taken.state, taken.doc.issued, taken.data)
        self._set_issuers(taken.issuers)
        if taken.data is not None:
            self._save()
        elif (self._cached_at is None or self._issued_at is None
              or self._issued_at - self._cached_at >= CACHE_REFRESH_S):
            self._save()  # a heartbeat: keep the cache's age honest now and then
        self._first.set()
        self._log_state()

    def _set_state(self, state: FeedState, issued: str, data: SourceData | None) -> None:
        self._state, self._issued = state, issued
        self._issued_at = issued_time(issued).timestamp()
        if data is not None:
            self._news = data
            if self.on_news is not None:
                self.on_news()

    def _refuse(self, refused: FeedRefusedError) -> None:
        reason = refused.reason
        self.refused[reason] = self.refused.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._refusal_logged.get(reason, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            self._refusal_logged[reason] = now
            logger.warning("feed %s: refused a document (%s): %s; keeping the state of "
                           "version %d (%d refused for this reason so far)", self.where,
                           reason, refused.detail, self.version, self.refused[reason])
        self._failed(f"refused a document ({reason}): {_REFUSED_TEXT.get(reason, reason)}")

    def _failed(self, why: str) -> None:
        self.ok, self.last_error = False, one_line(why)
        self._log_state()

    # -- the cache -------------------------------------------------------------------------

    def _save(self) -> None:
        if self._cache is None:
            return
        self._dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.create_task(self._save_loop(self._cache),
                                              name=f"feed cache {self._cache.path}")

    async def _save_loop(self, cache: FeedCache) -> None:
        while self._dirty and self._state is not None and self._issued is not None:
            self._dirty = False
            state, issued, issued_at = self._state, self._issued, self._issued_at
            try:
                await asyncio.to_thread(cache.save, state, issued)
            except OSError as exc:
                logger.warning("feed cache %s cannot be written: %s", cache.path,
                               exc.strerror or exc)
                return
            self._cached_at = issued_at


def _ders(certs: Issuers) -> tuple[bytes, ...] | None:
    return None if certs is None else tuple(c.public_bytes(Encoding.DER) for c in certs)
