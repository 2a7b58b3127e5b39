"""Prometheus text (prometheus-client's) and /healthz: exact exposition lines, the families read
back by prometheus-client's parser, and a real server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hub.cabundle import BundleStatus
from hub.config import BindAddress
from hub.errors import HubError
from hub.metrics import (
    CONTENT_TYPE,
    HubCollector,
    Metrics,
    MetricsError,
    MetricsServer,
    Readings,
    SourceHealthLike,
)

NOW = 1_800_000_000.0
LOOPBACK = BindAddress("127.0.0.1", 0)
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


@dataclass(frozen=True)
class Health:
    """A revocation source's health, shaped like hub.revocation.SourceHealth."""

    name: str
    ok: bool = True
    stale: bool = False
    last_success: float | None = NOW - 2.5
    last_error: str | None = None
    entries: int = 3
    warning: str | None = None
    grace: bool = False


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line; checks each has HELP and TYPE first."""
    helped: set[str] = set()
    typed: set[str] = set()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in {"counter", "gauge"}
            typed.add(name)
        else:
            match = _SAMPLE_RE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            assert name in helped, f"{name} has no # HELP"
            assert name in typed, f"{name} has no # TYPE"
            found[name + (match.group(2) or "")] = float(match.group(3))
    return found


def test_counters_render_as_exact_exposition_lines() -> None:
    """Each counter and labelled counter appears as its exact line, with HELP and TYPE."""
    metrics = Metrics(refuse_reasons=["expired"])
    for _ in range(3):
        metrics.connection_opened()
    metrics.connection_closed()
    metrics.accepted()
    metrics.accepted()
    metrics.refused("revoked")
    metrics.refused("revoked")
    metrics.refused("client-id-mismatch")
    metrics.acl_denied("publish")
    metrics.kicked("on-hold")
    metrics.messages_in(5)
    metrics.messages_out()
    text = metrics.render([], now=NOW)
    lines = text.splitlines()
    for expected in [
        "# HELP fleet_hub_connections Client connections open now.",
        "# TYPE fleet_hub_connections gauge",
        "fleet_hub_connections 2.0",
        "# TYPE fleet_hub_connects_accepted_total counter",
        "fleet_hub_connects_accepted_total 2.0",
        "# TYPE fleet_hub_connects_refused_total counter",
        'fleet_hub_connects_refused_total{reason="client-id-mismatch"} 1.0',
        'fleet_hub_connects_refused_total{reason="expired"} 0.0',
        'fleet_hub_connects_refused_total{reason="revoked"} 2.0',
        'fleet_hub_acl_denials_total{action="publish"} 1.0',
        'fleet_hub_acl_denials_total{action="subscribe"} 0.0',
        'fleet_hub_kicks_total{reason="on-hold"} 1.0',
        'fleet_hub_kicks_total{reason="revoked"} 0.0',
        'fleet_hub_kicks_total{reason="expired"} 0.0',
        "fleet_hub_messages_received_total 5.0",
        "fleet_hub_messages_delivered_total 1.0",
        "# TYPE fleet_hub_process_cpu_seconds_total counter",
    ]:
        assert expected in lines
    assert text.endswith("\n")
    assert samples(text)["fleet_hub_process_resident_bytes"] > 1_000_000


def test_revocation_sources_and_extra_gauges_render_per_source() -> None:
    """Entries, age (NaN if never loaded), up and stale per source; extra gauges pass through."""
    sources = [
        Health("registry", entries=7),
        Health("crl", ok=False, stale=True, last_success=None, last_error="timed out",
               entries=0),
    ]
    text = Metrics().render(sources, {"fleet_hub_audit_dropped_total": 4}, now=NOW)
    lines = text.splitlines()
    for expected in [
        "# TYPE fleet_hub_revocation_entries gauge",
        'fleet_hub_revocation_entries{source="registry"} 7.0',
        'fleet_hub_revocation_entries{source="crl"} 0.0',
        'fleet_hub_revocation_age_seconds{source="registry"} 2.5',
        'fleet_hub_revocation_age_seconds{source="crl"} NaN',
        'fleet_hub_revocation_source_up{source="registry"} 1.0',
        'fleet_hub_revocation_source_up{source="crl"} 0.0',
        'fleet_hub_revocation_stale{source="registry"} 0.0',
        'fleet_hub_revocation_stale{source="crl"} 1.0',
        "# TYPE fleet_hub_audit_dropped_total counter",
        "fleet_hub_audit_dropped_total 4.0",
    ]:
        assert expected in lines
    assert math.isnan(samples(text)['fleet_hub_revocation_age_seconds{source="crl"}'])


def test_label_values_are_escaped_per_the_exposition_format() -> None:
    """Backslash, double quote and newline in a label value are escaped; nothing else is."""
    metrics = Metrics()
    metrics.refused('bad "id"\\x\nnext é')
    lines = metrics.render([], now=NOW).splitlines()
    assert 'fleet_hub_connects_refused_total{reason="bad \\"id\\"\\\\x\\nnext é"} 1.0' in lines


def test_an_invalid_extra_metric_name_is_refused() -> None:
    """An extra gauge whose name Prometheus would reject fails loudly, not as a broken scrape."""
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        Metrics().render([], {"audit dropped": 1.0})


def test_the_families_are_fixed_and_read_back_by_prometheus_clients_parser() -> None:
    """prometheus-client's own parser reads the text back: every family of docs/gateway.md's
    list with its type, the counters named with _total, and no family of its default
    collectors (python_gc, process_*) in the hub's registry."""
    metrics = Metrics(refuse_reasons=["expired"])
    metrics.refused("expired")
    text = metrics.render([Health("registry")], {"fleet_hub_audit_queue_depth": 2},
                          now=NOW, revocation_version=9)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    kinds = {name: family.type for name, family in families.items()}
    assert kinds == {
        "fleet_hub_connections": "gauge",
        "fleet_hub_connects_accepted": "counter",  # the parser's name drops _total
        "fleet_hub_connects_refused": "counter",
        "fleet_hub_acl_denials": "counter",
        "fleet_hub_kicks": "counter",
        "fleet_hub_limit_hits": "counter",
        "fleet_hub_messages_received": "counter",
        "fleet_hub_messages_delivered": "counter",
        "fleet_hub_revocation_entries": "gauge",
        "fleet_hub_revocation_age_seconds": "gauge",
        "fleet_hub_revocation_source_up": "gauge",
        "fleet_hub_revocation_stale": "gauge",
        "fleet_hub_revocation_version": "gauge",
        "fleet_hub_process_resident_bytes": "gauge",
        "fleet_hub_process_cpu_seconds": "counter",
        "fleet_hub_audit_queue_depth": "gauge",
    }
    [refused] = families["fleet_hub_connects_refused"].samples
    assert (refused.name, refused.labels, refused.value) == (
        "fleet_hub_connects_refused_total", {"reason": "expired"}, 1)
    assert families["fleet_hub_revocation_version"].samples[0].value == 9


