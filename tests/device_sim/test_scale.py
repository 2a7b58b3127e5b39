"""5,000 devices against the hub at once (``pytest -m scale``; off by default).

What is asserted is the simulator's part: every device connected at the same time, no
connect failed, the attacks refused and the revocation measured at that load. The run's own
verdict is not: at this size fleet-hub delivers only a fraction of the telemetry echoes
(amqtt matches each message against every subscription), see docs/simulator.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.device_sim.conftest import Lab, fleet_sim

pytestmark = pytest.mark.scale
ATTACKS = {"no-certificate", "foreign-ca", "expired", "not-yet-valid", "revoked-before-connect",
           "client-id-spoofing", "publish-other-device", "subscribe-all"}


@pytest.mark.timeout(1200)
def test_five_thousand_devices_at_once(lab: Lab, tmp_path: Path) -> None:
    """All 5,000 devices are connected at once; attacks and revocation hold at that load."""
    result = fleet_sim("run", "--pki", lab.pki, "--broker", lab.broker, "--devices", "5000",
                       "--rate", "1000", "--duration", "10", "--publish-interval", "20",
                       "--processes", "2", "--connect-timeout", "60", "--attacks",
                       "--revoke", "0.05", "--quiet", "--fleet-dir", tmp_path / "fleet",
                       report=tmp_path / "report.json", timeout=1200)
    assert result.report is not None, result.stderr
    connect = result.report["connect"]
    assert (connect["count"], connect["failed"]) == (5000, 0)
    assert connect["peak_concurrent"] == 5000
    for name in ATTACKS:
        assert result.scenario(name)["passed"], result.scenario(name)
    revocation = result.report["revocation"]
    assert revocation["revoked"] == 250
    assert revocation["disconnected"] == 250
    assert revocation["reconnects_refused"] == 250
