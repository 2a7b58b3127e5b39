"""``fleet-sim run --rotate`` end to end: a real hub, the CA service started by fleet-sim,
a tiny fleet on one-minute certificates renewing itself twice, one device told not to renew
closed by the hub at its not-after, the superseded certificates revoked after the grace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.lab import HubProcess, make_pki, write_hub_config
from device_sim.lab.policy import policy
from provisioning.authority import Authority
from tests.device_sim.conftest import SimRun, fleet_sim

ROTATION_KEYS = {"renewed", "failed", "messages_lost", "expired_kicked", "superseded_revoked"}


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimRun, Path, Path]:
    root = tmp_path_factory.mktemp("rotate")
    pki = make_pki(root)
    config = write_hub_config(root, pki)
    with HubProcess(config) as hub:
        run = fleet_sim("run", "--pki", pki, "--broker", f"127.0.0.1:{hub.port}",
                        "--devices", "3", "--rate", "50", "--duration", "1",
                        "--publish-interval", "0.2", "--processes", "1", "--quiet",
                        "--fleet-dir", root / "fleet", "--rotate", "--validity", "1m",
                        "--renew-at", "0.2", "--renew-grace", "3s", "--no-renew", "1",
                        "--rounds", "2", report=root / "report.json", timeout=180)
    return run, pki, config


def test_rotation_report_expected_and_observed(rotated: tuple[SimRun, Path, Path]) -> None:
    """The report's rotation object has DESIGN section 10's five keys; every renewing device
    renewed at least twice with no failed attempt and no lost sequence number, the one device
    told not to renew was closed at its not-after and refused when it tried again, every
    replaced certificate was revoked (superseded); exit 0."""
    run, _, _ = rotated
    assert run.report is not None, run.stderr
    assert run.code == 0, run.stdout + run.stderr
    rotation, expected = run.report["rotation"], run.report["rotation_expected"]
    assert set(rotation) == ROTATION_KEYS
    assert set(expected) == ROTATION_KEYS
    assert rotation["renewed"] >= 4 == expected["renewed"]
    assert rotation["failed"] == 0
    assert rotation["messages_lost"] == 0
    assert rotation["expired_kicked"] == 1 == expected["expired_kicked"]
    assert rotation["superseded_revoked"] == rotation["renewed"] == expected[
        "superseded_revoked"]
    for name in ("rotation-renewed", "rotation-failed", "rotation-messages-lost",
                 "rotation-expired-kicked", "rotation-superseded-revoked", "fleet-steady"):
        assert run.scenario(name)["passed"], run.scenario(name)
    kicked = run.scenario("rotation-expired-kicked")["observed"]
    assert "1 of 1 closed at not-after, 1 refused when trying again" in kicked
    assert run.report["messages"]["lost"] == 0
    assert run.report["messages"]["sent"] > 100


def test_registry_and_hub_audit_show_the_renewals_and_the_expiry(
        rotated: tuple[SimRun, Path, Path]) -> None:
    """At the CA: each renewing device has a chain of certificates, all but the newest
    revoked with reason superseded; the device told not to renew has its one certificate,
    still active (it expired; nobody revoked it), and the hub's audit store has exactly one
    kick, reason expired, for it. The PKI's policy is as before the run."""
    run, pki, config = rotated
    assert run.report is not None
    with Authority(pki) as authority:
        rows = [r for r in authority.registry.certificates() if r.device_id.startswith("sim-")]
    by_device: dict[str, list[str]] = {}
    for row in rows:
        by_device.setdefault(row.device_id, []).append(
            f"{row.status}/{row.reason}" if row.status == "revoked" else row.status)
    histories = sorted(by_device.values(), key=len)
    assert histories[0] == ["active"]  # the one told not to renew
    told = next(d for d, h in by_device.items() if h == ["active"])
    events = subprocess.run([sys.executable, "-m", "hub.cli", "events", "--config",
                             str(config), "--json"], capture_output=True, text=True,
                            check=True, timeout=60)
    kicks = [e for e in json.loads(events.stdout) if e["event"] == "kick"]
    assert [(k["device_id"], k["reason"]) for k in kicks] == [(told, "expired")]
    for history in histories[1:]:
        assert len(history) >= 3
        assert history.count("active") == 1
        assert history.count("revoked/superseded") == len(history) - 1
    assert policy(pki)["validity"] == "365d"
    assert policy(pki)["renew_grace"] == "1h"
