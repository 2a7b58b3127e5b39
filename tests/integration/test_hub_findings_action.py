"""Quarantine and revoked-still-connected on a real hub process (issue 15).

Quarantine: ``[checks] action = "quarantine"``; a certificate in two boxes is closed and
refused (CONNACK 5, audit reason ``quarantined``), still refused after a hub restart, and let
in again once ``fleet-hub quarantine clear`` has run.

revoked-still-connected should never happen (the gatekeeper closes a revoked session at
once), so to see it the kick is made to fail for real: the hub process runs with
``Connection.kick`` replaced by a coroutine that closes nothing (a monkeypatch in the hub
process itself, before ``fleet-hub serve`` starts), and the revoked device's connection stays
open; the findings' pass must report it once the 5 s kick deadline has passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sim.lab.process import HUB_READY, ReadyProcess
from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.mqtt import Client

NOT_AUTHORIZED = 135  # CONNACK 5 as paho reports it (its MQTT 5 reason code)
QUARANTINE = """
[checks]
action = "quarantine"
"""

KICK_CLOSES_NOTHING = """
import sys

from hub.broker.connection import Connection


async def kick(self, reason):  # a kick that fails: nothing is closed, nothing raised
    return None


Connection.kick = kick
from hub.cli import main

sys.exit(main(["serve", "--config", sys.argv[1]]))
"""


class HubWithFailingKick(RunningHub):
    """``fleet-hub serve`` in a process whose kicks close nothing."""

    def __init__(self, config: Path) -> None:
        self.config = config
        ReadyProcess.__init__(self, "fleet-hub", [sys.executable, "-c", KICK_CLOSES_NOTHING,
                                                  str(config)], HUB_READY, cwd=config.parent,
                              timeout=30, stop_timeout=15, max_lines=None)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(tmp_path)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def _client(hub: RunningHub, fleet: Fleet, device: Device, made: list[Client]) -> Client:
    client = Client(hub.port, fleet.ca, device.cert, device.key, device.device_id)
    made.append(client)
    return client


def _quarantine(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", "quarantine", *args, "--config",
                           str(config)], capture_output=True, text=True, check=False)


def _listed(config: Path, timeout: float = 5.0) -> list[dict[str, str]]:
    """`fleet-hub quarantine list --json` once it lists something (written off the loop)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = _quarantine(config, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        entries: list[dict[str, str]] = json.loads(listed.stdout)
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def _connect_until(hub: RunningHub, fleet: Fleet, device: Device, made: list[Client],
                   want: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        client = _client(hub, fleet, device, made)
        code = client.connect()
        client.close()
        if code == want:
            return
        assert time.monotonic() < deadline, f"CONNACK {code}, want {want}"
        time.sleep(0.2)


def test_a_cloned_certificate_is_quarantined_until_cleared_across_a_restart(
        fleet: Fleet, clients: list[Client]) -> None:
    bystander = fleet.device("bystander")
    clone = fleet.device("clone")
    config = fleet.write_config(extra=QUARANTINE)
    checked = subprocess.run([sys.executable, "-m", "hub.cli", "check", "--config", str(config)],
                             capture_output=True, text=True, check=True)
    assert (f"checks: quarantine, warn 30 d, shared window 60 s, RSA >= 2048 bits, curves "
            f"secp256r1, secp384r1, secp521r1, quarantine {config.parent}/quarantine.json\n"
            ) in checked.stdout
    with RunningHub.start(config) as hub:
        assert isinstance(hub, RunningHub)
        other = _client(hub, fleet, bystander, clients)
        assert other.connect() == 0
        boxes = [_client(hub, fleet, clone, clients) for _ in range(3)]
        assert boxes[0].connect() == 0
        assert boxes[1].connect() == 0
        third = boxes[2].connect()  # the second take-over: found, quarantined, closed
        assert third in (0, None)
        assert boxes[2].wait_disconnected()
        [finding] = hub.wait_events("clone", event="finding", reason="certificate-shared")
        evidence = finding["evidence"]
        assert isinstance(evidence, dict)
        assert evidence["action"] == "quarantine"
        refused = _client(hub, fleet, clone, clients)
        assert refused.connect() == NOT_AUTHORIZED
        assert hub.wait_events("clone", event="reject", reason="quarantined")
        assert not other.disconnected.is_set()  # the other devices are left alone
        [entry] = _listed(config)
        assert (entry["serial"], entry["device_id"], entry["check"]) == (
            clone.serial, "clone", "certificate-shared")
    with RunningHub.start(config) as hub:
        assert isinstance(hub, RunningHub)
        # Read back from the file at start.
        assert _client(hub, fleet, clone, clients).connect() == NOT_AUTHORIZED
        cleared = _quarantine(config, "clear", clone.serial)
        assert cleared.returncode == 0, cleared.stderr
        assert cleared.stdout.startswith(f"cleared {clone.serial} (clone, certificate-shared")
        _connect_until(hub, fleet, clone, clients, want=0)  # the hub re-reads the file
    again = _quarantine(config, "clear", clone.serial)
    assert again.returncode == 1
    assert again.stderr.startswith("error: 1 of the serials given is not quarantined in ")


def test_a_revoked_session_whose_kick_failed_is_revoked_still_connected(
        fleet: Fleet, clients: list[Client]) -> None:
    stubborn = fleet.device("stubborn")
    config = fleet.write_config()
    with HubWithFailingKick(config) as hub:
        assert isinstance(hub, RunningHub)
        client = _client(hub, fleet, stubborn, clients)
        assert client.connect() == 0
        with hub.revocation_change():
            fleet.revoke("stubborn")
        assert hub.wait_events("stubborn", event="kick", reason="revoked")
        [row] = hub.wait_events("stubborn", event="finding", reason="revoked-still-connected",
                                timeout=20)
        assert row["serial"] == stubborn.serial
        evidence = row["evidence"]
        assert isinstance(evidence, dict)
        assert evidence["status"] == "revoked"
        assert float(evidence["open_seconds"]) >= evidence["deadline_seconds"] == 5.0
        assert not client.disconnected.is_set()
