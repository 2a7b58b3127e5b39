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
    """sign --out and --validity say what happens without them; --pki its default folder."""
    text = _help("provisioning.cli", "sign", columns=columns)
    assert "Folder for <device-id>.pem [default: PKI/certs]" in text
    assert "10m (1m to 36500d) [default: from pki.toml]" in text
    assert "Validity in days: the same as --validity Nd." in text
    assert "default: fleet-pki]" in text


@pytest.mark.parametrize("columns", [80, 200])
def test_fleet_provision_server_cert_help_shows_defaults(columns: int) -> None:
    """server-cert --validity, too."""
    assert "10m (1m to 36500d) [default: from pki.toml]" in _help(
        "provisioning.cli", "server-cert", columns=columns)


@pytest.mark.parametrize("columns", [80, 200])
def test_fleet_hub_serve_help_shows_defaults(columns: int) -> None:
    """serve --bind names the address it listens on with --pki."""
    assert "With --pki [default: 0.0.0.0:8883]" in _help("hub.cli", "serve", columns=columns)


@pytest.mark.parametrize("columns", [80, 200])
def test_fleet_sim_run_help_shows_defaults(columns: int) -> None:
    """run --processes and --fleet-dir say what they default to."""
    text = _help("device_sim.cli", "run", columns=columns)
    assert "Worker processes [default: one per 1,000 devices, up to the CPUs]" in text
    assert "kept for the next run [default: PKI/sim-fleet]" in text


@pytest.mark.parametrize(("module", "name"), [("provisioning.cli", "fleet-provision"),
                                              ("hub.cli", "fleet-hub"),
                                              ("device_sim.cli", "fleet-sim")])
def test_no_arguments_prints_the_help(module: str, name: str) -> None:
    """With no arguments each command still prints its usage on stdout (exit 2): plain help
    no longer prints it while raising NoArgsIsHelpError, so main() must."""
    done = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                          check=False, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 2
    assert f"Usage: {name} [OPTIONS] COMMAND [ARGS]..." in done.stdout
    assert done.stderr == ""


def test_a_command_group_without_a_command_prints_its_help() -> None:
    """fleet-provision group (no subcommand) lists set."""
    done = subprocess.run([sys.executable, "-m", "provisioning.cli", "group"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "Usage: fleet-provision group [OPTIONS] COMMAND [ARGS]..." in done.stdout
    assert "set" in done.stdout.split()