def test_the_collector_reads_its_figures_at_each_collection() -> None:
    """HubCollector in any prometheus-client registry: each collection reads the counters,
    the sources' health and the version anew (nothing is copied when it is registered)."""
    metrics = Metrics()
    version = [1]
    registry = CollectorRegistry()
    registry.register(HubCollector(metrics.statistics, Readings(
        lambda: [Health("crl")], clock=lambda: NOW, revocation_version=lambda: version[0])))
    assert registry.get_sample_value("fleet_hub_connects_accepted_total") == 0
    metrics.accepted()
    version[0] = 2
    assert registry.get_sample_value("fleet_hub_connects_accepted_total") == 1
    assert registry.get_sample_value("fleet_hub_revocation_version") == 2
    assert registry.get_sample_value("fleet_hub_revocation_age_seconds",
                                     {"source": "crl"}) == 2.5


# ---------------------------------------------------------------------------------------------
# The server, on a real loopback port


def serve(
    sources: Sequence[SourceHealthLike],
    check: Callable[[aiohttp.ClientSession, str], Awaitable[None]],
    metrics: Metrics | None = None,
    version: Callable[[], int] | None = None,
    **figures: Any,
) -> None:
    """Start a MetricsServer on 127.0.0.1 port 0, run *check* against its base URL, stop it;
    *figures*: further optional Readings (expiring, client_ca)."""

    async def main() -> None:
        server = MetricsServer(LOOPBACK, metrics or Metrics(), Readings(
            lambda: sources, lambda: {"fleet_hub_audit_dropped_total": 0}, clock=lambda: NOW,
            revocation_version=version, **figures,
        ))
        await server.start()
        try:
            assert server.port > 0
            async with aiohttp.ClientSession() as session:
                await check(session, f"http://127.0.0.1:{server.port}")
        finally:
            await server.stop()
            await server.stop()  # idempotent

    asyncio.run(main())


