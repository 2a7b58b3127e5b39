"""``fleet-sim run`` against a real ``fleet-hub serve``: report, attacks, revocation, exits."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.lab import HubProcess, write_hub_config
from tests.device_sim.conftest import Lab, SimRun, fleet_sim

ATTACKS = ["handshake-squatters", "no-certificate", "foreign-ca", "expired",
           "not-yet-valid", "revoked-before-connect", "client-id-spoofing",
           "publish-other-device", "subscribe-all", "oversize-packet", "publish-flood",
           "retained-flood"]
CONNECT_KEYS = {"count", "failed", "per_second", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                "tcp_p99_ms", "tls_p99_ms", "mqtt_p99_ms"}
REVOCATION_KEYS = {"revoked", "disconnected", "p50_ms", "p99_ms", "max_ms",
                   "reconnects_refused"}


def _run(lab: Lab, tmp_path: Path, *extra: str, devices: int = 8,
         fleet_dir: Path | None = None, broker: str | None = None) -> SimRun:
    return fleet_sim("run", "--pki", lab.pki, "--broker", broker or lab.broker,
                     "--devices", str(devices), "--rate", "200", "--duration", "1",
                     "--publish-interval", "0.3", "--processes", "1", "--quiet",
                     "--fleet-dir", fleet_dir or tmp_path / "fleet", *extra,
                     report=tmp_path / "report.json")


@pytest.fixture(scope="module")
def full_run(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> tuple[SimRun, Path]:
    """One run with every scenario and a revocation; several tests read its report."""
    tmp = tmp_path_factory.mktemp("full-run")
    return _run(lab, tmp, "--attacks", "--revoke", "0.25"), tmp / "fleet"


def test_report_has_the_design_keys(full_run: tuple[SimRun, Path]) -> None:
    """The JSON report carries every key DESIGN section 6 promises, with real values."""
    result, _ = full_run
    report = result.report
    assert report is not None, result.stderr
    assert {"passed", "devices", "scenarios", "connect", "messages", "revocation"} <= set(
        report)
    assert report["devices"] == 8
    assert set(report["connect"]) >= CONNECT_KEYS
    assert set(report["revocation"]) >= REVOCATION_KEYS
    assert {"sent", "received"} <= set(report["messages"])
    for scenario in report["scenarios"]:
        assert set(scenario) == {"name", "expected", "observed", "passed"}
    connect = report["connect"]
    assert connect["count"] == 8
    assert connect["failed"] == 0
    assert 0 < connect["tcp_p99_ms"] <= connect["max_ms"]
    assert 0 < connect["tls_p99_ms"] <= connect["max_ms"]
    assert 0 < connect["mqtt_p99_ms"] <= connect["max_ms"]
    assert connect["p50_ms"] <= connect["p90_ms"] <= connect["p99_ms"] <= connect["max_ms"]
    assert report["messages"]["sent"] > 0
    assert report["messages"]["received"] == report["messages"]["sent"]


def test_attacks_all_refused_by_the_hub(full_run: tuple[SimRun, Path]) -> None:
    """Every attack scenario gets the outcome it expects from the hub; exit code 0."""
    result, _ = full_run
    assert result.code == 0, result.stdout + result.stderr
    assert result.report is not None
    assert result.report["passed"] is True
    names = [s["name"] for s in result.report["scenarios"]]
    assert set(ATTACKS) <= set(names)
    assert all(s["passed"] for s in result.report["scenarios"]), result.report["scenarios"]
    assert "CONNACK 5" in result.scenario("client-id-spoofing")["observed"]
    assert "victim stayed connected" in result.scenario("client-id-spoofing")["observed"]
    assert result.scenario("subscribe-all")["observed"] == "SUBACK 0x80 (refused)"
    assert "PASSED" in result.stdout


def test_squatters_do_not_hold_up_the_fleet(full_run: tuple[SimRun, Path]) -> None:
    """200 one-byte TLS connections from 25 addresses stay open through the ramp (the hub
    gives them no handshake slot and keeps them within each address's budget), and the
    fleet connects as usual."""
    result, _ = full_run
    squat = result.scenario("handshake-squatters")
    assert squat["passed"], squat
    assert squat["observed"].startswith("200 squatters from 25 source addresses, 200 still "
                                         "open when the ramp ended; fleet: 8 connected, "
                                         "0 failed")


def test_revocation_is_measured(full_run: tuple[SimRun, Path]) -> None:
    """A quarter of the live devices are revoked mid-run, cut off, and refused again."""
    result, _ = full_run
    assert result.report is not None
    revocation = result.report["revocation"]
    assert revocation["revoked"] == 2
    assert revocation["disconnected"] == 2
    assert 0 < revocation["p50_ms"] <= revocation["p99_ms"] <= revocation["max_ms"]
    assert revocation["max_ms"] < 5000  # the hub re-reads the registry every 0.5 s
    assert revocation["reconnects_refused"] == 2
    assert result.scenario("revocation-disconnect")["passed"]
    assert result.scenario("revoked-reconnect")["passed"]


def test_second_run_reuses_the_fleet_folder(lab: Lab, full_run: tuple[SimRun, Path],
                                            tmp_path: Path) -> None:
    """Keys and certificates are cached; the revoked devices are replaced by new ids."""
    _, fleet_dir = full_run
    result = _run(lab, tmp_path, fleet_dir=fleet_dir, devices=8)
    assert result.code == 0, result.stdout + result.stderr
    assert result.report is not None
    enrollment = result.report["enrollment"]
    assert (enrollment["cached"], enrollment["retired"], enrollment["enrolled"]) == (6, 2, 2)
    assert sorted(p.name for p in (fleet_dir / "keys").iterdir())[-1] == "sim-00010.key"


def test_exit_code_1_when_a_broker_breaks_an_expectation(lab: Lab, tmp_path: Path) -> None:
    """A hub whose ACL lets devices subscribe to '#': that scenario fails, exit code 1."""
    config = write_hub_config(lab.root, lab.pki, subscribe=("#",), name="hub-open.toml")
    with HubProcess(config) as open_hub:
        result = _run(lab, tmp_path, "--attacks", devices=2,
                      broker=f"127.0.0.1:{open_hub.port}")
    assert result.code == 1, result.stdout + result.stderr
    assert result.report is not None
    assert result.report["passed"] is False
    failed = [s["name"] for s in result.report["scenarios"] if not s["passed"]]
    assert failed == ["subscribe-all"]
    assert result.scenario("subscribe-all")["observed"].startswith("SUBACK 0x01 (granted)")
    assert "FAILED: subscribe-all" in result.stdout


def test_abuse_meets_the_hubs_limits(full_run: tuple[SimRun, Path]) -> None:
    """DESIGN section 5's [limits], seen from the devices: an oversize PUBLISH is closed after
    its fixed header, a flood leaves another device's telemetry whole, at most 100 of 300
    retained messages are kept."""
    result, _ = full_run
    assert result.scenario("oversize-packet")["observed"] == (
        "closed after the fixed header (0 body bytes sent)")
    flood = result.scenario("publish-flood")
    assert flood["passed"], flood
    assert flood["observed"].startswith("atk-00004: 50 of 50 arrived; atk-00003: 5,000 sent")
    retained = result.scenario("retained-flood")
    assert retained["passed"], retained
    assert retained["observed"].startswith("100 retained messages came back (100 topics) of "
                                           "300 published")
    assert result.report is not None
    assert result.report["limits"]["source"] == "DESIGN defaults"
