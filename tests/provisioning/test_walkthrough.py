"""The provisioning walk-through (``python -m provisioning.walkthrough``) runs end to end."""

from __future__ import annotations

import subprocess
import sys


def test_walkthrough_runs_every_step() -> None:
    """Init, openssl CSRs, sign against a manifest, verify, revoke, CRL, audit: exit 0."""
    done = subprocess.run([sys.executable, "-m", "provisioning.walkthrough"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr  # the commands' own messages go to stderr
    assert "fleet-provision revoke --pki fleet-pki" in out
    assert "revoked 1 certificate(s) of sensor-0002" in out
    assert "audit chain ok" in out
    assert "walkthrough done" in out