def test_metrics_endpoint_serves_the_exposition_text() -> None:
    """GET /metrics: 200, the Prometheus 0.0.4 content type, and parseable current values."""
    metrics = Metrics()
    metrics.accepted()
    metrics.kicked("revoked")

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            text = await response.text()
        values = samples(text)
        assert values["fleet_hub_connects_accepted_total"] == 1
        assert values['fleet_hub_kicks_total{reason="revoked"}'] == 1
        assert values['fleet_hub_revocation_age_seconds{source="crl"}'] == 2.5
        assert values["fleet_hub_audit_dropped_total"] == 0
        metrics.accepted()  # the next scrape sees the change
        async with session.get(f"{base}/metrics") as response:
            assert samples(await response.text())["fleet_hub_connects_accepted_total"] == 2

    serve([Health("crl")], check, metrics)


def test_healthz_is_200_when_every_source_is_ok_and_fresh() -> None:
    """GET /healthz: 200 and status ok, with each source's report."""

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            body = json.loads(await response.text())
        assert body == {
            "status": "ok",
            "revocation": [
                {"name": "registry", "ok": True, "stale": False, "last_error": None,
                 "warning": None, "age_seconds": 2.5, "entries": 3},
                {"name": "crl", "ok": True, "stale": False, "last_error": None,
                 "warning": None, "age_seconds": 2.5, "entries": 3},
            ],
        }

    serve([Health("registry"), Health("crl")], check)


@pytest.mark.parametrize(
    "bad",
    [
        Health("crl", stale=True, warning="CRL number 7 arrived already past its nextUpdate "
               "2026-12-01T00:00:00Z; enforced together with CRL number 6, the last good one"),
        Health("crl", ok=False, last_error="HTTP 500 from http://ca.example/crl.pem"),
        Health("crl", ok=False, last_success=None, last_error="connection refused", entries=0),
    ],
    ids=["stale", "unreachable", "never-loaded"],
)
def test_healthz_is_503_when_any_source_is_down_or_stale(bad: Health) -> None:
    """One stale or failing source makes /healthz 503 "degraded", naming it and its error."""

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 503
            body = json.loads(await response.text())
        assert body["status"] == "degraded"
        assert body["revocation"][0]["ok"] is True
        report = body["revocation"][1]
        assert (report["name"], report["ok"], report["stale"]) == ("crl", bad.ok, bad.stale)
        assert report["last_error"] == bad.last_error
        assert report["warning"] == bad.warning
        assert report["age_seconds"] == (None if bad.last_success is None else 2.5)

    serve([Health("registry"), bad], check)


