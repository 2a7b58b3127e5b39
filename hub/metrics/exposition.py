"""``/metrics`` through prometheus-client: one custom collector, its registry, its text format.

:class:`HubCollector` reads everything at scrape time (the broker's counters, each revocation
source's health, the snapshot version, RSS and CPU, the integrator's extra figures) and yields
prometheus-client metric families; :func:`prometheus_client.generate_latest` writes them in the
Prometheus text format 0.0.4. Always that format, whatever the scraper's Accept header: in
OpenMetrics a counter's ``# TYPE`` line drops ``_total``, and the names here are a contract.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from hub.metrics.counters import Statistics

__all__ = ["CONTENT_TYPE", "REVOCATION_VERSION", "BundleStatusLike", "FeedStatusLike",
           "HubCollector", "Readings", "SourceHealthLike", "render_text"]

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4  # "text/plain; version=0.0.4; charset=utf-8"
# The revocation snapshot's version: +1 on every change of the refused serials, devices,
# passwords or groups. Tests and operators wait for it to move instead of sleeping.
REVOCATION_VERSION: Final = "fleet_hub_revocation_version"
_T = TypeVar("_T")
_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# HELP text for gauges the integrator passes through ``extra``; other names get a generic line.
_EXTRA_HELP: Final = {
    "fleet_hub_audit_dropped_total": "Audit records dropped (queue full, or refused by SQLite).",
    "fleet_hub_audit_written_total": "Audit records committed to the audit store.",
    "fleet_hub_audit_queue_depth": "Audit records queued and not yet committed.",
}


class SourceHealthLike(Protocol):
    """What the metrics need of a revocation source's health (hub.revocation.SourceHealth).

    ``last_success`` is a ``time.time()`` epoch time, or None if the source never loaded.
    """

    @property
    def name(self) -> str: ...
    @property
    def ok(self) -> bool: ...
    @property
    def stale(self) -> bool: ...
    @property
    def last_success(self) -> float | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def entries(self) -> int: ...
    @property
    def warning(self) -> str | None: ...
    @property
    def grace(self) -> bool: ...


class FeedStatusLike(Protocol):
    """What the metrics need of the fleet-state feed (hub.revocation.FeedStatus)."""

    @property
    def version(self) -> int: ...
    @property
    def state_age_seconds(self) -> float | None: ...
    @property
    def refused(self) -> Mapping[str, int]: ...
    def as_json(self) -> dict[str, object]: ...


class BundleStatusLike(Protocol):
    """What the metrics need of the client_ca bundle in force (hub.cabundle.BundleStatus)."""

    @property
    def generation(self) -> int: ...
    @property
    def certificates(self) -> int: ...
    @property
    def refused(self) -> int: ...
    def as_json(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class Readings:
    """The hub's status readers behind ``/metrics`` and ``/healthz``, called at each request.

    *revocation_health*: each revocation source's health; *extra*: the integrator's figures by
    metric name; *clock*: ``time.time()`` for the sources' ages. Each optional reader left None
    leaves its figures out: *revocation_version* (the snapshot's), *feed* (the fleet-state
    feed's status), *expiring* (connected devices by expiry window), *client_ca* (the bundle
    in force), *findings* (audit-check findings recorded, by check).
    """

    revocation_health: Callable[[], Sequence[SourceHealthLike]]
    extra: Callable[[], Mapping[str, float]] | None = None
    _: KW_ONLY
    clock: Callable[[], float] = time.time
    revocation_version: Callable[[], int] | None = None
    feed: Callable[[], FeedStatusLike | None] | None = None
    expiring: Callable[[], Mapping[str, int]] | None = None
    client_ca: Callable[[], BundleStatusLike] | None = None
    findings: Callable[[], Mapping[str, int]] | None = None


def age(source: SourceHealthLike, now: float) -> float:
    """Seconds since *source* last loaded; NaN if it never did."""
    return math.nan if source.last_success is None else max(0.0, now - source.last_success)


def _resident_bytes() -> int | None:
    """Resident set size from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:  # noqa: PTH123 - one tiny read per scrape
            fields = statm.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def _counter(name: str, help_text: str, label: str, counts: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


def _per_source(name: str, help_text: str, sources: Sequence[SourceHealthLike],
                value: Callable[[SourceHealthLike], float]) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=["source"])
    for source in sources:
        family.add_metric([source.name], value(source))
    return family


