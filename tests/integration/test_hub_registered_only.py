"""[auth] registered_only = true on a real hub with a same-host registry, seen through paho.

A certificate that the issuing key signed but the CA never recorded (minted here with
cryptography from the issuing key and the device profile, bypassing the registry: what a
leaked key or a mis-issuance makes) is refused ``unregistered``; the same device's recorded
certificate is admitted, and so is one issued while the hub runs, as soon as the registry
says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from device_sim.factory import new_key, write_key
from provisioning.authority import Authority
from provisioning.profile import device_certificate, random_serial
from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135


@pytest.fixture(scope="module")
def registered_hub(fleet: Fleet) -> Iterator[RunningHub]:
    config = fleet.write_config("hub-registered.toml",
                                extra="[auth]\nregistered_only = true\n")
    config.write_text(config.read_text().replace('"hub-audit.db"', '"hub-registered-audit.db"'))
    running = RunningHub.start(config)
    yield running
    assert running.stop() == 0, "".join(running.log)


def mint_unrecorded(fleet: Fleet, device_id: str, folder: Path) -> tuple[Path, Path]:
    """A certificate for *device_id* from the real issuing key and profile, never recorded in
    the registry: ``(cert with chain, key)`` files in *folder*."""
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    with Authority(fleet.pki) as authority:
        cert = device_certificate(authority.ca, authority.config, device_id, key.public_key(),
                                  random_serial(), now - dt.timedelta(minutes=5),
                                  now + dt.timedelta(days=1))
        chain = authority.ca.chain_pem
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{device_id}.pem", folder / f"{device_id}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    write_key(key_path, key)
    return cert_path, key_path


def test_an_unrecorded_certificate_is_refused_and_the_recorded_one_admitted(
        fleet: Fleet, registered_hub: RunningHub, connect: Callable[..., Client],
        tmp_path: Path) -> None:
    """Both chain to the issuing CA and name the same device; only the registry's gets in."""
    device = fleet.device("reg-e2e")
    cert, key = mint_unrecorded(fleet, "reg-e2e", tmp_path / "minted")
    minted = connect(cert=cert, key=key, client_id="reg-e2e", port=registered_hub.port)
    assert minted.connect() == NOT_AUTHORIZED
    recorded = connect(device, port=registered_hub.port)
    assert recorded.connect() == ACCEPTED
    rejects = registered_hub.wait_events("reg-e2e", event="reject")
    assert [r["reason"] for r in rejects] == ["unregistered"]
    accepts = registered_hub.wait_events("reg-e2e", event="accept")
    assert [r["serial"] for r in accepts] == [device.serial]


def test_a_certificate_issued_while_the_hub_runs_is_admitted(
        fleet: Fleet, registered_hub: RunningHub, connect: Callable[..., Client]) -> None:
    """The hub reads the new serial from the registry with the CA action that issued it."""
    with registered_hub.revocation_change():
        device = fleet.device("reg-late")
    assert connect(device, port=registered_hub.port).connect() == ACCEPTED
