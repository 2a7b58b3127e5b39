"""Which certificates and devices the hub refuses, kept fresh from the registry, CRLs or the feed.

Sources, from ``[revocation]`` (DESIGN section 5):

- ``registry``: the CA's SQLite registry on the same host, read through
  :mod:`provisioning.registry.view` (read-only; an unchanged registry costs one ``stat`` and
  one PRAGMA per look; a file replaced or overwritten is reopened and its header checked);
- ``crl-file``: a CRL file, re-read when its inode, mtime or size changes;
- ``crl-url``: a CRL over http(s), fetched every refresh with a conditional GET;
- ``feed``: the CA service's signed fleet-state feed (DESIGN section 9), long-polled in its
  own task; each accepted change wakes the watcher, the last good state is cached on disk.

A source that cannot be read keeps its last good data and reports ``ok=False``; a CRL past its
nextUpdate (the feed's state: older than ``max_age_seconds``) is still used and reports
``stale=True``; each change of state is logged once on
``hub.revocation`` and handed to ``on_source`` (the hub audits it). Nothing fails open (drops
entries) or closed (refuses everyone) without saying so. Blocking work (SQLite, file reads,
CRL parsing and signature checks) runs in worker threads, never on the event loop.

Modules:

- :mod:`~hub.revocation.model`: Snapshot, refusal(), SourceData, SourceHealth, SourceState;
- :mod:`~hub.revocation.sources`: the RevocationSource protocol and PolledSource, the
  behaviour every source shares (last good data, health, once-per-change logging);
- :mod:`~hub.revocation.registry`, :mod:`~hub.revocation.crl_sources`: the real sources;
  :mod:`~hub.revocation.crl`: CRL verification and the rollback / stale-on-arrival rules;
- :mod:`~hub.revocation.feed`: FeedSource (the long-poll, state, age, health), with
  :mod:`~hub.revocation.feed_client` (HTTPS with the gateway certificate),
  :mod:`~hub.revocation.feed_verify` (the acceptance rules, each refusal named),
  :mod:`~hub.revocation.feed_cache` (the last good state on disk) and
  :mod:`~hub.revocation.feed_state` (the state as the watcher and /healthz take it);
- :mod:`~hub.revocation.memory`: MemorySource, an in-memory source for tests;
- :mod:`~hub.revocation.watcher`: RevocationWatcher, which polls them and publishes the union.
"""

from __future__ import annotations

from hub.errors import RevocationError, SourceError
from hub.revocation.crl import load_ca_bundle
from hub.revocation.memory import MemorySource
from hub.revocation.model import (
    Snapshot,
    SourceCallback,
    SourceData,
    SourceHealth,
    SourceState,
    refusal,
    unregistered,
)
from hub.revocation.sources import PolledSource, RevocationSource
from hub.revocation.watcher import FAST_POLL_SECONDS, RevocationWatcher

__all__ = [
    "FAST_POLL_SECONDS",
    "MemorySource",
    "PolledSource",
    "RevocationError",
    "RevocationSource",
    "RevocationWatcher",
    "Snapshot",
    "SourceCallback",
    "SourceData",
    "SourceError",
    "SourceHealth",
    "SourceState",
    "load_ca_bundle",
    "refusal",
    "unregistered",
]
