"""``GET /metrics`` and ``GET /healthz`` on the metrics address, served on the broker's loop.

An aiohttp ``AppRunner`` + ``TCPSite`` on that same loop, so a scrape costs one collection of
:class:`~hub.metrics.exposition.HubCollector` (a few dozen samples, tens of microseconds) and
no thread.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import generate_latest

from hub.config import BindAddress
from hub.errors import MetricsError
from hub.metrics.counters import Metrics
from hub.metrics.exposition import CONTENT_TYPE, HubCollector, Readings, age, registry_of

__all__ = ["MetricsServer"]

log = logging.getLogger("hub.metrics")


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on *bind*, on the running event loop.

    ``/healthz`` is 200 ``{"status": "ok"}`` only while every revocation source loaded on its
    last attempt (or is in its grace: the feed while its state is younger than
    max_age_seconds) and is fresh, else 503 ``"degraded"``; both list each source (its error or
    staleness warning) and, from *readings*: given revocation_version, the snapshot's version;
    given feed, the fleet-state feed's status (``"feed"``: version, state age, refusals); given
    expiring, the connected devices whose certificate expires within 7 days and 1 day
    (``"certificates_expiring"``); given client_ca, the bundle in force (``"client_ca"``:
    generation, certificates, refusals, last error); given findings, the audit-check findings
    recorded since start by check (``"findings"``). ``/metrics`` reads the same *readings*.
    """

    def __init__(self, bind: BindAddress, metrics: Metrics, readings: Readings) -> None:
        self.bind = bind
        self.metrics = metrics
        self._readings = readings
        self.registry = registry_of(HubCollector(metrics.statistics, readings))
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
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE})

    async def _get_healthz(self, _request: web.Request) -> web.Response:
        readings = self._readings
        now = readings.clock()
        sources = readings.revocation_health()
        healthy = all((source.ok or source.grace) and not source.stale for source in sources)
        report = [
            {
                "name": source.name,
                "ok": source.ok,
                "stale": source.stale,
                "last_error": source.last_error,
                "warning": source.warning,
                "age_seconds": None if source.last_success is None else age(source, now),
                "entries": source.entries,
            }
            for source in sources
        ]
        body: dict[str, object] = {"status": "ok" if healthy else "degraded",
                                   "revocation": report}
        if readings.revocation_version is not None:
            body["revocation_version"] = readings.revocation_version()
        feed = readings.feed() if readings.feed is not None else None
        if feed is not None:
            body["feed"] = feed.as_json()
        if readings.expiring is not None:
            body["certificates_expiring"] = dict(readings.expiring())
        if readings.client_ca is not None:
            body["client_ca"] = readings.client_ca().as_json()
        if readings.findings is not None:
            body["findings"] = dict(readings.findings())
        return web.json_response(body, status=200 if healthy else 503)
