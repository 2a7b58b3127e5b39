"""An issuing-CA rotation with devices connected (issue 14, DESIGN section 10, contract C1):
the real ``fleet-provision issuing-ca rotate`` and ``retire``, a real CA service, two real
hubs, paho devices.

- Hub "registry": on the same host as the CA: ``client_ca`` is the PKI's ``ca-chain.pem``,
  which rotate and retire rewrite; revocations from the registry.
- Hub "feed": a gateway away from the CA, on the fleet-state feed, whose ``client_ca`` is a
  copy of the chain from before the rotation and is never updated: the feed's signer and its
  ``issuers`` alone teach it the new intermediate, and the retirement.
- Hub "crl-url": ``client_ca`` the PKI's ``ca-chain.pem``, revocations from the CA service's
  ``GET /crl``: asked for PEM, it answers the CRL of each live issuing CA, so a device of the
  old intermediate revoked after the rotation is seen (DER would carry the new one's only).

Across rotate, the devices of the old intermediate stay connected and their QoS 1 flow goes
on; a device of the new intermediate is admitted by both hubs without a restart. After the
old devices are revoked and the old intermediate retired, a certificate of the old
intermediate that no one revoked (never registered) is refused by both: ``unknown-issuer``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from device_sim.lab import CAServiceProcess, write_gateway_config
from provisioning.pki import PKI, IssuingCA
from tests.hub.cabundle_support import leaf_from
from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.healthz import healthz, wait_for
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("rotation"))


@pytest.fixture(scope="module")
def ca(fleet: Fleet) -> Iterator[CAServiceProcess]:
    with CAServiceProcess(fleet.pki) as service:
        yield service


@pytest.fixture(scope="module")
def hubs(fleet: Fleet, ca: CAServiceProcess) -> Iterator[dict[str, RunningHub]]:
    before = fleet.root / "ca-chain-before-rotation.pem"
    before.write_bytes(fleet.ca.read_bytes())
    gateway = write_gateway_config(fleet.root, fleet.pki, "gw-1", ca.feed_url, layers=(
        {"listener": {"client_ca": str(before), "handshake_timeout": 5}},))
    running: dict[str, RunningHub] = {}
    try:
        running["registry"] = RunningHub.start(fleet.write_config("hub-rotation.toml"))
        running["feed"] = RunningHub.start(gateway)
        running["crl-url"] = RunningHub.start(fleet.write_config(
            "hub-rotation-crl.toml", revocation=f'crl = "{ca.url}/crl"\nrefresh_seconds = 0.5',
            extra=f'[audit]\npath = "{fleet.root / "crl-url-audit.db"}"\n'))
        yield running
    finally:
        for hub in running.values():
            assert hub.stop() == 0, "".join(hub.log)


def _provision(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioning.cli", *args],
                          capture_output=True, text=True, check=False)


def _generation(hub: RunningHub) -> int:
    return int(healthz(hub)[1]["client_ca"]["generation"])


def _wait_generation(hub: RunningHub, above: int) -> None:
    assert wait_for(lambda: _generation(hub) > above, 20), healthz(hub)


def _loop(client: Client, device_id: str, payload: bytes) -> None:
    """A QoS 1 publish to the device's own topic comes back on its subscription."""
    client.publish(f"devices/{device_id}/telemetry", payload)
    message = client.receive()
    assert message is not None, f"{device_id}: {payload!r} did not come back"
    assert message.payload == payload


def test_rotate_and_retire_with_devices_connected(
        fleet: Fleet, ca: CAServiceProcess, hubs: dict[str, RunningHub],
        connect: Callable[..., Client]) -> None:
    old_ca: IssuingCA = PKI(fleet.pki).load_issuing_ca(None)
    strays = fleet.root / "strays"
    strays.mkdir()
    # Signed by the old intermediate's key, never registered: only the issuer check can
    # refuse it once the old intermediate is retired.
    stray = leaf_from(fleet.pki, old_ca, "stray-1", strays, chain=True)
    olds: dict[str, Device] = {}
    sessions: dict[str, Client] = {}
    for name, hub in hubs.items():
        olds[name] = fleet.device(f"old-{name}")
        sessions[name] = connect(olds[name], port=hub.port, clean=False)
        assert sessions[name].connect() == ACCEPTED
        assert sessions[name].subscribe(f"devices/old-{name}/#") == [1]
        _loop(sessions[name], f"old-{name}", b"before rotate")
        assert connect(stray, port=hub.port).connect() == ACCEPTED
    generations = {name: _generation(hub) for name, hub in hubs.items()}

    rotated = _provision("issuing-ca", "rotate", "--pki", str(fleet.pki))
    assert rotated.returncode == 0, rotated.stderr
    for name, hub in hubs.items():
        _wait_generation(hub, generations[name])
    new = fleet.device("new-1")  # sign: from the new intermediate now
    assert new.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    for name, hub in hubs.items():
        assert connect(new, port=hub.port).connect() == ACCEPTED, name
        assert not sessions[name].disconnected.is_set(), name
        _loop(sessions[name], f"old-{name}", b"after rotate")
    feed_rows = hubs["feed"].wait_events(event="source", until=lambda rows: any(
        str(r["reason"]).startswith("trust changed by the feed's issuers") for r in rows))
    assert feed_rows

    for name in hubs:
        fleet.revoke(f"old-{name}")
    for name, hub in hubs.items():
        assert sessions[name].wait_disconnected(10), name
        [kick] = hub.wait_events(f"old-{name}", event="kick")
        assert kick["reason"] == "revoked"
    generations = {name: _generation(hub) for name, hub in hubs.items()}
    retired = _provision("issuing-ca", "retire", "--pki", str(fleet.pki))
    assert retired.returncode == 0, retired.stderr
    for name, hub in hubs.items():
        _wait_generation(hub, generations[name])
        assert connect(stray, port=hub.port).connect() is None, name
        rows = hub.wait_events("stray-1", event="reject", reason="unknown-issuer")
        assert [r["serial"] for r in rows] == [stray.serial], name
        assert connect(new, port=hub.port).connect() == ACCEPTED, name
