"""The watcher: every source polled on its own rhythm, their union published as one Snapshot.

The :class:`~hub.revocation.model.Snapshot` is the union of every source's last good data and
is replaced wholesale on change, so a reader needs no lock. Local sources (the registry: one
PRAGMA; a CRL file: one stat) are looked at every FAST_POLL_SECONDS, so a revocation closes
sessions within a tenth of a second; a CRL URL is fetched every ``refresh_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hub.config import RevocationConfig
from hub.errors import ConfigError, RevocationError
from hub.revocation.crl import CrlVerifier
from hub.revocation.crl_sources import CrlFileSource, CrlUrlSource
from hub.revocation.feed import FeedSource
from hub.revocation.feed_cache import FeedCache
from hub.revocation.feed_client import FeedClient
from hub.revocation.feed_verify import FeedVerifier
from hub.revocation.model import EMPTY_SNAPSHOT, Snapshot, SourceCallback, SourceHealth, one_line
from hub.revocation.registry import RegistrySource
from hub.revocation.sources import RevocationSource
from hub.trust import gateway_identity

__all__ = ["FAST_POLL_SECONDS", "RevocationWatcher", "configured_sources"]

logger = logging.getLogger("hub.revocation")

FAST_POLL_SECONDS: Final = 0.1
OnChange = Callable[[Snapshot, Snapshot], None]


def configured_sources(config: RevocationConfig, ca_certs: Sequence[x509.Certificate], *,
                       certificates: bool = False) -> list[RevocationSource]:
    """The sources ``[revocation]`` names, in the order registry, crl-file, crl-url, feed;
    with *certificates* (``[auth] registered_only``) the registry and the feed list valid
    serials too. ConfigError (``revocation.feed_cert``) when the feed's certificate names no
    gateway."""
    verifier = CrlVerifier(ca_certs)
    cadata = "".join(cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
                     for cert in ca_certs)
    sources: list[RevocationSource] = []
    if config.registry is not None:
        sources.append(RegistrySource(config.registry, certificates=certificates))
    if config.crl_file is not None:
        sources.append(CrlFileSource(config.crl_file, verifier))
    if config.crl_url is not None:
        sources.append(CrlUrlSource(config.crl_url, verifier, cadata))
    if config.feed is not None:
        sources.append(feed_source(config, config.feed, ca_certs, cadata,
                                   certificates=certificates))
    return sources


def feed_source(config: RevocationConfig, feed: str, ca_certs: Sequence[x509.Certificate],
                cadata: str, *, certificates: bool) -> FeedSource:
    """The ``feed`` source of *config*, as the gateway its ``feed_cert`` names."""
    cert, key = config.feed_cert, config.feed_key
    if cert is None or key is None or (found := gateway_identity(cert)) is None:
        raise ConfigError(None, "revocation.feed_cert", f"{cert} carries no (single) SAN URI "
                          "spiffe://<trust-domain>/gateway/<name>")
    domain, gateway = found
    cache = (None if config.feed_cache is None
             else FeedCache(config.feed_cache, domain, gateway))
    return FeedSource(FeedClient(feed, cert, key, cadata),
                      FeedVerifier(ca_certs, domain, gateway), cache,
                      max_age_seconds=config.max_age_seconds, certificates=certificates)


class RevocationWatcher:
    """Keeps :attr:`snapshot` fresh from the configured sources, every ``refresh_seconds``.

    ``on_change(old, new)`` is called on the event loop after each content change made by
    :meth:`refresh` or the refresh loop (not for the first load in :meth:`start`).
    ``on_source(name, state, why)`` is called on the event loop once per change of a source's
    state (down, stale, up again), including a failure in :meth:`start`. *sources*, when
    given, replace those *config* names (its ``refresh_seconds`` still counts): see
    :meth:`over` and :class:`~hub.revocation.memory.MemorySource`. *certificates*: the sources
    also list each device's valid serials (``[auth] registered_only``, and the audit checks);
    *versioned_certificates* False: a change of those lists alone is taken into the snapshot
    at the same version, without ``on_change`` (nothing enforces them: only
    :mod:`hub.findings` reads them), so ``revocation_version`` still moves only when what
    the hub enforces does.
    """

    def __init__(
        self,
        config: RevocationConfig,
        ca_certs: Sequence[x509.Certificate],
        on_change: OnChange | None = None,
        *,
        on_source: SourceCallback | None = None,
        sources: Sequence[RevocationSource] | None = None,
        certificates: bool = False,
        versioned_certificates: bool = True,
    ) -> None:
        self._config = config
        self._versioned_certificates = versioned_certificates
        self._on_change = on_change
        self._sources = (list(sources) if sources is not None
                         else configured_sources(config, ca_certs, certificates=certificates))
        # Sources that tell of news themselves (the feed's long-poll) wake the loop at once.
        self._pushing: list[RevocationSource] = []
        for source in self._sources:
            source.on_state = on_source
            if isinstance(source, FeedSource):
                source.on_news = self._wake_up
                self._pushing.append(source)
        self._snapshot = EMPTY_SNAPSHOT
        self._lock = asyncio.Lock()  # one refresh cycle at a time
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # set by stop() and by a pushing source's news
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def over(cls, sources: Sequence[RevocationSource], *, refresh_seconds: float = 1.0,
             on_change: OnChange | None = None,
             on_source: SourceCallback | None = None) -> RevocationWatcher:
        """A watcher of *sources* alone (tests: in-memory fakes), refreshed every
        *refresh_seconds* once started; :meth:`refresh` polls them at once."""
        return cls(RevocationConfig(refresh_seconds=refresh_seconds), (), on_change,
                   on_source=on_source, sources=sources)

    @property
    def sources(self) -> tuple[RevocationSource, ...]:
        """The sources watched, in the order registry, crl-file, crl-url, feed."""
        return tuple(self._sources)

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
            raise RevocationError("no revocation source configured: set revocation.registry, "
                                  "revocation.crl or revocation.feed")
        await self._cycle(budget=None, notify=False)
        if all(source.data is None for source in self._sources):
            problems = "; ".join(f"{s.name} {s.where}: {s.last_error}" for s in self._sources)
            async with self._lock:
                await self._close_sources()
            raise RevocationError(one_line(f"no revocation source could be loaded: {problems}"))
        self._stopping.clear()
        self._wake.clear()
        self._task = asyncio.create_task(self._run(), name="hub.revocation refresh")

    def _wake_up(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop the refresh loop (letting a cycle in progress finish) and close connections."""
        self._stopping.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await task
        async with self._lock:
            await self._close_sources()

    async def refresh(self) -> bool:
        """One refresh cycle now, waiting for every source; True if the content changed."""
        return await self._cycle(budget=None, notify=True)

    def replace_ca_certs(self, ca_certs: Sequence[x509.Certificate], cadata: str) -> None:
        """A reloaded client_ca (:mod:`hub.cabundle`), on the loop: the CRL sources check
        later CRLs, and the feed later documents, against *ca_certs*; the lists in force stay."""
        for source in self._sources:
            if isinstance(source, (CrlFileSource, CrlUrlSource, FeedSource)):
                source.replace_ca_certs(ca_certs, cadata)

    def health(self) -> list[SourceHealth]:
        """Each configured source's state, in the order registry, crl-file, crl-url."""
        now = time.time()
        return [source.health(now) for source in self._sources]

    @property
    def healthy(self) -> bool:
        """Every source loaded on its last attempt (or is in its grace, as the feed while its
        state is younger than max_age_seconds) and none is stale."""
        return all(h.healthy for h in self.health())

    async def _run(self) -> None:
        interval = self._config.refresh_seconds
        local = [source for source in self._sources if source.local]
        tick = min(interval, FAST_POLL_SECONDS) if local else interval
        loop = asyncio.get_running_loop()
        due_all = loop.time() + interval
        due = loop.time() + tick
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - loop.time()))
            self._wake.clear()
            if self._stopping.is_set():
                return
            now = loop.time()
            if now < due - tick / 2 and self._pushing:
                # Woken by news (the feed accepted a change): publish it now.
                try:
                    await self._cycle(budget=interval, notify=True, sources=self._pushing)
                except Exception:
                    logger.exception("revocation refresh failed")
                continue
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
                     sources: list[RevocationSource] | None = None) -> bool:
        async with self._lock:
            polled = await asyncio.gather(*(source.poll(budget)
                                            for source in sources or self._sources))
            return any(polled) and self._publish(notify=notify)

    def _publish(self, *, notify: bool) -> bool:
        revoked: dict[int, str] = {}
        devices: dict[str, str] = {}
        hashes: dict[str, str] = {}
        groups: dict[str, str] = {}
        certificates: dict[str, frozenset[int]] | None = None
        for source in self._sources:
            data = source.data
            if data is None:
                continue
            if data.certificates is not None:
                # Union: a serial any source lists as valid is registered.
                if certificates is None:
                    certificates = dict(data.certificates)
                else:
                    for device_id, serials in data.certificates.items():
                        known = certificates.get(device_id)
                        certificates[device_id] = serials if known is None else known | serials
            for serial, reason in data.revoked.items():
                # Union: revoked in any source is revoked; held only where none revokes it.
                if reason == "revoked" or serial not in revoked:
                    revoked[serial] = reason
            devices.update(data.devices)
            hashes.update(data.password_hashes)
            groups.update(data.groups)
        old = self._snapshot
        enforced_same = (revoked == old.revoked and devices == old.devices
                         and hashes == old.password_hashes and groups == old.groups)
        if enforced_same and certificates == old.certificates:
            return False
        listed = None if certificates is None else MappingProxyType(certificates)
        if enforced_same and not self._versioned_certificates:
            self._snapshot = replace(old, certificates=listed)  # read only: same version
            return False
        new = Snapshot(MappingProxyType(revoked), MappingProxyType(devices),
                       MappingProxyType(hashes), old.version + 1, MappingProxyType(groups),
                       listed)
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
