"""The defender scenarios in ``fleet-sim run --attacks --hub-metrics`` (an external hub, read
through its /metrics only) and in ``fleet-sim quickstart`` (the lab's hub, read through its
audit store as well): real processes, as a user runs them."""

from __future__ import annotations

from pathlib import Path

from tests.device_sim.conftest import Lab, fleet_sim

DEFENDER = {"cloned-device": "certificate-shared", "client-id-fight": "client-id-conflict",
            "expiring-soon": "certificate-expiring"}


def test_run_reads_the_hubs_counter(lab: Lab, tmp_path: Path) -> None:
    """Each scenario sees its check's counter move on the hub's /metrics."""
    assert lab.hub.metrics_port is not None
    result = fleet_sim("run", "--pki", lab.pki, "--broker", lab.broker, "--devices", "2",
                       "--duration", "0", "--processes", "1", "--quiet", "--attacks",
                       "--fleet-dir", tmp_path / "fleet",
                       "--hub-metrics", f"127.0.0.1:{lab.hub.metrics_port}",
                       report=tmp_path / "r.json")
    assert result.code == 0, result.stdout + result.stderr
    for name, check in DEFENDER.items():
        scenario = result.scenario(name)
        assert scenario["passed"], scenario
        assert f'fleet_hub_findings_total{{check="{check}"}} +' in scenario["observed"]
        assert "+0" not in scenario["observed"]


def test_hub_metrics_needs_attacks(lab: Lab) -> None:
    result = fleet_sim("run", "--pki", lab.pki, "--broker", lab.broker, "--devices", "1",
                       "--hub-metrics", "127.0.0.1:1")
    assert result.code == 2
    assert result.stderr.strip().splitlines()[-1] == "error: needs --attacks (--hub-metrics)"


def test_quickstart_names_the_device_of_each_finding(tmp_path: Path) -> None:
    """The quickstart owns its hub: each finding is read back for its own device."""
    result = fleet_sim("quickstart", "--devices", "4", "--quiet", report=tmp_path / "q.json")
    assert result.code == 0, result.stdout + result.stderr
    for name, check in DEFENDER.items():
        scenario = result.scenario(name)
        assert scenario["passed"], scenario
        device = scenario["expected"].split(f"the hub reports {check} for ")[1].split()[0]
        assert f"the hub reported {check} for {device} (audit: " in scenario["observed"]
