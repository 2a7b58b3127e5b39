"""Issuing-CA rotation at the gateway (issue 14, DESIGN section 10): the hub re-reads
``client_ca`` when the file changes and admits a second intermediate without a restart; a
bad bundle is refused, audited, and the one in force stays.

The second intermediate is made from the PKI's root key, as ``issuing-ca rotate`` will.
One device presents its certificate alone, without the intermediate: refused in the TLS
handshake until client_ca holds that intermediate. Another sends its chain: it verifies
through the root in client_ca, and the issuer check refuses it (``unknown-issuer``) until
client_ca lists its intermediate (contract C1).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.hub.cabundle_support import leaf_from, second_intermediate
from tests.integration.fleet import Fleet, RunningHub
from tests.integration.healthz import healthz, metric, wait_for, wait_healthz
from tests.integration.mqtt import Client

ACCEPTED = 0
UNKNOWN_ISSUER = 'fleet_hub_connects_refused_total{reason="unknown-issuer"}'


def _replace(path: Path, data: bytes) -> None:
    """Rewrite *path* atomically, as an operator's install or a config manager does."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    staged.replace(path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _generation(hub: RunningHub) -> int:
    return int(healthz(hub)[1]["client_ca"]["generation"])


def _refused(hub: RunningHub) -> int:
    return int(healthz(hub)[1]["client_ca"]["refused"])


def test_a_new_intermediate_is_admitted_once_client_ca_carries_it(
        fleet: Fleet, tmp_path: Path, connect: Callable[..., Client]) -> None:
    """Refused while client_ca holds the first intermediate alone; bad bundles (garbage, empty,
    one with a device certificate in it) are refused and audited, even on SIGHUP, and change
    nothing; once the file holds both intermediates the new device is admitted, old devices
    still are, and a session open all along is untouched."""
    bundle = tmp_path / "ca-chain.pem"
    original = fleet.ca.read_bytes()
    bundle.write_bytes(original)
    config = fleet.write_config("hub-ca-reload.toml", extra=(
        f'[listener]\nclient_ca = "{bundle}"\n'
        f'[audit]\npath = "{tmp_path / "audit.db"}"\n'))
    second = second_intermediate(fleet.pki)
    newcomer = leaf_from(fleet.pki, second, "second-ca-1", fleet.root / "devices")
    running = RunningHub.start(config)
    try:
        steady = connect(fleet.device("steady-1"), port=running.port)
        assert steady.connect() == ACCEPTED
        assert _generation(running) == 1
        assert connect(newcomer, port=running.port).connect() is None
        # Refused in the handshake: audited before any device id is known.
        assert running.wait_events(event="reject", reason="untrusted")
        # With its intermediate it verifies through the root, and is refused by the issuer
        # check, on the record with the device it named.
        chained = leaf_from(fleet.pki, second, "second-ca-chained", fleet.root / "devices",
                            chain=True)
        assert connect(chained, port=running.port).connect() is None
        [row] = running.wait_events(event="reject", reason="unknown-issuer")
        assert (row["device_id"], row["serial"]) == ("second-ca-chained", chained.serial)
        assert metric(running, UNKNOWN_ISSUER) == 1

        leaf = x509.load_pem_x509_certificate(newcomer.cert.read_bytes())
        bad = [b"not a certificate\n", b"",
               original + _pem(second.cert) + _pem(leaf)]  # the newcomer's own as an anchor
        for n, data in enumerate(bad, start=1):
            _replace(bundle, data)
            assert wait_for(lambda: _refused(running) == n), healthz(running)  # noqa: B023
        running.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: any("TLS context reloaded" in line for line in running.log))
        status, body = healthz(running)
        assert status == 200
        assert body["client_ca"]["generation"] == 1
        assert "is not a CA certificate" in body["client_ca"]["last_error"]
        assert connect(newcomer, port=running.port).connect() is None
        refusals = running.wait_events(event="source", want=3, until=lambda rows: sum(
            str(r["reason"]).startswith("client_ca refused: ") for r in rows) >= 3)
        reasons = [str(r["reason"]) for r in refusals]
        assert any("the file is empty" in r for r in reasons), reasons
        assert any("no PEM certificate" in r for r in reasons), reasons

        _replace(bundle, original + _pem(second.cert))
        _, body = wait_healthz(running, lambda _s, b: b["client_ca"]["generation"] == 2)
        assert body["client_ca"]["certificates"] == 3
        assert body["client_ca"]["last_error"] is None
        assert connect(newcomer, port=running.port).connect() == ACCEPTED
        assert connect(chained, port=running.port).connect() == ACCEPTED
        assert connect(fleet.device("first-ca-after"), port=running.port).connect() == ACCEPTED
        assert not steady.disconnected.is_set()
        assert steady.subscribe("devices/steady-1/#") == [1]
        assert running.wait_events(event="source", until=lambda rows: any(
            r["reason"] == "client_ca reloaded: generation 2, 3 certificates" for r in rows))
    finally:
        assert running.stop() == 0, "".join(running.log)
