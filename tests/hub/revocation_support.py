"""Helpers for the revocation tests: a real PKI, hand-made CRLs and a real CRL web server."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.pki import PKI, IssuingCA
from tests.provisioning.csrs import make_csr

TRUST_DOMAIN = "fleet.test"
ORG = "Test Org"


@dataclass
class Fleet:
    """A PKI folder with issued devices; ``serials`` maps device id -> certificate serial."""

    root: Path
    serials: dict[str, int] = field(default_factory=dict)

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def chain(self) -> Path:
        return self.root / "ca-chain.pem"

    def authority(self) -> Authority:
        return Authority(self.root)

    def issuing_ca(self) -> IssuingCA:
        return PKI(self.root).load_issuing_ca(None)

    def crl_number(self) -> int:
        crl = x509.load_pem_x509_crl(self.crl.read_bytes())
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    def issue(self, *device_ids: str, group: str | None = None) -> None:
        with self.authority() as auth:
            results = auth.issuer().sign(
                [CSRInput(f"{d}.csr", make_csr(cn=d)) for d in device_ids],
                SignOptions(group=group))
        for result in results:
            assert result.status == "issued", result.reason
            assert result.device_id is not None
            assert result.serial is not None
            self.serials[result.device_id] = int(result.serial, 16)


def make_fleet(tmp_path: Path, *device_ids: str) -> Fleet:
    root = tmp_path / "pki"
    initialize(root, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG), None)
    fleet = Fleet(root)
    if device_ids:
        fleet.issue(*device_ids)
    return fleet


def make_crl(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    number: int | None,
    revoked: Iterable[tuple[int, x509.ReasonFlags | None]] = (),
    *,
    next_update: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL built by hand: any signer, any number, any nextUpdate (default: in a day)."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now - dt.timedelta(hours=2))
        .next_update(next_update or now + dt.timedelta(days=1))
    )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256())


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER)


class CrlServer:
    """A real aiohttp server on 127.0.0.1, port 0, serving ``body`` at /crl with an ETag.

    ``status`` forces an error answer; ``requests`` and ``not_modified`` count what it saw,
    ``accepts`` the Accept header of each request.
    """

    def __init__(self, body: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.status: int | None = None
        self.requests = 0
        self.not_modified = 0
        self.accepts: list[str | None] = []
        self._tls = tls
        app = web.Application()
        app.router.add_get("/crl", self._crl)
        self._runner = web.AppRunner(app)
        self.url = ""

    async def _crl(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.accepts.append(request.headers.get("Accept"))
        if self.status is not None:
            return web.Response(status=self.status)
        etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=self.body, content_type="application/pkix-crl",
                            headers={"ETag": etag})

    async def start(self) -> CrlServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"{'https' if self._tls else 'http'}://{host}:{port}/crl"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()
