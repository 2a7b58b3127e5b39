"""The audit chain of a real running hub: what `fleet-hub serve` writes verifies, follows and
prunes; an edit to its store is named."""

from __future__ import annotations

import json
import queue
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hub.config import load_config
from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED = 0
TIMEOUT = 20.0


def fleet_hub(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=60)


def test_the_hub_s_own_records_verify(fleet: Fleet, hub: RunningHub,
                                      connect: Callable[..., Client]) -> None:
    """Accepts and a refusal written by the hub process: `events verify` exit 0."""
    assert connect(fleet.device("chain-1")).connect() == ACCEPTED
    assert connect(None, "nobody").connect() is None
    rows = hub.wait_events(until=lambda r: {"accept", "reject"} <= {x["event"] for x in r})
    done = fleet_hub("events", "verify", "--config", hub.config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("audit chain ok: ")
    assert int(done.stdout.split()[3]) >= len(rows)  # the hub may have written more since


def test_follow_streams_what_the_hub_writes(fleet: Fleet, hub: RunningHub,
                                            connect: Callable[..., Client]) -> None:
    """A shipper on `events --follow --json` gets the accept of a device that connects now."""
    device = fleet.device("chain-follow")
    proc = subprocess.Popen([sys.executable, "-m", "hub.cli", "events", "--config",
                             str(hub.config), "--follow", "--json", "--device", "chain-follow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)

    assert proc.stdout is not None
    assert proc.stderr is not None
    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        assert proc.stderr.readline().startswith("fleet-hub events: following")
        assert connect(device).connect() == ACCEPTED
        line = json.loads(lines.get(timeout=TIMEOUT))
        assert (line["event"], line["device_id"], line["serial"]) == (
            "accept", "chain-follow", device.serial)
        assert len(line["hash"]) == 64
        anchor = f"{line['id']}:{line['hash']}"
        done = fleet_hub("events", "verify", "--config", hub.config, "--anchor", anchor)
        assert done.returncode == 0, done.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=TIMEOUT) == 0
        reader.join(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


def test_prune_on_a_live_hub_then_an_edit_is_named(fleet: Fleet, hub: RunningHub,
                                                   connect: Callable[..., Client]) -> None:
    """Prune everything so far while the hub runs, connect again (the hub writes on from
    the checkpoint), verify ok; then edit one of the hub's records: exit 1, named."""
    done = fleet_hub("events", "prune", "--config", hub.config, "--before", "2999-01-01")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned ")
    assert connect(fleet.device("chain-2")).connect() == ACCEPTED
    [row] = hub.wait_events("chain-2", event="accept")
    done = fleet_hub("events", "verify", "--config", hub.config)
    assert done.returncode == 0, done.stderr
    assert "1 signed checkpoint(s)" in done.stdout
    store = load_config(hub.config).audit.path
    with sqlite3.connect(store) as conn:
        [(record_id,)] = conn.execute(
            "SELECT id FROM events WHERE device_id = 'chain-2' AND event = 'accept'").fetchall()
        conn.execute("UPDATE events SET peer = '203.0.113.7:1' WHERE id = ?", (record_id,))
    conn.close()
    broken = fleet_hub("events", "verify", "--config", hub.config)
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"error: audit chain broken at record #{record_id} "
                                    f"({row['time']}): altered")


def test_a_hub_upgrading_a_version_1_store_seals_it_and_writes_on(
        fleet: Fleet, tmp_path: Path, connect: Callable[..., Client]) -> None:
    """A store as the hub before the chain left it: a new hub opens it, seals the old rows
    first, then its own accept; verify ok and says how many were sealed on upgrade."""
    store = tmp_path / "old-audit.db"
    conn = sqlite3.connect(store, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
                 "event TEXT NOT NULL, device_id TEXT, serial TEXT, peer TEXT, reason TEXT)")
    conn.executemany("INSERT INTO events (time, event, device_id, serial, peer, reason) "
                     "VALUES (?, 'reject', ?, NULL, '127.0.0.1:1', 'untrusted')",
                     [(1764000000.5 + i, f"old-{i}") for i in range(250)])
    conn.execute("PRAGMA user_version=1")
    conn.close()
    config = fleet.write_config("hub-upgrade.toml", extra=f'[audit]\npath = "{store}"\n')
    running = RunningHub.start(config)
    try:
        assert connect(fleet.device("chain-upgrade"), port=running.port).connect() == ACCEPTED
        [row] = running.wait_events("chain-upgrade", event="accept")
        done = fleet_hub("events", "verify", "--config", config)
        assert done.returncode == 0, done.stderr
        assert "250 records written by a version 1 hub were sealed on upgrade" in done.stdout
        as_json = json.loads(fleet_hub("events", "verify", "--config", config,
                                       "--json").stdout)
        assert as_json["migrated"]["records"] == 250
        assert as_json["records"] >= 251
    finally:
        assert running.stop() == 0, "".join(running.log)
    assert row["device_id"] == "chain-upgrade"
