"""Prometheus ``/metrics`` and ``/healthz``, served on the broker's loop.

- :mod:`~hub.metrics.counters`: :class:`Metrics`, the plain counters the broker bumps
  synchronously (an int or dict increment, no lock: everything runs on one event loop);
- :mod:`~hub.metrics.exposition`: :class:`HubCollector`, a prometheus-client custom collector
  that reads them and the status :class:`Readings` (the revocation sources' health, ...) at
  scrape time, and the 0.0.4 text;
- :mod:`~hub.metrics.server`: :class:`MetricsServer`, the aiohttp endpoint.
"""

from __future__ import annotations

from hub.errors import MetricsError
from hub.metrics.counters import ACL_ACTIONS, KICK_REASONS, LIMITS, Metrics, Statistics
from hub.metrics.exposition import (
    CONTENT_TYPE,
    REVOCATION_VERSION,
    BundleStatusLike,
    FeedStatusLike,
    HubCollector,
    Readings,
    SourceHealthLike,
)
from hub.metrics.server import MetricsServer

__all__ = [
    "ACL_ACTIONS",
    "CONTENT_TYPE",
    "KICK_REASONS",
    "LIMITS",
    "REVOCATION_VERSION",
    "BundleStatusLike",
    "FeedStatusLike",
    "HubCollector",
    "Metrics",
    "MetricsError",
    "MetricsServer",
    "Readings",
    "SourceHealthLike",
    "Statistics",
]
