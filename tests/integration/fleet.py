"""A real fleet for integration tests: PKI, device keys and certificates, a running hub."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from device_sim.factory import DevicePrivateKey, new_key, write_key
from device_sim.lab import LOOPBACK, Enrolled, HubProcess, enroll, hub_toml, make_pki
from provisioning.authority import Authority
from provisioning.issuer import serial_hex
from provisioning.profile import device_certificate, random_serial

TRUST_DOMAIN = "fleet.test"

# The tests' hub: DESIGN's example on loopback ports, a short handshake timeout and refresh,
# operators who may also broadcast, no [limits] unless a test sets some (the hub's defaults).
TEST_HUB: Mapping[str, Any] = {
    "listener": {"handshake_timeout": 5},
    "acl": {"groups": {"operators": {"publish": ["fleet/broadcast/#"]}}},
    "limits": None,
}

Device = Enrolled  # device_id, cert, key, serial
Row = dict[str, object]  # one audit record, as `fleet-hub events --json` prints it


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
        make_pki(root, trust_domain=TRUST_DOMAIN, organisation="Test Org", actor=None)
        (root / "devices").mkdir()
        return cls(root)

    def _key(self, device_id: str) -> tuple[DevicePrivateKey, Path]:
        key = new_key()
        path = self.root / "devices" / f"{device_id}.key"
        write_key(path, key)
        return key, path

    def device(self, device_id: str, group: str | None = None) -> Device:
        """Enroll a device the way the factory does: its own key, a CSR, `sign`."""
        [device] = enroll(self.pki, self.root / "devices", [device_id], group=group,
                          renew=True)
        return device

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
        """The tests' hub.toml; *revocation* replaces [revocation]'s keys, *extra* (TOML)
        is merged over the rest."""
        rev: dict[str, Any] = {"refresh_seconds": refresh}
        if revocation is not None:
            rev = {"registry": None, "crl": None, "refresh_seconds": None,
                   **tomllib.loads(revocation)}
        path = self.root / name
        path.write_text(hub_toml("pki", LOOPBACK, TEST_HUB,
                                 {"revocation": rev, "auth": {"password": password}},
                                 tomllib.loads(extra)))
        return path


class RunningHub(HubProcess):
    """``fleet-hub serve`` as a real process on a free loopback port (every log line kept)."""

    @classmethod
    def start(cls, config: Path, *, timeout: float = 30.0) -> RunningHub:
        return cls(config, timeout=timeout, stop_timeout=15, max_lines=None)

    @contextmanager
    def revocation_change(self, timeout: float = 10.0) -> Iterator[None]:
        """Around one CA action that changes what the hub enforces: on leaving, wait until
        the hub has taken it (healthz.revocation_change)."""
        from tests.integration.healthz import revocation_change

        with revocation_change(self, timeout):
            yield

    def events(self, device: str | None = None) -> list[dict[str, object]]:
        """What `fleet-hub events --json` prints (the audit store is flushed in batches)."""
        args = [sys.executable, "-m", "hub.cli", "events", "--config", str(self.config),
                "--json"]
        if device:
            args += ["--device", device]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        return list(json.loads(done.stdout))

    def wait_events(self, device: str | None = None, *, want: int = 1,
                    until: Callable[[list[Row]], bool] | None = None, timeout: float = 5.0,
                    **fields: object) -> list[Row]:
        """The audit rows (of *device*; with each of *fields*, e.g. ``event="kick"``) once
        *want* of them have landed or *until(rows)* holds; after *timeout* s, the last read.
        The store is written in batches off the hub's loop: a test polls it, never sleeps."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.events(device)
                    if all(r.get(name) == value for name, value in fields.items())]
            if (len(rows) >= want if until is None else until(rows)) \
                    or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def open_fds(self) -> int:
        """The hub process's open descriptors, from /proc (Linux)."""
        return sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())
