"""``--help`` of the three commands keeps every ``[default: ...]`` text (issue 11 defect 11:
rich markup took it for a style tag and dropped it).

The hub's and the simulator's help are checked here too: this package owns the fix across
the three CLIs, and each is run as its own process, the way an operator sees it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _help(module: str, *args: str, columns: int) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    done = subprocess.run([sys.executable, "-m", module, *args, "--help"], capture_output=True,
                          text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # the text as read, whatever the wrapping


@pytest.mark.parametrize("columns", [80, 200])
def test_fleet_provision_sign_help_shows_defaults(columns: int) -> None:
    """sign --out and --days say what happens without them; --pki its default folder."""
    text = _help("provisioning.cli", "sign", columns=columns)
    assert "Folder for <device-id>.pem [default: PKI/certs]" in text
    assert "Validity in days [default: from pki.toml]" in text
    assert "default: fleet-pki]" in text


@pytest.mark.parametrize("columns", [80, 200])
def test_fleet_provision_server_cert_help_shows_defaults(columns: int) -> None:
    """server-cert --days, too."""
    assert "Validity in days [default: from pki.toml]" in _help(
        "provisioning.cli", "server-cert", columns=columns)


@pytest.mark.parametrize("columns", [80, 200])
def test_fleet_hub_serve_help_shows_defaults(columns: int) -> None:
    """serve --bind names the address it listens on with --pki."""
    assert "With --pki [default: 0.0.0.0:8883]" in _help("hub.cli", "serve", columns=columns)