def test_the_revocation_version_is_in_metrics_and_healthz() -> None:
    """Given the snapshot's version, /metrics has fleet_hub_revocation_version and /healthz a
    "revocation_version", both current at each request (tests wait on it instead of sleeping)."""
    versions = iter([3, 3, 4, 4])

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        for expected in (3, 4):
            async with session.get(f"{base}/metrics") as response:
                text = await response.text()
            assert "# TYPE fleet_hub_revocation_version gauge" in text.splitlines()
            assert samples(text)["fleet_hub_revocation_version"] == expected
            async with session.get(f"{base}/healthz") as response:
                body = json.loads(await response.text())
            assert body["revocation_version"] == expected

    serve([Health("registry")], check, version=lambda: next(versions))


def test_expiring_certificates_and_the_client_ca_bundle_are_in_metrics_and_healthz() -> None:
    """Given the gatekeeper's expiry counts and the bundle's status, /metrics has
    fleet_hub_certificates_expiring{within}, fleet_hub_client_ca_generation, _certificates and
    _refused_total, and /healthz "certificates_expiring" and "client_ca", read at each request."""
    counts = [{"7d": 3, "1d": 1}, {"7d": 2, "1d": 0}]
    status = BundleStatus("/etc/fleet-hub/ca-chain.pem", 2, 3, NOW, 1, None)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
        lines = text.splitlines()
        assert "# TYPE fleet_hub_certificates_expiring gauge" in lines
        assert "# TYPE fleet_hub_client_ca_refused_total counter" in lines
        values = samples(text)
        assert values['fleet_hub_certificates_expiring{within="7d"}'] == 3
        assert values['fleet_hub_certificates_expiring{within="1d"}'] == 1
        assert values["fleet_hub_client_ca_generation"] == 2
        assert values["fleet_hub_client_ca_certificates"] == 3
        assert values["fleet_hub_client_ca_refused_total"] == 1
        counts.pop(0)
        async with session.get(f"{base}/healthz") as response:
            body = json.loads(await response.text())
        assert body["certificates_expiring"] == {"7d": 2, "1d": 0}
        assert body["client_ca"] == {"path": "/etc/fleet-hub/ca-chain.pem", "generation": 2,
                                     "certificates": 3, "loaded_at": NOW, "refused": 1,
                                     "last_error": None}

    serve([Health("registry")], check, expiring=lambda: counts[0], client_ca=lambda: status)


def test_findings_by_check_are_in_metrics_and_healthz() -> None:
    """Given the findings' counts (hub.findings), /metrics has fleet_hub_findings_total{check}
    (DESIGN section 11) and /healthz "findings", read at each request."""
    counts = {"certificate-shared": 2, "weak-key": 0}

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
        assert "# TYPE fleet_hub_findings_total counter" in text.splitlines()
        values = samples(text)
        assert values['fleet_hub_findings_total{check="certificate-shared"}'] == 2
        assert values['fleet_hub_findings_total{check="weak-key"}'] == 0
        counts["weak-key"] = 1
        async with session.get(f"{base}/healthz") as response:
            body = json.loads(await response.text())
        assert body["findings"] == {"certificate-shared": 2, "weak-key": 1}

    serve([Health("registry")], check, findings=lambda: counts)


def test_any_other_path_is_404() -> None:
    """Only /metrics and /healthz exist."""

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        for path in ("/", "/metrics/", "/health", "/favicon.ico"):
            async with session.get(f"{base}{path}") as response:
                assert response.status == 404, path

    serve([], check)


def test_a_port_in_use_is_one_line_naming_the_address() -> None:
    """Binding a port another socket listens on raises MetricsError (a HubError), one line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(BindAddress("127.0.0.1", port), Metrics(), Readings(list))
        with pytest.raises(MetricsError) as caught:
            asyncio.run(server.start())
    message = str(caught.value)
    assert isinstance(caught.value, HubError)
    assert message.startswith(f"cannot listen for metrics on 127.0.0.1:{port}: ")
    assert "\n" not in message
