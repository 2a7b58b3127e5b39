"""The run's report: JSON (DESIGN section 6 keys, and more) and rich tables for the terminal."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.table import Table

from device_sim import squatters
from device_sim.abuse import Limits
from device_sim.brokers import scenario_name
from device_sim.scenarios import ScenarioResult
from device_sim.worker import DeviceRecord, WorkerResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of *values*; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass(frozen=True)
class RotationFacts:
    """What the parent of a ``--rotate`` run knows beyond the device records."""

    rounds: int  # renewals each renewing device had to complete
    no_renew: int  # devices told not to renew
    superseded: int  # certificates the renewals replaced (the CA answered)
    superseded_revoked: int  # of those, revoked with reason superseded at the CA
    validity: str
    renew_at: float
    renew_grace: str


@dataclass
class RunFacts:
    """What the parent gathered; :func:`build` turns it into the report."""

    devices: int
    broker: str
    workers: list[WorkerResult]
    ramp_start: float
    scenarios: list[ScenarioResult] = field(default_factory=list)
    revoked_at: dict[str, float] = field(default_factory=dict)
    revocation_timeout: float = 10.0
    revocation_asked: bool = False
    enrollment: dict[str, Any] = field(default_factory=dict)
    parent_cpu_s: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    squats: dict[str, squatters.SquatFacts] = field(default_factory=dict)  # per broker
    limits: Limits | None = None  # what the abuse scenarios expected (with attacks)
    rotation: RotationFacts | None = None  # with --rotate


def _peak(records: list[DeviceRecord]) -> int:
    edges: list[tuple[float, int]] = []
    for r in records:
        if r.connected_at is not None:
            edges.append((r.connected_at, 1))
            if r.disconnected_at is not None:
                edges.append((r.disconnected_at, -1))
    level = peak = 0
    for _, step in sorted(edges):
        level += step
        peak = max(peak, level)
    return peak


def _connect(records: list[DeviceRecord], ramp_start: float) -> dict[str, Any]:
    ok = [r for r in records if r.connected_at is not None]
    totals = [r.tcp_s + r.tls_s + r.mqtt_s for r in ok
              if r.tcp_s is not None and r.tls_s is not None and r.mqtt_s is not None]
    span = max((r.connected_at for r in ok if r.connected_at is not None), default=ramp_start)
    out: dict[str, Any] = {
        "count": len(ok), "failed": len(records) - len(ok),
        "per_second": round(len(ok) / (span - ramp_start), 1) if span > ramp_start else None,
        "p50_ms": _ms(percentile(totals, 0.5)), "p90_ms": _ms(percentile(totals, 0.9)),
        "p99_ms": _ms(percentile(totals, 0.99)), "max_ms": _ms(max(totals, default=None)),
    }
    for phase in ("tcp", "tls", "mqtt"):
        values = [getattr(r, f"{phase}_s") for r in ok if getattr(r, f"{phase}_s") is not None]
        for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            out[f"{phase}_{label}_ms"] = _ms(percentile(values, q))
        out[f"{phase}_max_ms"] = _ms(max(values, default=None))
    out["peak_concurrent"] = _peak(records)
    out["ramp_s"] = round(span - ramp_start, 3) if span > ramp_start else 0.0
    return out


def _fleet_scenarios(records: list[DeviceRecord], facts: RunFacts,
                     messages: dict[str, int]) -> list[ScenarioResult]:
    n = len(records)
    failed = [r for r in records if r.connected_at is None]
    observed = f"{n - len(failed)} connected, {len(failed)} failed"
    if failed:
        (detail, count), = Counter(r.detail or r.outcome for r in failed).most_common(1)
        observed += f" (most often: {detail} x{count})"
    unexpected = [r for r in records if r.unexpected]
    return [
        ScenarioResult("fleet-connect", f"{n} devices connect (CONNACK 0) and subscribe",
                       observed, not failed and n == facts.devices),
        ScenarioResult("fleet-steady", "no device is disconnected unless revoked",
                       f"{len(unexpected)} unexpected disconnects", not unexpected),
        ScenarioResult("telemetry", "every telemetry message comes back (QoS 1, own topic)",
                       f"{messages['sent']} sent, {messages['acked']} acknowledged, "
                       f"{messages['received']} received, {messages['lost']} lost",
                       messages["lost"] == 0),
    ]


def _revocation(records: list[DeviceRecord], facts: RunFacts,
                ) -> tuple[dict[str, Any], list[ScenarioResult]]:
    revoked = [r for r in records if r.revoked and r.device_id in facts.revoked_at]
    latencies = [r.lost_at - facts.revoked_at[r.device_id] for r in revoked
                 if r.lost_at is not None]
    attempted = [r for r in revoked if r.reconnect_refused is not None]
    refused = [r for r in attempted if r.reconnect_refused]
    figures = {
        "revoked": len(revoked), "disconnected": len(latencies),
        "p50_ms": _ms(percentile(latencies, 0.5)), "p99_ms": _ms(percentile(latencies, 0.99)),
        "max_ms": _ms(max(latencies, default=None)),
        "reconnects_attempted": len(attempted), "reconnects_refused": len(refused),
    }
    if not facts.revocation_asked:
        return figures, []
    quick = [t for t in latencies if t <= facts.revocation_timeout]
    observed = f"{len(latencies)} of {len(revoked)} disconnected"
    if latencies:
        observed += (f" (p50 {figures['p50_ms']:.0f} ms, max {figures['max_ms']:.0f} ms)")
    stayed = [r.device_id for r in revoked if r.lost_at is None]
    if stayed:
        observed += f"; still connected: {', '.join(stayed[:3])}"
        observed += f" and {len(stayed) - 3} more" if len(stayed) > 3 else ""
    accepted = [r for r in attempted if not r.reconnect_refused]
    again = f"{len(refused)} of {len(revoked)} refused"
    if accepted:
        again += f" (e.g. {accepted[0].reconnect})"
    elif revoked and not attempted:
        again += " (no reconnect was attempted)"
    return figures, [
        ScenarioResult("revocation-disconnect",
                       f"each of the {len(revoked)} revoked live devices is disconnected "
                       f"within {facts.revocation_timeout:g} s",
                       observed, bool(revoked) and len(quick) == len(revoked)),
        ScenarioResult("revoked-reconnect", "every reconnect of a revoked device is refused",
                       again, bool(revoked) and len(refused) == len(revoked)),
    ]


def build(facts: RunFacts) -> dict[str, Any]:
    records = [r for w in facts.workers for r in w.records]
    sent = sum(r.sent for r in records)
    received = sum(r.received for r in records)
    acked = sum(r.acked for r in records)
    # A revoked device, or one told not to renew, loses its session and what was in flight.
    lost = sum(r.lost if r.lost is not None else max(0, r.sent - r.received)
               for r in records if not r.revoked and not r.no_renew)
    messages = {"sent": sent, "acked": acked, "received": received, "lost": lost}
    connect = _connect(records, facts.ramp_start)
    revocation, revocation_scenarios = _revocation(records, facts)
    scenarios = _fleet_scenarios(records, facts, messages)
    brokers = facts.broker.split(",")
    several = len(brokers) > 1
    for broker, squat in facts.squats.items():
        mine = [r for r in records if r.broker == broker] if several else records
        found = squatters.scenario(squat, facts.devices if not several else len(mine),
                                   connect if not several else _connect(mine, facts.ramp_start))
        scenarios.append(replace(found, name=scenario_name(found.name, broker, several)))
    scenarios += [*facts.scenarios, *revocation_scenarios]
    rotation = expected = None
    if facts.rotation is not None:
        rotation, expected, rotation_scenarios = _rotation(records, facts.rotation)
        scenarios += rotation_scenarios
    scenarios += [ScenarioResult("simulator", "no simulator errors", e, passed=False)
                  for e in facts.errors + [e for w in facts.workers for e in w.errors]]
    workers_cpu = sum(w.cpu_total_s + w.boot_s for w in facts.workers)
    ramp_cpu = sum(w.cpu_ramp_s for w in facts.workers)
    cpu = {
        "simulator_s": round(workers_cpu + facts.parent_cpu_s, 3),
        "workers_s": round(workers_cpu, 3), "parent_s": round(facts.parent_cpu_s, 3),
        "connect_phase_s": round(ramp_cpu, 3),
        "device_boot_s": round(sum(w.boot_s for w in facts.workers), 3),
        "per_connect_ms": round(ramp_cpu / connect["count"] * 1000, 3)
        if connect["count"] else None,
    }
    report: dict[str, Any] = {
        "passed": all(s.passed for s in scenarios),
        "devices": facts.devices,
        "broker": facts.broker,
        "brokers": _per_broker(brokers, records, facts.revoked_at),
        "scenarios": [s.to_json() for s in scenarios],
        "connect": connect,
        "messages": messages,
        "revocation": revocation,
        "cpu": cpu,
        "enrollment": facts.enrollment,
        "processes": len(facts.workers),
        "wall_s": round(facts.wall_s, 3),
    }
    if facts.limits is not None:
        report["limits"] = facts.limits.to_json()
    if rotation is not None:
        report["rotation"] = rotation
        report["rotation_expected"] = expected
        report["rotation_rate"] = _renewal_rate([t for r in records for t in r.renewed_at])
    return report


def _renewal_rate(times: list[float], window: float = 10.0) -> dict[str, float | None]:
    """Renewals per second from the first to the last (sustained), and the busiest
    *window* seconds."""
    if not times:
        return {"per_second": None, "peak_per_second": None, "span_s": 0.0}
    times.sort()
    span = times[-1] - times[0]
    peak, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        peak = max(peak, end - start + 1)
    return {"per_second": round(len(times) / span, 2) if span > 0 else None,
            "peak_per_second": round(peak / window, 2), "span_s": round(span, 1)}


def _rotation(records: list[DeviceRecord], facts: RotationFacts,
              ) -> tuple[dict[str, int], dict[str, int], list[ScenarioResult]]:
    """DESIGN section 10's ``rotation`` object (observed), the same keys expected (renewed:
    the least that passes), and one scenario per key."""
    renewing = [r for r in records if not r.no_renew and not r.revoked]
    told = [r for r in records if r.no_renew]
    sent = sum(r.sent for r in renewing)
    observed = {
        "renewed": sum(r.renewed for r in records),
        "failed": sum(r.renew_failed for r in records),
        "messages_lost": sum(r.lost or 0 for r in renewing),
        "expired_kicked": sum(1 for r in told if r.expired_kick),
        "superseded_revoked": facts.superseded_revoked,
    }
    expected = {"renewed": facts.rounds * len(renewing), "failed": 0, "messages_lost": 0,
                "expired_kicked": len(told), "superseded_revoked": facts.superseded}
    fewest = min((r.renewed for r in renewing), default=0)
    errors = Counter(r.renew_error for r in records if r.renew_failed and r.renew_error)
    failed = f"{observed['failed']} failed attempts"
    if errors:
        (error, count), = errors.most_common(1)
        failed += f" (most often: {error} x{count})"
    stayed = [r.device_id for r in told if not r.expired_kick]
    let_in = [r for r in told if r.expired_kick and not r.reconnect_refused]
    kicked = (f"{observed['expired_kicked']} of {len(told)} closed at not-after, "
              f"{len(told) - len(stayed) - len(let_in)} refused when trying again")
    if stayed:
        kicked += f"; not closed: {', '.join(stayed[:3])}"
    if let_in:
        kicked += f"; e.g. {let_in[0].device_id}: {let_in[0].reconnect}"
    elif told and not stayed:
        kicked += f" ({told[0].reconnect})"
    scenarios = [
        ScenarioResult("rotation-renewed",
                       f"each of the {len(renewing)} renewing devices renews at least "
                       f"{facts.rounds} times ({facts.validity} certificates, at "
                       f"{facts.renew_at:g} of their life)",
                       f"{observed['renewed']} renewals, fewest per device {fewest}",
                       bool(renewing) and fewest >= facts.rounds),
        ScenarioResult("rotation-failed", "no renewal attempt fails", failed,
                       observed["failed"] == 0),
        ScenarioResult("rotation-messages-lost",
                       "every QoS 1 sequence number published across the switches comes back",
                       f"{observed['messages_lost']} of {sent} lost",
                       observed["messages_lost"] == 0),
        ScenarioResult("rotation-expired-kicked",
                       f"the {len(told)} devices told not to renew are closed by the broker "
                       "at their certificate's not-after and refused when they try again",
                       kicked, observed["expired_kicked"] == len(told) and not let_in),
        ScenarioResult("rotation-superseded-revoked",
                       f"each of the {facts.superseded} replaced certificates is revoked "
                       f"(superseded) after renew_grace {facts.renew_grace}",
                       f"{facts.superseded_revoked} of {facts.superseded} revoked",
                       facts.superseded_revoked == facts.superseded),
    ]
    return observed, expected, scenarios


def _per_broker(brokers: list[str], records: list[DeviceRecord],
                revoked_at: dict[str, float]) -> list[dict[str, Any]]:
    """The ``brokers`` list: for each broker its devices, connects and revocations."""
    rows: dict[str, dict[str, Any]] = {
        b: {"broker": b, "devices": 0, "connected": 0, "failed": 0,
            "unexpected_disconnects": 0, "revoked": 0, "disconnected": 0,
            "revocation_p99_ms": None, "reconnects_refused": 0} for b in brokers}
    latencies: dict[str, list[float]] = {b: [] for b in brokers}
    for r in records:
        row = rows.get(r.broker) if len(brokers) > 1 else rows[brokers[0]]
        if row is None:
            continue
        row["devices"] += 1
        row["connected" if r.connected_at is not None else "failed"] += 1
        row["unexpected_disconnects"] += int(r.unexpected)
        if r.revoked and r.device_id in revoked_at:
            row["revoked"] += 1
            row["reconnects_refused"] += int(bool(r.reconnect_refused))
            if r.lost_at is not None:
                row["disconnected"] += 1
                latencies[row["broker"]].append(r.lost_at - revoked_at[r.device_id])
    for broker, values in latencies.items():
        rows[broker]["revocation_p99_ms"] = _ms(percentile(values, 0.99))
    return list(rows.values())


def _broker_name(row: dict[str, Any]) -> str:
    return f"{row['gateway']} ({row['broker']})" if "gateway" in row else str(row["broker"])


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value}{unit}"


def _rotation_line(rotation: dict[str, int] | None) -> str:
    if rotation is None:
        return ""
    return (f"rotation: {rotation['renewed']} renewed, {rotation['failed']} failed, "
            f"{rotation['messages_lost']} messages lost, {rotation['expired_kicked']} kicked "
            f"at expiry, {rotation['superseded_revoked']} superseded revoked\n")


def render(report: dict[str, Any], console: Console) -> None:
    """The scenario table and the figures, as the terminal shows them."""
    table = Table(title=f"fleet-sim: {report['devices']} devices against {report['broker']}",
                  title_justify="left")
    table.add_column("scenario", style="bold")
    table.add_column("expected")
    table.add_column("observed")
    table.add_column("", justify="center")
    for s in report["scenarios"]:
        table.add_row(s["name"], s["expected"], s["observed"],
                      "[green]pass[/]" if s["passed"] else "[red]FAIL[/]")
    console.print(table)
    c, m, r, cpu = report["connect"], report["messages"], report["revocation"], report["cpu"]
    figures = Table(show_header=True, title="connect latency (ms)", title_justify="left")
    for column in ("phase", "p50", "p90", "p99", "max"):
        figures.add_column(column, justify="right" if column != "phase" else "left")
    figures.add_row("total", _fmt(c["p50_ms"]), _fmt(c["p90_ms"]), _fmt(c["p99_ms"]),
                    _fmt(c["max_ms"]))
    for phase, label in (("tcp", "TCP connect"), ("tls", "TLS handshake"),
                         ("mqtt", "CONNECT→CONNACK")):
        figures.add_row(label, *(_fmt(c[f"{phase}_{q}_ms"]) for q in ("p50", "p90", "p99",
                                                                      "max")))
    console.print(figures)
    console.print(
        f"connects: {c['count']} ok, {c['failed']} failed, {_fmt(c['per_second'])}/s, "
        f"peak {c['peak_concurrent']} concurrent\n"
        f"messages: {m['sent']} sent, {m['acked']} acknowledged, {m['received']} received, "
        f"{m['lost']} lost\n"
        f"revocation: {r['revoked']} revoked, {r['disconnected']} disconnected "
        f"(p50 {_fmt(r['p50_ms'], ' ms')}, p99 {_fmt(r['p99_ms'], ' ms')}, "
        f"max {_fmt(r['max_ms'], ' ms')}), reconnects refused {r['reconnects_refused']}"
        f"/{r['reconnects_attempted']}\n"
        + "".join(
            f"  {_broker_name(b)}: {b['connected']}/{b['devices']} connected, {b['revoked']} "
            f"revoked, {b['disconnected']} disconnected (p99 "
            f"{_fmt(b['revocation_p99_ms'], ' ms')}), {b['reconnects_refused']} reconnects "
            f"refused, {b['unexpected_disconnects']} dropped\n"
            for b in report.get("brokers", []) if len(report.get("brokers", [])) > 1)
        + _rotation_line(report.get("rotation"))
        + f"simulator CPU: {cpu['simulator_s']:.2f} s ({_fmt(cpu['per_connect_ms'], ' ms')} "
        f"per connect during the ramp) in {report['processes']} processes",
        highlight=False)
    verdict = "[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]"
    failed = [s["name"] for s in report["scenarios"] if not s["passed"]]
    console.print(f"{verdict}" + (f": {', '.join(failed)}" if failed else ""))
