"""A real fleet for integration tests: PKI, device keys and certificates, a running hub."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions, serial_hex
from provisioning.profile import device_certificate, random_serial

TRUST_DOMAIN = "fleet.test"
READY = re.compile(r"fleet-hub ready: listening on [^:]+:(\d+)(?:, metrics on [^:]+:(\d+))?")


@dataclass(frozen=True)
class Device:
    device_id: str
    cert: Path
    key: Path
    serial: str


@dataclass
class Fleet:
    """A PKI folder with a hub server certificate; devices make their own keys."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca(self) -> Path:
        return self.pki / "ca-chain.pem"

    @classmethod
    def create(cls, root: Path) -> Fleet:
        fleet = cls(root)
        initialize(fleet.pki, PKIConfig(trust_domain=TRUST_DOMAIN, organisation="Test Org"), None)
        with Authority(fleet.pki) as authority:
            authority.server_cert("localhost", ["127.0.0.1"], fleet.pki)
        (root / "devices").mkdir()
        return fleet

    def _key(self, device_id: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        path = self.root / "devices" / f"{device_id}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return key, path

    def device(self, device_id: str, group: str | None = None) -> Device:
        """Enroll a device the way the factory does: its own key, a CSR, `sign`."""
        key, key_path = self._key(device_id)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()))
        with Authority(self.pki) as authority:
            [result] = authority.issuer().sign(
                [CSRInput(device_id, csr.public_bytes(serialization.Encoding.PEM))],
                SignOptions(out_dir=self.root / "devices", group=group, renew=True))
        assert result.status in ("issued", "existing"), result.reason
        assert result.serial is not None
        return Device(device_id, self.root / "devices" / f"{device_id}.pem", key_path,
                      result.serial)

    def device_with_validity(self, device_id: str, not_before: dt.datetime,
                             not_after: dt.datetime) -> Device:
        """A certificate from the real issuing CA with chosen dates (expired, future, short)."""
        key, key_path = self._key(device_id)
        with Authority(self.pki) as authority:
            cert = device_certificate(authority.ca, authority.config, device_id,
                                      key.public_key(), random_serial(), not_before, not_after)
            chain = authority.ca.chain_pem
        path = self.root / "devices" / f"{device_id}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
        return Device(device_id, path, key_path, serial_hex(cert.serial_number))

    def device_without_uri(self, device_id: str) -> Device:
        """A certificate from our CA whose SAN holds a DNS name but no SPIFFE URI."""
        key, key_path = self._key(device_id)
        with Authority(self.pki) as authority:
            ca = authority.ca
            now = dt.datetime.now(dt.UTC)
            cert = (x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                device_id)]))
                    .issuer_name(ca.cert.subject).public_key(key.public_key())
                    .serial_number(random_serial())
                    .not_valid_before(now - dt.timedelta(minutes=5))
                    .not_valid_after(now + dt.timedelta(days=1))
                    .add_extension(x509.SubjectAlternativeName([x509.DNSName(device_id)]),
                                   critical=False)
                    .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID
                                                          .CLIENT_AUTH]), critical=False)
                    .sign(ca.key, hashes.SHA256()))
            chain = ca.chain_pem
        path = self.root / "devices" / f"{device_id}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
        return Device(device_id, path, key_path, serial_hex(cert.serial_number))

    def revoke(self, device_id: str, reason: str = "keyCompromise") -> None:
        with Authority(self.pki) as authority:
            authority.revoke(device_id, None, reason)

    def suspend(self, device_id: str) -> None:
        with Authority(self.pki) as authority:
            authority.suspend(device_id)

    def resume(self, device_id: str) -> None:
        with Authority(self.pki) as authority:
            authority.resume(device_id)

    def write_config(self, name: str = "hub.toml", *, extra: str = "",
                     revocation: str | None = None, refresh: float = 0.5,
                     password: bool = False) -> Path:
        rev = revocation if revocation is not None else (
            f'registry = "pki/registry.db"\ncrl = "pki/crl.pem"\nrefresh_seconds = {refresh}')
        text = f"""
[listener]
bind = "127.0.0.1:0"
server_cert = "pki/server.pem"
server_key = "pki/server.key"
client_ca = "pki/ca-chain.pem"
handshake_timeout = 5

[revocation]
{rev}

[auth]
client_id = "must-match"
password = {"true" if password else "false"}

[acl]
publish = ["devices/{{device_id}}/#"]
subscribe = ["devices/{{device_id}}/#", "fleet/broadcast/#"]

[acl.groups.operators]
subscribe = ["#"]
publish = ["fleet/broadcast/#"]

[audit]
path = "hub-audit.db"

[metrics]
bind = "127.0.0.1:0"
{extra}
"""
        path = self.root / name
        path.write_text(text)
        return path


@dataclass
class RunningHub:
    """``fleet-hub serve`` as a real process on a free loopback port."""

    process: subprocess.Popen[str]
    port: int
    metrics_port: int | None
    config: Path
    log: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    @classmethod
    def start(cls, config: Path, *, timeout: float = 30.0) -> RunningHub:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=config.parent,
            env=env)
        lines: list[str] = []
        ready = threading.Event()
        found: list[tuple[int, int | None]] = []

        def pump() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                lines.append(line)
                match = READY.search(line)
                if match and not found:
                    found.append((int(match[1]), int(match[2]) if match[2] else None))
                    ready.set()
            ready.set()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        if not ready.wait(timeout) or not found:
            process.kill()
            process.wait()
            thread.join(5)
            assert process.stderr is not None
            process.stderr.close()
            raise RuntimeError("hub did not become ready:\n" + "".join(lines))
        port, metrics = found[0]
        hub = cls(process, port, metrics, config, lines)
        hub.pump = thread
        return hub

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.pump is not None:
            self.pump.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return self.process.returncode

    def settle(self, refresh: float = 0.5) -> None:
        """Let the hub's registry watcher see the latest CA action (it polls every refresh)."""
        time.sleep(2 * refresh + 0.2)

    def events(self, device: str | None = None) -> list[dict[str, object]]:
        """What `fleet-hub events --json` prints (the audit store is flushed in batches)."""
        import json

        args = [sys.executable, "-m", "hub.cli", "events", "--config", str(self.config),
                "--json"]
        if device:
            args += ["--device", device]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        return list(json.loads(done.stdout))
