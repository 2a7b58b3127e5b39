"""The SPIFFE trust-domain check (DESIGN section 5) and where the hub learns the fleet's domain."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.authority import Authority
from provisioning.issuer import serial_hex
from provisioning.profile import device_certificate, random_serial
from tests.integration.fleet import TRUST_DOMAIN, Device, Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135
OTHER_DOMAIN = "other.test"


def _foreign_domain_device(fleet: Fleet, device_id: str, domain: str = OTHER_DOMAIN) -> Device:
    """A certificate from the fleet's own issuing CA naming spiffe://<domain>/device/<id>."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = fleet.root / "devices" / f"{device_id}@{domain}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    now = dt.datetime.now(dt.UTC)
    with Authority(fleet.pki) as authority:
        config = dataclasses.replace(authority.config, trust_domain=domain)
        cert = device_certificate(authority.ca, config, device_id, key.public_key(),
                                  random_serial(), now - dt.timedelta(minutes=5),
                                  now + dt.timedelta(days=1))
        chain = authority.ca.chain_pem
    path = fleet.root / "devices" / f"{device_id}@{domain}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    return Device(device_id, path, key_path, serial_hex(cert.serial_number))


def _server_cert(fleet: Fleet, name: str, gateway_domain: str | None) -> tuple[Path, Path]:
    """A hub certificate for localhost/127.0.0.1, with or without a gateway SPIFFE URI (made
    here, so the test does not depend on what `fleet-provision server-cert` puts in one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if gateway_domain is not None:
        names.append(x509.UniformResourceIdentifier(
            f"spiffe://{gateway_domain}/gateway/localhost"))
    now = dt.datetime.now(dt.UTC)
    with Authority(fleet.pki) as authority:
        ca = authority.ca
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca.cert.subject).public_key(key.public_key())
                .serial_number(random_serial())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca.key.public_key()), critical=False)
                .sign(ca.key, hashes.SHA256()))
        chain = ca.chain_pem
    cert_path, key_path = fleet.root / f"{name}.pem", fleet.root / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _config(fleet: Fleet, name: str, *, revocation: str | None = None,
            trust_domain: str | None = None,
            server: tuple[Path, Path] | None = None) -> Path:
    config = fleet.write_config(f"{name}.toml", revocation=revocation)
    text = config.read_text().replace('"hub-audit.db"', f'"{name}-audit.db"')
    if trust_domain is not None:
        text = text.replace("password = false",
                            f'password = false\ntrust_domain = "{trust_domain}"')
    if server is not None:
        text = (text.replace('server_cert = "pki/server.pem"', f'server_cert = "{server[0]}"')
                .replace('server_key = "pki/server.key"', f'server_key = "{server[1]}"'))
    config.write_text(text)
    return config


def _rejects(hub: RunningHub, device: str, want: int = 1,
             timeout: float = 5.0) -> list[dict[str, object]]:
    """The audit store is written in batches off the loop: wait for the records to land."""
    return hub.wait_events(device, event="reject", want=want, timeout=timeout)


def _connects(hub: RunningHub, fleet: Fleet, device: Device) -> int | None:
    client = Client(hub.port, fleet.ca, device.cert, device.key, device.device_id)
    try:
        return client.connect()
    finally:
        client.close()


def test_a_certificate_of_another_trust_domain_is_refused_and_audited(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """Same CA, valid dates, client id = device id, but spiffe://other.test/device/x: refused
    with wrong-trust-domain (the fleet's domain learnt from the registry); the same id in the
    fleet's own domain is admitted."""
    foreign = _foreign_domain_device(fleet, "td-x")
    assert connect(foreign).connect() == NOT_AUTHORIZED
    [reject] = _rejects(hub, "td-x")
    assert (reject["reason"], reject["serial"]) == ("wrong-trust-domain", foreign.serial)
    own = fleet.device("td-x")
    assert connect(own).connect() == ACCEPTED


def test_the_configured_trust_domain_wins_over_the_registry(fleet: Fleet) -> None:
    """[auth] trust_domain is the one checked, whatever the registry says: with "other.test"
    configured, the fleet's own devices are the foreign ones."""
    hub = RunningHub.start(_config(fleet, "hub-td-config", trust_domain=OTHER_DOMAIN))
    try:
        assert _connects(hub, fleet, _foreign_domain_device(fleet, "td-cfg")) == ACCEPTED
        assert _connects(hub, fleet, fleet.device("td-cfg-own")) == NOT_AUTHORIZED
        [reject] = _rejects(hub, "td-cfg-own")
        assert reject["reason"] == "wrong-trust-domain"
        assert any("trust domain other.test (from auth.trust_domain)" in line
                   for line in hub.log)
    finally:
        assert hub.stop() == 0


def test_the_registry_wins_over_the_server_certificate(fleet: Fleet) -> None:
    """Without [auth] trust_domain, the registry's pki.init event names the domain even when
    the hub's own certificate claims another one."""
    server = _server_cert(fleet, "gw-other", OTHER_DOMAIN)
    hub = RunningHub.start(_config(fleet, "hub-td-registry", server=server))
    try:
        assert _connects(hub, fleet, fleet.device("td-reg")) == ACCEPTED
        assert _connects(hub, fleet, _foreign_domain_device(fleet, "td-reg-x")) == NOT_AUTHORIZED
        assert any(f"trust domain {TRUST_DOMAIN} (from the registry's pki.init event)" in line
                   for line in hub.log)
    finally:
        assert hub.stop() == 0


def test_a_crl_only_hub_learns_the_domain_from_its_gateway_certificate(fleet: Fleet) -> None:
    """With only a CRL and no [auth] trust_domain, the server certificate's
    spiffe://<domain>/gateway/<name> URI names the fleet's domain."""
    server = _server_cert(fleet, "gw-own", TRUST_DOMAIN)
    hub = RunningHub.start(_config(fleet, "hub-td-cert", server=server,
                                   revocation='crl = "pki/crl.pem"\nrefresh_seconds = 0.5'))
    try:
        assert _connects(hub, fleet, fleet.device("td-cert")) == ACCEPTED
        assert _connects(hub, fleet, _foreign_domain_device(fleet, "td-cert-x")) == NOT_AUTHORIZED
        assert any(f"trust domain {TRUST_DOMAIN} (from the server certificate)" in line
                   for line in hub.log)
    finally:
        assert hub.stop() == 0


def test_serve_refuses_to_start_when_no_trust_domain_is_known(fleet: Fleet) -> None:
    """CRL only, no [auth] trust_domain, a server certificate without a gateway URI: serve
    exits 2 with one line naming auth.trust_domain, rather than admit any domain."""
    server = _server_cert(fleet, "gw-plain", None)
    config = _config(fleet, "hub-td-none", server=server,
                     revocation='crl = "pki/crl.pem"\nrefresh_seconds = 0.5')
    done = subprocess.run([sys.executable, "-m", "hub.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=config.parent)
    assert done.returncode == 2, done.stderr
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: auth.trust_domain: not set")
    assert error.endswith(f"({config})")
    assert "fleet-hub ready" not in done.stderr
