"""``fleet-sim quickstart``: PKI, hub, enrollment, attacks and revocation in a temp folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.device_sim.conftest import fleet_sim


def test_quickstart_passes_and_cleans_up(tmp_path: Path) -> None:
    """A small quickstart exits 0 with every scenario passed and the hub stopped."""
    result = fleet_sim("quickstart", "--devices", "20", report=tmp_path / "q.json")
    assert result.code == 0, result.stdout + result.stderr
    assert result.report is not None
    assert result.report["passed"] is True
    assert result.report["devices"] == 20
    assert result.report["revocation"]["revoked"] == 1
    assert "stopping the hub" in result.stderr
    names = {s["name"] for s in result.report["scenarios"]}
    assert {"client-id-spoofing", "revocation-disconnect", "subscribe-all",
            "handshake-squatters", "oversize-packet", "publish-flood",
            "retained-flood"} <= names
    assert all(s["passed"] for s in result.report["scenarios"]), result.report["scenarios"]
    # quickstart knows the hub's limits (its hub.toml): the flood's delivered share is checked.
    assert result.report["limits"]["source"] == "hub config"
    assert "allowed in" in result.scenario("publish-flood")["observed"]
    folder = Path(result.report["enrollment"]["fleet_dir"])
    assert not folder.exists()  # the temporary folder is gone


def test_quickstart_keep_leaves_the_folder_with_the_hub_audit(tmp_path: Path) -> None:
    """--keep: the PKI, registry and hub audit store stay for inspection, path printed."""
    result = fleet_sim("quickstart", "--devices", "5", "--keep", report=tmp_path / "q.json")
    assert result.code == 0, result.stdout + result.stderr
    assert result.report is not None
    kept = Path(result.report["enrollment"]["fleet_dir"]).parent.parent  # FOLDER/pki/sim-fleet
    try:
        assert f"kept {kept}" in result.stderr
        assert (kept / "hub.toml").is_file()
        assert (kept / "pki" / "registry.db").is_file()
        events = subprocess.run(
            [sys.executable, "-m", "hub.cli", "events", "--config", str(kept / "hub.toml"),
             "--json"], capture_output=True, text=True, timeout=60, check=True)
        kicked = [e for e in json.loads(events.stdout)
                  if e["event"] == "kick"]
        assert len(kicked) == result.report["revocation"]["revoked"]
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_quickstart_with_gateways_fed_by_the_ca(tmp_path: Path) -> None:
    """--gateways 2: the CA service and two hubs that know the fleet only from its feed;
    the devices are spread over both, the attacks run at each, every revoked device is cut
    off by its own gateway; the report names each gateway."""
    result = fleet_sim("quickstart", "--devices", "12", "--gateways", "2", "--keep",
                       report=tmp_path / "q.json")
    assert result.code == 0, result.stdout + result.stderr
    report = result.report
    assert report is not None
    kept = Path(report["enrollment"]["fleet_dir"]).parent.parent
    try:
        assert report["passed"] is True
        rows = report["brokers"]
        assert [r["gateway"] for r in rows] == ["gw-1", "gw-2"]
        assert [(r["devices"], r["connected"]) for r in rows] == [(6, 6), (6, 6)]
        assert sum(r["revoked"] for r in rows) == report["revocation"]["revoked"] == 1
        assert all(r["revoked"] == r["disconnected"] == r["reconnects_refused"] for r in rows)
        names = {s["name"] for s in report["scenarios"]}
        for row in rows:
            assert f"revoked-before-connect@{row['broker']}" in names
            config = (kept / row["gateway"] / "hub.toml").read_text()
            assert "feed = " in config
            assert "registry" not in config
        assert "gw-1 (127.0.0.1:" in result.stdout
        assert "stopping the CA service" in result.stderr
    finally:
        shutil.rmtree(kept, ignore_errors=True)
