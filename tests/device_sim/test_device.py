"""The paho seam and the transport: what the simulator relies on, pinned."""

from __future__ import annotations

import asyncio
from pathlib import Path

import paho.mqtt.client as mqtt

from device_sim.device import Device, Outcome
from device_sim.enroll import FleetDir, LibraryEnroller
from device_sim.squatters import source_addresses
from device_sim.transport import Credentials, client_context
from device_sim.worker import source_address
from tests.device_sim.conftest import Lab


def test_paho_still_has_the_socket_seam() -> None:
    """reconnect() creates its socket through _create_socket (paho 2.0-2.2)."""
    assert callable(getattr(mqtt.Client, "_create_socket", None))


def test_source_addresses_stay_in_loopback() -> None:
    """One 127/8 source address per 8 devices, from 127.1.0.1: never .0 or .255, never
    127.0.0.x (the attack devices and squatters), distinct up to a million devices."""
    assert source_address(0) == source_address(7) == "127.1.0.1"
    assert source_address(8) == "127.1.0.2"
    assert source_address(8 * 254) == "127.1.1.1"
    addresses = {source_address(i) for i in range(0, 1_000_000, 8)}
    assert len(addresses) == 125_000
    for address in addresses:
        first, second, _, last = map(int, address.split("."))
        assert first == 127
        assert 1 <= second <= 255
        assert 1 <= last <= 254


def test_squatters_keep_off_the_fleets_addresses() -> None:
    """Squatters use 127.0.0.2 and up, 8 each, on a loopback broker only."""
    assert source_addresses("127.0.0.1", 200) == [f"127.0.0.{i}" for i in range(2, 27)]
    assert source_addresses("::1", 200) == [None]
    assert source_addresses("broker.example", 200) == [None]


def test_phases_are_timed(lab: Lab, tmp_path: Path) -> None:
    """TCP, TLS and CONNECT-to-CONNACK are each measured; a refusal keeps what it reached."""
    ca = (lab.pki / "ca-chain.pem").read_text()
    [files] = FleetDir(tmp_path / "fleet", prefix="phases-").prepare(
        lab.pki, 1, LibraryEnroller(lab.pki)).devices

    async def attempt(creds: Credentials, client_id: str) -> Outcome:
        device = Device(client_id, client_context(ca, creds), "127.0.0.1", lab.hub.port)
        outcome = await device.connect(10)
        await device.disconnect()
        assert not device.connected
        return outcome

    good = asyncio.run(attempt(Credentials(files.cert, files.key), files.device_id))
    assert good.accepted
    assert good.tcp_s
    assert good.tls_s
    assert good.mqtt_s
    assert good.total_s == good.tcp_s + good.tls_s + good.mqtt_s
    anonymous = asyncio.run(attempt(Credentials(None, None), "nobody"))
    # TLS 1.3: the client's handshake ends first; the hub's refusal arrives as an alert.
    assert anonymous.stage == "tls"
    assert "certificate required" in anonymous.detail
    assert anonymous.refused
    assert anonymous.tcp_s
    assert anonymous.tls_s
    assert anonymous.mqtt_s is None
