"""Giving the fleet certificates, and keeping them in ``--fleet-dir`` for the next run.

Each device's key and CSR are its own (:mod:`device_sim.factory`). They are enrolled in bulk:
through the provisioning library (``Issuer.sign`` in chunks, the way ``fleet-provision sign``
does it) or through the enrollment service (EST ``simpleenroll``, HTTP Basic token).

The fleet folder holds ``keys/<id>.key`` (0600), ``certs/<id>.pem`` (certificate and issuing
CA) and ``fleet.json`` (the ids in order, the next free number, the issuing CA's fingerprint).
A device whose certificate was revoked, put on hold or is about to expire is retired: its id
can never enroll again (DESIGN section 3), so a new id takes its place.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from device_sim import factory
from device_sim.errors import EnrollError, UsageError
from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.errors import ProvisioningError
from provisioning.issuer import SignOptions, serial_hex

Progress = Callable[[int], None]  # told how many more devices have certificates
STATE = "fleet.json"
MIN_REMAINING = dt.timedelta(hours=1)  # a certificate closer to its end is replaced
EST_CONCURRENCY = 16


@dataclass(frozen=True)
class DeviceFiles:
    """One enrolled device as the simulator plays it."""

    device_id: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class Enrollment:
    devices: list[DeviceFiles]
    enrolled: int  # certificates issued in this run
    cached: int  # reused from the fleet folder
    retired: int  # cached devices replaced (revoked, on hold, expiring)
    seconds: float
    method: str


def est_certificate(body: bytes) -> x509.Certificate:
    """The certificate of an EST enroll or re-enroll answer: base64 of a certs-only PKCS#7
    (RFC 7030 §4.2.3); ValueError when it is not one."""
    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a base64 PKCS#7 certificate: {exc}") from None
    if not certs:
        raise ValueError("the PKCS#7 answer holds no certificate")
    return certs[0]


class Enroller(Protocol):
    method: str

    def enroll(self, requests: list[tuple[str, bytes]], out_dir: Path,
               progress: Progress) -> dict[str, str]:
        """Issue ``out_dir/<id>.pem`` for each (device id, CSR PEM); returns the refusals."""
        ...


class LibraryEnroller:
    """``Issuer.sign`` against the PKI folder: one registry transaction per chunk of CSRs."""

    method = "library"

    def __init__(self, pki: Path) -> None:
        self.pki = pki

    def enroll(self, requests: list[tuple[str, bytes]], out_dir: Path,
               progress: Progress) -> dict[str, str]:
        inputs = [CSRInput(device_id, pem) for device_id, pem in requests]
        with Authority(self.pki, actor="fleet-sim") as authority:
            results = authority.issuer().sign(
                inputs, SignOptions(out_dir=out_dir),
                progress=lambda chunk: progress(len(chunk)))
        return {r.source: r.reason or r.status for r in results
                if r.status not in ("issued", "existing")}


class ESTEnroller:
    """EST ``simpleenroll`` (RFC 7030 §4.2.1) with an enrollment token, a few at a time."""

    method = "est"

    def __init__(self, url: str, token: tuple[str, str], trust: Path, issuing_pem: bytes,
                 ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.trust = trust
        self.issuing_pem = issuing_pem

    def enroll(self, requests: list[tuple[str, bytes]], out_dir: Path,
               progress: Progress) -> dict[str, str]:
        return asyncio.run(self._enroll(requests, out_dir, progress))

    async def _enroll(self, requests: list[tuple[str, bytes]], out_dir: Path,
                      progress: Progress) -> dict[str, str]:
        import aiohttp  # noqa: PLC0415  (only this mode needs an HTTP client)

        context = ssl.create_default_context(cafile=str(self.trust))
        auth = aiohttp.BasicAuth(*self.token)
        refused: dict[str, str] = {}
        queue = list(reversed(requests))
        endpoint = f"{self.url}/.well-known/est/simpleenroll"

        async def one(session: aiohttp.ClientSession) -> None:
            while queue:
                device_id, pem = queue.pop()
                der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
                async with session.post(endpoint, data=base64.encodebytes(der), auth=auth,
                                        headers={"Content-Type": "application/pkcs10"}
                                        ) as response:
                    body = await response.read()
                if response.status != 200:
                    text = body.decode(errors="replace").strip()
                    refused[device_id] = f"HTTP {response.status}: {text}"
                else:
                    pem_out = est_certificate(body).public_bytes(serialization.Encoding.PEM)
                    (out_dir / f"{device_id}.pem").write_bytes(pem_out + self.issuing_pem)
                progress(1)

        connector = aiohttp.TCPConnector(limit=EST_CONCURRENCY, ssl=context)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                await asyncio.gather(*(one(session) for _ in range(EST_CONCURRENCY)))
        except aiohttp.ClientError as exc:
            raise UsageError(f"enrollment service failed: {exc}", self.url) from None
        return refused


@dataclass
class _State:
    fingerprint: str
    next_index: int
    devices: list[str]

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> _State:
        try:
            data = json.loads(path.read_text())
            if data.get("issuing_ca_sha256") == fingerprint:
                return cls(fingerprint, int(data["next_index"]), list(data["devices"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls(fingerprint, 1, [])

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"issuing_ca_sha256": self.fingerprint,
                                   "next_index": self.next_index,
                                   "devices": self.devices}, indent=1) + "\n")
        tmp.replace(path)


class FleetDir:
    """The cache of device keys and certificates for one PKI."""

    def __init__(self, root: Path, prefix: str = "sim-") -> None:
        self.root = root
        self.keys = root / "keys"
        self.certs = root / "certs"
        self.prefix = prefix

    def files(self, device_id: str) -> DeviceFiles:
        return DeviceFiles(device_id, self.certs / f"{device_id}.pem",
                           self.keys / f"{device_id}.key")

    def prepare(self, pki: Path, count: int, enroller: Enroller,
                progress: Callable[[int, int], None] | None = None) -> Enrollment:
        """*count* devices with valid certificates, reusing the cache, enrolling the rest."""
        start = time.perf_counter()
        for folder in (self.root, self.keys, self.certs):
            folder.mkdir(parents=True, exist_ok=True)
        chain = (pki / "issuing-ca.pem").read_bytes()
        state = _State.load(self.root / STATE, hashlib.sha256(chain).hexdigest())
        usable, rekey, retired, known = self._screen(pki, state.devices)
        for device_id in retired:
            self._retire(device_id)
        state.devices = [d for d in state.devices if d not in retired]
        chosen = [d for d in state.devices if d in usable or d in rekey][:count]
        requests: list[tuple[str, bytes]] = [
            (d, factory.csr_pem(d, factory.load_key(self.files(d).key)))
            for d in chosen if d in rekey]
        while len(chosen) < count:
            device_id = f"{self.prefix}{state.next_index:05d}"
            state.next_index += 1
            if device_id in known:  # another fleet folder's device on the same PKI
                continue
            key = factory.new_key()
            factory.write_key(self.files(device_id).key, key)
            requests.append((device_id, factory.csr_pem(device_id, key)))
            chosen.append(device_id)
            state.devices.append(device_id)
        done = len(chosen) - len(requests)
        if progress is not None:
            progress(done, count)

        def step(more: int) -> None:
            nonlocal done
            done += more
            if progress is not None:
                progress(done, count)

        refused = enroller.enroll(requests, self.certs, step) if requests else {}
        if refused:
            for device_id in refused:
                self._retire(device_id)
            state.devices = [d for d in state.devices if d not in refused]
            state.save(self.root / STATE)
            first_id, reason = next(iter(refused.items()))
            raise EnrollError(f"{len(refused)} of {len(requests)} CSRs were refused, first "
                              f"{first_id}: {reason}", enroller.method)
        state.save(self.root / STATE)
        return Enrollment([self.files(d) for d in chosen], len(requests),
                          len(chosen) - len(requests), len(retired),
                          time.perf_counter() - start, enroller.method)

    def _screen(self, pki: Path, ids: list[str],
                ) -> tuple[set[str], set[str], set[str], set[str]]:
        """(usable as cached, key kept but certificate to fetch again, to retire, every id
        the registry knows)."""
        usable: set[str] = set()
        rekey: set[str] = set()
        retired: set[str] = set()
        soon = dt.datetime.now(dt.UTC) + MIN_REMAINING
        try:
            with Authority(pki) as authority:
                registry = authority.registry
                status = {d.device_id: d.status for d in registry.devices()}
                mine = set(ids)
                for device_id in ids:
                    files = self.files(device_id)
                    if not files.key.is_file() or status.get(device_id, "active") != "active":
                        retired.add(device_id)
                        continue
                    try:
                        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
                    except (OSError, ValueError):
                        rekey.add(device_id)
                        continue
                    row = registry.certificate(serial_hex(cert.serial_number))
                    if (row is None or row.status not in ("active", "superseded")
                            or cert.not_valid_after_utc < soon):
                        retired.add(device_id)
                    else:
                        usable.add(device_id)
        except ProvisioningError as exc:
            raise UsageError(str(exc), "--pki") from None
        return usable, rekey, retired, set(status) - mine

    def _retire(self, device_id: str) -> None:
        files = self.files(device_id)
        files.key.unlink(missing_ok=True)
        files.cert.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
