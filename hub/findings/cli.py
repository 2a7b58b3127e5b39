"""``fleet-hub quarantine list|clear``: the certificates refused here by ``action = "quarantine"``.

A quarantine holds until an operator clears it: after finding out why a check fired (a
cloned certificate: revoke it at the CA and issue the device a new one; see docs/gateway.md),
``fleet-hub quarantine clear SERIAL`` removes the serial from the file, and a running hub lets
the certificate in again within a second (it re-reads the file when it changes).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from fleetcli import new_app
from hub.config import HubConfig, load_config
from hub.errors import ConfigError, QuarantineError
from hub.findings import quarantine
from provisioning.serial import parse_serial

app = new_app("Certificates quarantined at this gateway by the audit checks.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", envvar="FLEET_HUB_CONFIG",
                                                help="hub.toml")]
PkiOpt = Annotated[Path | None, typer.Option("--pki", help="A hub serving with --pki DIR: "
                                             "DIR/hub-quarantine.json.")]


def _file(config: Path | None, pki: Path | None) -> Path:
    if config is not None and pki is not None:
        raise ConfigError(None, "--config", "give --config or --pki, not both")
    if config is None and pki is None:
        raise ConfigError(None, "--config", "missing: give --config hub.toml or --pki DIR")
    loaded = load_config(config) if config is not None else HubConfig.from_pki(pki or Path())
    path = loaded.checks.quarantine_file
    assert path is not None  # noqa: S101 - load_config always sets it
    return path


def _serial(text: str) -> int:
    try:
        return parse_serial(text)
    except ValueError:
        raise ConfigError(None, "SERIAL", f"{text!r} is not a hexadecimal serial (as "
                          "`fleet-hub quarantine list` prints it)") from None


@app.command("list")
def list_(config: ConfigOpt = None, pki: PkiOpt = None,
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the quarantined certificates (serial, device, check, since); exit 0.

    Example: fleet-hub quarantine list --config hub.toml --json
    """
    entries = quarantine.read(_file(config, pki))
    rows = [entries[s] for s in sorted(entries)]
    if as_json:
        sys.stdout.write(json.dumps([asdict(e) for e in rows], indent=2) + "\n")
        return
    for e in rows:
        sys.stdout.write(f"{e.serial:42} {e.device_id:24} {e.check:26} {e.since}\n")


@app.command()
def clear(serials: Annotated[list[str], typer.Argument(metavar="SERIAL...",
                                                       help="hex, as `list` prints it")],
          config: ConfigOpt = None, pki: PkiOpt = None) -> None:
    """Let quarantined certificates in again; exit 1 if a serial is not quarantined.

    Example: fleet-hub quarantine clear 5f3a...c1 --config hub.toml
    """
    path = _file(config, pki)
    wanted = [_serial(text) for text in serials]
    released = quarantine.clear(path, wanted)
    for e in released:
        sys.stdout.write(f"cleared {e.serial} ({e.device_id}, {e.check} since {e.since})\n")
    missing = len(set(wanted)) - len(released)
    if missing:
        raise QuarantineError(
            f"{missing} of the serials given {'is' if missing == 1 else 'are'} not quarantined "
            f"in {path}")
