"""The audit checks on a real hub (issue 15): real TLS, real paho clients, real certificates.

One hub in ``report`` mode serves the module ([checks] warn_days = 1, min_rsa_bits = 3072,
client_ca = the fleet's chain plus a root that ends in 12 hours). Each check is triggered by
real clients and read back from the audit store (``fleet-hub events --json``: event
``finding``, reason the check). Absence is never waited for with a sleep: a no-false-positive
case runs first, then a finding that must come after it in the same store (take-overs are
reported in order, a pass looks at every open session at once), and only then is the earlier
case's absence asserted.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from provisioning.authority import Authority
from provisioning.issuer import serial_hex
from provisioning.profile import device_certificate, random_serial
from tests.integration.fleet import Device, Fleet, Row, RunningHub
from tests.integration.healthz import metric
from tests.integration.mqtt import Client

CHECKS = """
[listener]
client_ca = "client-ca.pem"

[checks]
warn_days = 1
min_rsa_bits = 3072
"""


def short_root(path: Path) -> x509.Certificate:
    """A self-signed CA certificate that ends in 12 hours, appended to *path*."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Short-lived Test Root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(random_serial())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=12))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    with path.open("ab") as out:
        out.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def rsa_device(fleet: Fleet, device_id: str, bits: int) -> Device:
    """A certificate of the fleet's issuing CA on an RSA key (never recorded: the CA's sign
    takes the fleet's key policy, this test wants a key that policy would refuse)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    key_path = fleet.root / "devices" / f"{device_id}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    now = dt.datetime.now(dt.UTC)
    with Authority(fleet.pki) as authority:
        cert = device_certificate(authority.ca, authority.config, device_id, key.public_key(),
                                  random_serial(), now - dt.timedelta(minutes=5),
                                  now + dt.timedelta(days=30))
        chain = authority.ca.chain_pem
    path = fleet.root / "devices" / f"{device_id}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    return Device(device_id, path, key_path, serial_hex(cert.serial_number))


def keep_copy(device: Device, suffix: str) -> Device:
    """The device's current certificate and key under other names (a renewal rewrites them)."""
    cert = device.cert.with_name(f"{device.device_id}-{suffix}.pem")
    key = device.key.with_name(f"{device.device_id}-{suffix}.key")
    shutil.copy(device.cert, cert)
    shutil.copy(device.key, key)
    return Device(device.device_id, cert, key, device.serial)