class HubCollector(Collector):
    """Every fleet-hub figure, read when the registry is collected (each scrape): the
    broker's *statistics* and the status *readings*."""

    def __init__(self, statistics: Callable[[], Statistics], readings: Readings) -> None:
        self._statistics = statistics
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        readings = self._readings
        # Read first, so an integrator's bad extra name fails before anything is written.
        extra = sorted((readings.extra() if readings.extra is not None else {}).items())
        for name, _ in extra:
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"not a Prometheus metric name: {name!r}")
        yield from self._counters(self._statistics())
        yield from self._revocation(readings.revocation_health(), readings.clock())
        if readings.revocation_version is not None:
            yield GaugeMetricFamily(REVOCATION_VERSION, "Version of the revocation snapshot in "
                                    "force; it grows by one on every change.",
                                    value=readings.revocation_version())
        feed = readings.feed() if readings.feed is not None else None
        if feed is not None:
            yield from self._feed_figures(feed)
        if readings.expiring is not None:
            family = GaugeMetricFamily("fleet_hub_certificates_expiring", "Connected devices "
                                       "whose certificate expires within the window.",
                                       labels=["within"])
            for window, count in readings.expiring().items():
                family.add_metric([window], count)
            yield family
        if readings.client_ca is not None:
            yield from self._bundle_figures(readings.client_ca())
        if readings.findings is not None:
            yield _counter("fleet_hub_findings_total", "Audit-check findings recorded, by "
                           "check (DESIGN section 11).", "check", readings.findings())
        resident = _resident_bytes()
        if resident is not None:
            yield GaugeMetricFamily("fleet_hub_process_resident_bytes",
                                    "Resident set size of the hub process.", value=resident)
        yield CounterMetricFamily("fleet_hub_process_cpu_seconds_total",
                                  "CPU time (user and system) used by the hub process.",
                                  value=time.process_time())
        for name, value in extra:
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield kind(name, _EXTRA_HELP.get(name, f"fleet-hub {name}."), value=value)

    @staticmethod
    def _counters(stats: Statistics) -> Iterator[Metric]:
        yield GaugeMetricFamily("fleet_hub_connections", "Client connections open now.",
                                value=stats.connections)
        yield CounterMetricFamily("fleet_hub_connects_accepted_total",
                                  "CONNECTs that passed every check.", value=stats.accepted)
        yield _counter("fleet_hub_connects_refused_total",
                       "Connections refused, by reason code.", "reason", stats.refused)
        yield _counter("fleet_hub_acl_denials_total",
                       "Publishes and subscriptions the ACL refused.", "action", stats.acl_denied)
        yield _counter("fleet_hub_kicks_total", "Live sessions closed by the hub, by reason.",
                       "reason", stats.kicks)
        yield _counter("fleet_hub_limit_hits_total", "Packets, messages and filters refused by "
                       "a [limits] value, by limit.", "limit", stats.limit_hits)
        yield CounterMetricFamily("fleet_hub_messages_received_total",
                                  "PUBLISH messages received from clients.", value=stats.received)
        yield CounterMetricFamily("fleet_hub_messages_delivered_total",
                                  "Messages delivered to subscribers.", value=stats.delivered)

    @staticmethod
    def _feed_figures(feed: FeedStatusLike) -> Iterator[Metric]:
        yield _counter("fleet_hub_feed_refused_total", "Fleet-state feed documents refused, by "
                       "reason; the last good state stays in force.", "reason", feed.refused)
        yield GaugeMetricFamily("fleet_hub_feed_version", "Version of the fleet-state feed's "
                                "state in force (0: none yet).", value=feed.version)
        age_ = feed.state_age_seconds
        yield GaugeMetricFamily("fleet_hub_feed_state_age_seconds", "Seconds since the CA "
                                "issued the last feed document accepted (NaN: none).",
                                value=math.nan if age_ is None else age_)

    @staticmethod
    def _bundle_figures(bundle: BundleStatusLike) -> Iterator[Metric]:
        yield GaugeMetricFamily("fleet_hub_client_ca_generation", "Generation of the client_ca "
                                "bundle in force: 1 at start, +1 for each changed bundle put "
                                "in force.", value=bundle.generation)
        yield GaugeMetricFamily("fleet_hub_client_ca_certificates", "CA certificates in the "
                                "client_ca bundle in force.", value=bundle.certificates)
        yield CounterMetricFamily("fleet_hub_client_ca_refused_total", "Changed client_ca "
                                  "bundles refused; the one in force stayed.",
                                  value=bundle.refused)

    @staticmethod
    def _revocation(sources: Sequence[SourceHealthLike], now: float) -> Iterator[Metric]:
        yield _per_source("fleet_hub_revocation_entries",
                          "Revoked or held serials in the last good list of each source.",
                          sources, lambda s: s.entries)
        yield _per_source("fleet_hub_revocation_age_seconds",
                          "Seconds since each source last loaded successfully (NaN: never).",
                          sources, lambda s: age(s, now))
        yield _per_source("fleet_hub_revocation_source_up",
                          "1 if the last attempt to load the source succeeded, else 0.",
                          sources, lambda s: 1 if s.ok else 0)
        yield _per_source("fleet_hub_revocation_stale",
                          "1 if the source's list is past its nextUpdate or too old, else 0.",
                          sources, lambda s: 1 if s.stale else 0)


def registry_of(collector: Collector) -> CollectorRegistry:
    """A registry of *collector* alone (not prometheus-client's global one, nor its default
    process and platform collectors, whose names would add to the contract)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render_text(
    statistics: Callable[[], Statistics],
    revocation_health: Callable[[], Sequence[SourceHealthLike]],
    extra: Callable[[], Mapping[str, float]] | None = None,
    *,
    now: float | None = None,
    revocation_version: int | None = None,
) -> str:
    """The exposition text, once (tests, :meth:`hub.metrics.Metrics.render`)."""
    version = None if revocation_version is None else _constant(revocation_version)
    readings = Readings(revocation_health, extra,
                        clock=time.time if now is None else _constant(now),
                        revocation_version=version)
    collector = HubCollector(statistics, readings)
    return generate_latest(registry_of(collector)).decode("utf-8")


def _constant(value: _T) -> Callable[[], _T]:
    return lambda: value
