"""``fleet-sim quickstart``: PKI, hub, enrollment, attacks and revocation in a temp folder."""

from __future__ import annotations

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
    assert {"client-id-spoofing", "revocation-disconnect", "subscribe-all"} <= names
    folder = Path(result.report["enrollment"]["fleet_dir"])
    assert not folder.exists()  # the temporary folder is gone