class Site:
    def __init__(self, fleet: Fleet, hub: RunningHub, short_ca: x509.Certificate) -> None:
        self.fleet, self.hub, self.short_ca = fleet, hub, short_ca
        self.clients: list[Client] = []

    def connect(self, device: Device) -> Client:
        client = Client(self.hub.port, self.fleet.ca, device.cert, device.key,
                        device.device_id)
        self.clients.append(client)
        assert client.connect() == 0
        return client

    def findings(self, device: str | None = None, check: str | None = None) -> list[Row]:
        return [r for r in self.hub.events(device) if r["event"] == "finding"
                and (check is None or r["reason"] == check)]

    def wait_finding(self, device: str | None, check: str, timeout: float = 15.0) -> Row:
        rows = self.hub.wait_events(device, event="finding", reason=check, timeout=timeout)
        assert rows, f"no {check} finding for {device}"
        return rows[-1]

    def flap(self, device: Device) -> list[str]:
        """Three connections on one certificate, each taking the last one's place: two
        take-overs, the second one within the window. Their local addresses, as the hub
        names peers."""
        return [_port(self.connect(device)) for _ in range(3)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    fleet = Fleet.create(tmp_path_factory.mktemp("findings"))
    bundle = fleet.root / "client-ca.pem"
    shutil.copy(fleet.ca, bundle)
    short_ca = short_root(bundle)
    hub = RunningHub.start(fleet.write_config(extra=CHECKS))
    running = Site(fleet, hub, short_ca)
    try:
        yield running
    finally:
        for client in running.clients:
            client.close()
        hub.stop()


def _port(client: Client) -> str:
    sock = client.client.socket()
    assert isinstance(sock, socket.socket)
    return f"127.0.0.1:{sock.getsockname()[1]}"


def test_one_certificate_in_two_boxes_is_certificate_shared(site: Site) -> None:
    """A normal reconnect and a single take-over (a half-open connection replaced) are not
    findings; three connections on one certificate taking each other's place are, with
    every peer in the evidence."""
    steady = site.fleet.device("steady")
    for _ in range(2):
        site.connect(steady).close()  # DISCONNECT, then a new connection: no take-over
    site.connect(steady)
    site.connect(steady)  # one take-over
    twin = site.fleet.device("twin")
    peers = site.flap(twin)
    row = site.wait_finding("twin", "certificate-shared")
    assert row["serial"] == twin.serial
    evidence = row["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["peers"] == peers
    assert len(evidence["takeovers"]) == 2
    for takeover in evidence["takeovers"]:  # the displaced box had been silent that long
        assert isinstance(takeover["from_idle_seconds"], float | int)
    assert evidence["window_seconds"] == 60
    assert site.findings("steady") == []
    counted = metric(site.hub, re.escape('fleet_hub_findings_total{check="certificate-shared"}'))
    assert counted >= 1


def test_two_certificates_of_one_device_fighting_is_client_id_conflict(site: Site) -> None:
    """fleet-provision sign --renew keeps the old certificate valid (superseded, within the
    grace): a device that renews and reconnects once is not a finding; the old and the new
    certificate taking one client id from each other are."""
    once_old = keep_copy(site.fleet.device("renews-once"), "old")
    once_new = site.fleet.device("renews-once")
    site.connect(once_old)
    site.connect(once_new)  # the renewed device takes its old connection over, once
    old = keep_copy(site.fleet.device("forked"), "old")
    new = site.fleet.device("forked")
    assert old.serial != new.serial
    site.connect(old)
    site.connect(new)
    site.connect(old)
    row = site.wait_finding("forked", "client-id-conflict")
    evidence = row["evidence"]
    assert isinstance(evidence, dict)
    assert sorted(evidence["serials"]) == sorted([old.serial, new.serial])
    assert evidence["client_id"] == "forked"
    assert site.findings("renews-once") == []
    assert site.findings("forked", "certificate-shared") == []


def test_a_certificate_ending_within_warn_days_is_certificate_expiring(site: Site) -> None:
    healthy = site.fleet.device("year-long")
    site.connect(healthy)
    now = dt.datetime.now(dt.UTC)
    short = site.fleet.device_with_validity("ten-minutes", now - dt.timedelta(minutes=1),
                                            now + dt.timedelta(minutes=10))
    site.connect(short)
    row = site.wait_finding("ten-minutes", "certificate-expiring")
    assert row["serial"] == short.serial
    evidence = row["evidence"]
    assert isinstance(evidence, dict)
    assert 0 < float(evidence["days_left"]) < 0.01
    assert evidence["warn_days"] == 1
    assert site.findings("year-long", "certificate-expiring") == []


def test_a_client_ca_certificate_ending_within_warn_days_is_ca_expiring(site: Site) -> None:
    """Looked at when the hub starts: only the short-lived root, not the fleet's CAs."""
    rows = site.hub.wait_events(event="finding", reason="ca-expiring")
    assert [r["serial"] for r in rows] == [serial_hex(site.short_ca.serial_number)]
    evidence = rows[0]["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["subject"] == "CN=Short-lived Test Root"
    assert rows[0]["device_id"] is None


def test_a_new_client_ca_bundle_is_looked_at_when_put_in_force(site: Site) -> None:
    """client_ca rewritten (atomically, as an operator delivers it) with another root that
    ends soon: the hub puts the bundle in force within a second and reports that root."""
    bundle = site.fleet.root / "client-ca.pem"
    staged = bundle.with_name("client-ca.pem.new")
    shutil.copy(bundle, staged)
    second = short_root(staged)
    staged.replace(bundle)
    serial = serial_hex(second.serial_number)
    rows = site.hub.wait_events(event="finding", reason="ca-expiring",
                                until=lambda rows: serial in [r["serial"] for r in rows])
    assert serial in [r["serial"] for r in rows]


def test_a_key_below_the_policy_is_weak_key(site: Site) -> None:
    """min_rsa_bits = 3072 here: an RSA-2048 device is weak, the fleet's P-256 keys are not."""
    healthy = site.fleet.device("p256-device")
    site.connect(healthy)
    weak = rsa_device(site.fleet, "rsa-device", 2048)
    site.connect(weak)
    row = site.wait_finding("rsa-device", "weak-key")
    assert row["evidence"] == {"algorithm": "RSA", "bits": 2048, "min_rsa_bits": 3072}
    assert site.findings("p256-device", "weak-key") == []


def test_a_certificate_the_registry_never_recorded_is_unregistered(site: Site) -> None:
    """Signed by the issuing key but not in the registry (registered_only off: admitted);
    a revoked device kicked meanwhile is not revoked-still-connected."""
    victim = site.fleet.device("victim")
    victim_client = site.connect(victim)
    with site.hub.revocation_change():
        site.fleet.revoke("victim")
    assert victim_client.wait_disconnected()
    registered = site.fleet.device("registered")
    site.connect(registered)
    now = dt.datetime.now(dt.UTC)
    ghost = site.fleet.device_with_validity("ghost", now - dt.timedelta(minutes=1),
                                            now + dt.timedelta(days=30))
    site.connect(ghost)
    row = site.wait_finding("ghost", "unregistered-certificate")
    assert row["serial"] == ghost.serial
    evidence = row["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["device_known"] is False
    assert site.findings("registered") == []
    assert site.findings("victim") == []
