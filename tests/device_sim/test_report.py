"""The report's arithmetic: percentiles, the concurrency peak, pass/fail, JSON keys."""

from __future__ import annotations

import pytest

from device_sim.report import RunFacts, build, percentile
from device_sim.scenarios import ScenarioResult
from device_sim.worker import DeviceRecord, WorkerResult


@pytest.mark.parametrize(("q", "want"), [(0.5, 50.0), (0.9, 90.0), (0.99, 99.0), (1.0, 100.0)])
def test_nearest_rank_percentile(q: float, want: float) -> None:
    """Nearest rank over 1..100: p50 is 50, p99 is 99."""
    assert percentile([float(v) for v in range(100, 0, -1)], q) == want


def test_percentile_of_nothing_is_none() -> None:
    """No samples: no figure (null in JSON), never zero."""
    assert percentile([], 0.5) is None


def _record(name: str, start: float, end: float | None, **kw: object) -> DeviceRecord:
    return DeviceRecord(name, "accepted", "CONNACK 0", 0.001, 0.004, 0.002, start, end, **kw)  # type: ignore[arg-type]


def test_peak_and_verdict() -> None:
    """Peak concurrency is computed from the connect/disconnect times; any failed scenario
    fails the run; revocation latency is measured from each device's own revocation."""
    records = [_record("a", 1.0, 5.0), _record("b", 2.0, 3.0), _record("c", 2.5, 6.0),
               _record("d", 4.0, 4.5, lost_at=4.5, revoked=True, reconnect="refused: x",
                       reconnect_refused=True)]
    worker = WorkerResult(0, records, 1.0, 0.5, 0.0, 4.0)
    facts = RunFacts(4, "127.0.0.1:1", [worker], ramp_start=0.5,
                     scenarios=[ScenarioResult("x", "e", "o", passed=False)],
                     revoked_at={"d": 4.25}, revocation_asked=True)
    report = build(facts)
    assert report["connect"]["peak_concurrent"] == 3
    assert report["connect"]["count"] == 4
    assert report["connect"]["p50_ms"] == 7.0
    assert report["revocation"]["p50_ms"] == 250.0
    assert report["revocation"]["reconnects_refused"] == 1
    assert report["passed"] is False
    names = [s["name"] for s in report["scenarios"]]
    assert names == ["fleet-connect", "fleet-steady", "telemetry", "x",
                     "revocation-disconnect", "revoked-reconnect"]
