"""One renewal over EST ``simplereenroll`` (RFC 7030 §4.2.2): a new key, a CSR, mutual TLS.

The device proves who it is with the certificate it is renewing (the TLS client
certificate), so no token or password is involved. The caller brings the **new key**: a key
the device has not used before (the CA refuses one it has, ``renew-key-reused``). After an
attempt that got no answer the caller sends the same key again: the CA may have issued the
certificate and superseded the current one, and then answers the same key with that
certificate, but a new key with ``403 renew-not-active`` (the device would be stranded).

The answer is a base64 PKCS#7 holding the new certificate (:func:`device_sim.enroll.
est_certificate`); the device presents it with its issuing CA, picked from its trust bundle
by name, so a certificate from a new issuing CA (after an issuing-CA rotation) carries the
right one.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim import factory
from device_sim.enroll import est_certificate
from device_sim.errors import RenewalError

REENROLL_PATH = "/.well-known/est/simplereenroll"
PKCS10 = "application/pkcs10"
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Renewed:
    """The new identity: certificate, its chain as the device presents it, and the new key."""

    cert: x509.Certificate
    chain_pem: bytes  # the new certificate, then its issuing CA
    key: factory.DevicePrivateKey

    @property
    def key_pem(self) -> bytes:
        return factory.key_pem(self.key)


def issuer_of(cert: x509.Certificate, bundle: list[x509.Certificate]) -> x509.Certificate | None:
    """The certificate in *bundle* whose subject is *cert*'s issuer (None: not there)."""
    return next((ca for ca in bundle if ca.subject == cert.issuer), None)


class ESTRenewal:
    """Renews through the EST service at *url*, trusting *trust* (ca-chain.pem) for its
    certificate. One :class:`aiohttp.ClientSession` is shared by every device of a process;
    each request carries the device's own TLS context (its current certificate and key)."""

    def __init__(self, url: str, trust: Path, session: aiohttp.ClientSession) -> None:
        self.endpoint = url.rstrip("/") + REENROLL_PATH
        self.trust = trust
        self.bundle = x509.load_pem_x509_certificates(trust.read_bytes())
        self.session = session

    def _context(self, cert: Path, key: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.trust))
        context.load_cert_chain(cert, key)
        return context

    async def renew(self, device_id: str, cert: Path, key: Path,
                    new_key: factory.DevicePrivateKey) -> Renewed:
        """A certificate for *new_key*, authenticated by *cert*/*key* (the device's current
        ones). RenewalError with the service's answer (``answered``) or without one."""
        csr = factory.new_csr(device_id, new_key).public_bytes(serialization.Encoding.DER)
        try:
            context = self._context(cert, key)
            async with self.session.post(
                    self.endpoint, data=base64.encodebytes(csr), ssl=context,
                    headers={"Content-Type": PKCS10},
                    timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as response:
                body = await response.read()
        except (OSError, ssl.SSLError) as exc:
            raise RenewalError(f"cannot reach the EST service: {exc}", self.endpoint,
                               answered=False) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RenewalError(f"EST request failed: {exc!r}", self.endpoint,
                               answered=False) from None
        if response.status != 200:
            text = body.decode(errors="replace").strip()[:200]
            # 5xx: the service failed, perhaps after issuing; 4xx: refused, nothing issued.
            raise RenewalError(f"HTTP {response.status}: {text}", self.endpoint,
                               answered=response.status < 500)
        try:
            new_cert = est_certificate(body)
        except ValueError as exc:
            raise RenewalError(str(exc), self.endpoint) from None
        if new_cert.public_key() != new_key.public_key():
            raise RenewalError("the certificate returned is not for the key sent",
                               self.endpoint)
        chain = new_cert.public_bytes(serialization.Encoding.PEM)
        issuer = issuer_of(new_cert, self.bundle)
        if issuer is not None:
            chain += issuer.public_bytes(serialization.Encoding.PEM)
        return Renewed(new_cert, chain, new_key)
