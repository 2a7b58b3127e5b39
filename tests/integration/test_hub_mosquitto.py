"""Debian's mosquitto clients as an outside peer: what a gateway's real clients see."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.fleet import Device, Fleet, RunningHub

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None,
                                reason="mosquitto-clients missing: ./dev test installs it")
REFRESH = 0.5


def _args(hub: RunningHub, fleet: Fleet, device: Device | None, client_id: str) -> list[str]:
    args = ["-h", "127.0.0.1", "-p", str(hub.port), "--cafile", str(fleet.ca), "-i", client_id,
            "--insecure"]  # the hub certificate names 127.0.0.1; --insecure skips the name only
    if device is not None:
        args += ["--cert", str(device.cert), "--key", str(device.key)]
    return args


def _sub_command(hub: RunningHub, fleet: Fleet, device: Device, client_id: str,
                 *topics: str) -> list[str]:
    """mosquitto_sub line-buffered (stdbuf), so the test can wait for its SUBACK line."""
    args = ["stdbuf", "-oL", "mosquitto_sub", *_args(hub, fleet, device, client_id), "-d"]
    for topic in topics:
        args += ["-t", topic]
    return args


def _pub(hub: RunningHub, fleet: Fleet, device: Device | None, client_id: str, topic: str,
         message: str = "hello") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mosquitto_pub", *_args(hub, fleet, device, client_id), "-t", topic,
                           "-m", message, "-q", "1"], capture_output=True, text=True,
                          timeout=20, check=False)


def test_valid_device_publishes_and_receives(fleet: Fleet, hub: RunningHub) -> None:
    """mosquitto_sub gets what an operator broadcasts; mosquitto_pub to its own topic works."""
    device = fleet.device("mq-dev")
    with hub.revocation_change():
        operator = fleet.device("mq-op", group="operators")
    sub = subprocess.Popen([*_sub_command(hub, fleet, device, "mq-dev", "fleet/broadcast/#",
                                          "devices/mq-dev/#"), "-C", "1", "-v"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert sub.stdout is not None
        for line in sub.stdout:  # wait for its SUBACK before publishing
            if "received SUBACK" in line:
                break
        done = _pub(hub, fleet, operator, "mq-op", "fleet/broadcast/news", "to everyone")
        assert done.returncode == 0, done.stderr
        out, _ = sub.communicate(timeout=10)
        assert "fleet/broadcast/news to everyone" in out
        assert sub.returncode == 0
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    own = _pub(hub, fleet, device, "mq-dev", "devices/mq-dev/telemetry")
    assert own.returncode == 0, own.stderr


def test_refusals(fleet: Fleet, hub: RunningHub, tmp_path: Path) -> None:
    """No certificate, a foreign CA, expired, revoked and a client-id mismatch all fail."""
    now = dt.datetime.now(dt.UTC)
    good = fleet.device("mq-good")
    revoked = fleet.device("mq-revoked")
    with hub.revocation_change():
        fleet.revoke("mq-revoked")
    expired = fleet.device_with_validity("mq-old", now - dt.timedelta(days=9),
                                         now - dt.timedelta(days=1))
    rogue = Fleet.create(tmp_path / "rogue").device("mq-good")
    cases = {
        "no certificate": (None, "mq-good"),
        "foreign CA": (rogue, "mq-good"),
        "expired": (expired, "mq-old"),
        "revoked": (revoked, "mq-revoked"),
        "client-id mismatch": (good, "mq-someone"),
    }
    for name, (device, client_id) in cases.items():
        done = _pub(hub, fleet, device, client_id, f"devices/{client_id}/x")
        assert done.returncode != 0, f"{name} was accepted"
    mismatch = _pub(hub, fleet, good, "mq-someone", "devices/mq-someone/x")
    assert "not authorised" in mismatch.stderr.lower()
    assert _pub(hub, fleet, good, "mq-good", "devices/mq-good/x").returncode == 0


def test_revoked_live_subscriber_is_disconnected(fleet: Fleet, hub: RunningHub) -> None:
    """A live mosquitto_sub of a device revoked mid-session is cut off within refresh + 1 s,
    and its automatic reconnect is refused."""
    device = fleet.device("mq-live")
    sub = subprocess.Popen(_sub_command(hub, fleet, device, "mq-live", "devices/mq-live/#"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert sub.stdout is not None
        for line in sub.stdout:
            if "received SUBACK" in line:
                break
        started = time.time()
        fleet.revoke("mq-live")
        out, _ = sub.communicate(timeout=15)  # it exits when its reconnect is refused
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    kicks = [r for r in hub.events("mq-live") if r["event"] == "kick"]
    assert kicks, out
    kicked_at = dt.datetime.fromisoformat(str(kicks[-1]["time"]).replace("Z", "+00:00"))
    assert kicked_at.timestamp() - started <= REFRESH + 1.0
    assert "not authorised" in out.lower()
    assert sub.returncode != 0
