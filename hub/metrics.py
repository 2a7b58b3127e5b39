"""Prometheus ``/metrics`` and ``/healthz`` on the metrics address, served on the broker's loop.

:class:`Metrics` is a bag of plain counters the broker bumps synchronously (an int or dict
increment, no lock: everything runs on one event loop). :class:`MetricsServer` is an aiohttp
``AppRunner`` + ``TCPSite`` on that same loop, so a scrape costs a render of a few dozen lines
and no thread. The text follows the Prometheus exposition format 0.0.4.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from aiohttp import web

from hub.config import BindAddress
from hub.errors import HubError

__all__ = [
    "ACL_ACTIONS",
    "CONTENT_TYPE",
    "KICK_REASONS",
    "LIMITS",
    "REVOCATION_VERSION",
    "Metrics",
    "MetricsError",
    "MetricsServer",
    "SourceHealthLike",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ACL_ACTIONS = ("publish", "subscribe")
KICK_REASONS = ("revoked", "on-hold", "device-suspended", "device-revoked", "expired")
# [limits] hits, by the audit reason they share (hub/limits.py, docs/gateway.md).
LIMITS = ("packet-too-large", "rate-limited", "topic-too-long", "too-many-subscriptions",
          "retained-quota")
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# HELP text for gauges the integrator passes through ``extra``; other names get a generic line.
_EXTRA_HELP = {
    "fleet_hub_audit_dropped_total": "Audit records dropped (queue full, or refused by SQLite).",
    "fleet_hub_audit_written_total": "Audit records committed to the audit store.",
    "fleet_hub_audit_queue_depth": "Audit records queued and not yet committed.",
}
# The revocation snapshot's version: +1 on every change of the refused serials, devices,
# passwords or groups. Tests and operators wait for it to move instead of sleeping.
REVOCATION_VERSION = "fleet_hub_revocation_version"


class MetricsError(HubError):
    """The metrics endpoint cannot be served (the address cannot be bound)."""


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


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Text:
    """Accumulates families: ``# HELP``, ``# TYPE``, then samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                pairs = ",".join(f'{key}="{_escape_label(v)}"' for key, v in labels.items())
                self.lines.append(f"{name}{{{pairs}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def labelled(
        self, name: str, help_text: str, label: str, counts: Mapping[str, int]
    ) -> None:
        samples = [({label: key}, value) for key, value in sorted(counts.items())]
        self.family(name, "counter", help_text, samples)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _resident_bytes() -> int | None:
    """Resident set size from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:  # noqa: PTH123 - one tiny read per scrape
            fields = statm.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


class Metrics:
    """The hub's counters; every method is an O(1) increment, called from the event loop.

    Known label values (ACL actions, kick reasons, and any *refuse_reasons* given) are exported
    at 0 from the start, so ``rate()`` sees the first event.
    """

    def __init__(self, *, refuse_reasons: Iterable[str] = ()) -> None:
        self._connections = 0
        self._accepted = 0
        self._refused: dict[str, int] = dict.fromkeys(refuse_reasons, 0)
        self._acl_denied: dict[str, int] = dict.fromkeys(ACL_ACTIONS, 0)
        self._kicks: dict[str, int] = dict.fromkeys(KICK_REASONS, 0)
        self._received = 0
        self._delivered = 0
        self._limit_hits: dict[str, int] = dict.fromkeys(LIMITS, 0)

    def connection_opened(self) -> None:
        """A client connection was accepted by the listener."""
        self._connections += 1

    def connection_closed(self) -> None:
        """A client connection ended, for whatever reason."""
        self._connections -= 1

    def accepted(self) -> None:
        """A CONNECT passed every check."""
        self._accepted += 1

    def refused(self, reason: str) -> None:
        """A CONNECT (or handshake) was refused with the reason code *reason*."""
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def acl_denied(self, action: str) -> None:
        """A publish or a subscription was refused by the ACL."""
        self._acl_denied[action] = self._acl_denied.get(action, 0) + 1

    def kicked(self, reason: str) -> None:
        """A live session was closed by the hub (revocation, hold, suspension, expiry)."""
        self._kicks[reason] = self._kicks.get(reason, 0) + 1

    def limit_hit(self, limit: str) -> None:
        """A [limits] value refused something (every message or filter, not once per
        connection like the audit)."""
        self._limit_hits[limit] = self._limit_hits.get(limit, 0) + 1

    def messages_in(self, n: int = 1) -> None:
        """*n* PUBLISH messages received from clients."""
        self._received += n

    def messages_out(self, n: int = 1) -> None:
        """*n* messages delivered to subscribers."""
        self._delivered += n

    def render(
        self,
        revocation: Sequence[SourceHealthLike],
        extra_gauges: Mapping[str, float] | None = None,
        *,
        now: float | None = None,
        revocation_version: int | None = None,
    ) -> str:
        """The exposition text; *now* (``time.time()``) is for the revocation ages."""
        now = time.time() if now is None else now
        out = _Text()
        out.single("fleet_hub_connections", "gauge", "Client connections open now.",
                   self._connections)
        out.single("fleet_hub_connects_accepted_total", "counter",
                   "CONNECTs that passed every check.", self._accepted)
        out.labelled("fleet_hub_connects_refused_total", "Connections refused, by reason code.",
                     "reason", self._refused)
        out.labelled("fleet_hub_acl_denials_total", "Publishes and subscriptions the ACL refused.",
                     "action", self._acl_denied)
        out.labelled("fleet_hub_kicks_total", "Live sessions closed by the hub, by reason.",
                     "reason", self._kicks)
        out.labelled("fleet_hub_limit_hits_total", "Packets, messages and filters refused by "
                     "a [limits] value, by limit.", "limit", self._limit_hits)
        out.single("fleet_hub_messages_received_total", "counter",
                   "PUBLISH messages received from clients.", self._received)
        out.single("fleet_hub_messages_delivered_total", "counter",
                   "Messages delivered to subscribers.", self._delivered)
        self._render_revocation(out, revocation, now)
        if revocation_version is not None:
            out.single(REVOCATION_VERSION, "gauge", "Version of the revocation snapshot in "
                       "force; it grows by one on every change.", revocation_version)
        resident = _resident_bytes()
        if resident is not None:
            out.single("fleet_hub_process_resident_bytes", "gauge",
                       "Resident set size of the hub process.", resident)
        out.single("fleet_hub_process_cpu_seconds_total", "counter",
                   "CPU time (user and system) used by the hub process.", time.process_time())
        for name, value in sorted((extra_gauges or {}).items()):
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"not a Prometheus metric name: {name!r}")
            kind = "counter" if name.endswith("_total") else "gauge"
            out.single(name, kind, _EXTRA_HELP.get(name, f"fleet-hub {name}."), value)
        return out.text()

    @staticmethod
    def _render_revocation(
        out: _Text, sources: Sequence[SourceHealthLike], now: float
    ) -> None:
        def each(value: Callable[[SourceHealthLike], float]) -> list[tuple[dict[str, str], float]]:
            return [({"source": source.name}, value(source)) for source in sources]

        out.family("fleet_hub_revocation_entries", "gauge",
                   "Revoked or held serials in the last good list of each source.",
                   each(lambda s: s.entries))
        out.family("fleet_hub_revocation_age_seconds", "gauge",
                   "Seconds since each source last loaded successfully (NaN: never).",
                   each(lambda s: _age(s, now)))
        out.family("fleet_hub_revocation_source_up", "gauge",
                   "1 if the last attempt to load the source succeeded, else 0.",
                   each(lambda s: 1 if s.ok else 0))
        out.family("fleet_hub_revocation_stale", "gauge",
                   "1 if the source's list is past its nextUpdate or too old, else 0.",
                   each(lambda s: 1 if s.stale else 0))


def _age(source: SourceHealthLike, now: float) -> float:
    return math.nan if source.last_success is None else max(0.0, now - source.last_success)


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on *bind*, on the running event loop.

    ``/healthz`` is 200 ``{"status": "ok"}`` only while every revocation source loaded on its
    last attempt and is fresh, else 503 ``"degraded"``; both list each source (its error or
    staleness warning) and, given *revocation_version*, the snapshot's version.
    """

    def __init__(
        self,
        bind: BindAddress,
        metrics: Metrics,
        revocation_health: Callable[[], Sequence[SourceHealthLike]],
        extra: Callable[[], Mapping[str, float]] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        revocation_version: Callable[[], int] | None = None,
    ) -> None:
        self.bind = bind
        self.metrics = metrics
        self._health = revocation_health
        self._extra = extra
        self._clock = clock
        self._version = revocation_version
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when *bind* asked for port 0)."""
        if self._port is None:
            raise MetricsError("the metrics server is not started")
        return self._port

    async def start(self) -> None:
        """Bind and serve; raise MetricsError naming the address if it cannot be bound."""
        if self._runner is not None:
            raise MetricsError("the metrics server is already started")
        app = web.Application()
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_healthz)
        # No access log: a scrape every few seconds is not news. shutdown_timeout bounds how
        # long stop() waits for an in-flight scrape.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.bind.host, self.bind.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            why = exc.strerror or str(exc)
            raise MetricsError(f"cannot listen for metrics on {self.bind}: {why}") from exc
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("metrics on http://%s/metrics", BindAddress(self.bind.host, self._port))

    async def stop(self) -> None:
        """Stop serving and release the port; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _get_metrics(self, _request: web.Request) -> web.Response:
        extra = self._extra() if self._extra is not None else None
        version = self._version() if self._version is not None else None
        text = self.metrics.render(self._health(), extra, now=self._clock(),
                                   revocation_version=version)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def _get_healthz(self, _request: web.Request) -> web.Response:
        now = self._clock()
        sources = self._health()
        healthy = all(source.ok and not source.stale for source in sources)
        report = [
            {
                "name": source.name,
                "ok": source.ok,
                "stale": source.stale,
                "last_error": source.last_error,
                "warning": source.warning,
                "age_seconds": None if source.last_success is None else _age(source, now),
                "entries": source.entries,
            }
            for source in sources
        ]
        body: dict[str, object] = {"status": "ok" if healthy else "degraded",
                                   "revocation": report}
        if self._version is not None:
            body["revocation_version"] = self._version()
        return web.json_response(body, status=200 if healthy else 503)
