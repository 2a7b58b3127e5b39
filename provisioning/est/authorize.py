"""Engine side: who is asking for a certificate, and the reply to a signing result.

Runs in the CA worker process (:mod:`provisioning.est.engine`), next to the registry: an
enrollment token is checked against the registry's rows (:class:`TokenBook`), a client
certificate against the certificate the registry issued under that serial, its status and
its device's. A refusal is a :class:`Reply` naming the caller, never an exception.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509

from provisioning.est.messages import (
    CertAuth,
    EnrollJob,
    Issued,
    NeedsVerification,
    Reply,
    decode_base64,
    forbidden,
    text_reply,
    unauthorized,
)
from provisioning.issuer import SignResult
from provisioning.registry.schema import DEVICE_ACTIVE, REFUSED_CERT_STATUSES
from provisioning.registry.store import Registry
from provisioning.serial import format_serial
from provisioning.timefmt import iso, utcnow
from provisioning.tokens import TokenBook, TokenCheck


@dataclass(frozen=True)
class Principal:
    """Who an enrollment is for: the audit actor, and the serial a renewal replaces."""

    actor: str
    renews: str | None = None


class Authorizer:
    """Decides each enrollment job's principal from its token or client certificate."""

    def __init__(self, tokens: TokenBook, registry: Registry,
                 stations: frozenset[str]) -> None:
        self.tokens = tokens
        self._registry = registry
        self._stations = stations

    def authorize(self, job: EnrollJob) -> Principal | Reply | NeedsVerification:
        auth = job.auth
        if isinstance(auth, CertAuth):
            return self.cert_principal(auth.der, renew=job.renew)
        verdict, stored = self.tokens.check(auth.name, auth.mac)
        if verdict is TokenCheck.OK:
            return Principal(f"est:token:{auth.name}")
        if verdict is TokenCheck.VERIFY:
            assert stored is not None  # noqa: S101
            return NeedsVerification(stored)
        return unauthorized(f"token {auth.name!r} is {verdict.value}")

    def cert_principal(self, der: bytes, *, renew: bool) -> Principal | Reply:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return forbidden("the client certificate cannot be parsed")
        serial = format_serial(cert.serial_number)
        now = utcnow()
        # TLS leaves validity times to us (est/serve.py) so the client hears why, not a bare
        # alert.
        if now > cert.not_valid_after_utc:
            return forbidden(f"client certificate {serial} expired at "
                              f"{iso(cert.not_valid_after_utc)}", serial=serial)
        if now < cert.not_valid_before_utc:
            return forbidden(f"client certificate {serial} is not valid before "
                              f"{iso(cert.not_valid_before_utc)}", serial=serial)
        holder = self._registry.certificate_holder(serial)
        if holder is None or holder.fingerprint != hashlib.sha256(der).hexdigest():
            return forbidden(f"client certificate {serial} is not a device certificate of "
                              "this CA's registry", serial=serial)
        device_id, cert_status = holder.device_id, holder.status
        device_status, group = holder.device_status, holder.group
        actor = f"est:cert:{device_id}"
        if cert_status in REFUSED_CERT_STATUSES:
            return forbidden(f"client certificate {serial} is {cert_status.replace('_', ' ')}",
                              actor=actor, device_id=device_id, serial=serial)
        if device_status != DEVICE_ACTIVE:
            return forbidden(f"device {device_id!r} is {device_status}", actor=actor,
                              device_id=device_id, serial=serial)
        if renew:
            return Principal(actor, renews=serial)
        if group not in self._stations:
            return forbidden(f"device {device_id!r} (group {group or 'none'}) is not a factory "
                              "station: want a group listed in pki.toml station_groups (a "
                              "device renews its own certificate with simplereenroll)",
                              actor=actor, device_id=device_id, serial=serial)
        return Principal(actor)


def csr_der(body: bytes, who: Principal) -> bytes | Reply:
    der = decode_base64(body)
    if der is None:
        return text_reply(400, "malformed base64: want the base64 of a DER PKCS#10 request",
                     actor=who.actor, result="refused", reason="malformed base64")
    if not der:
        return text_reply(400, "empty body: want the base64 of a DER PKCS#10 request",
                     actor=who.actor, result="refused", reason="empty body")
    return der


def enrollment_reply(result: SignResult, who: Principal) -> Issued | Reply:
    if result.status != "rejected" and result.pem is not None:
        return Issued(result.pem, who.actor, result.device_id, result.serial, result.status)
    reason = result.reason or "rejected"
    # A renewal refused because the presented certificate is revoked, held or no longer the
    # device's active one (superseded: renewed already) is a 403; the CSR's fault (a key
    # the device has used before, another device id) a 400.
    status = 403 if reason.startswith(("renew-revoked", "renew-on-hold",
                                       "renew-not-active")) else 400
    return text_reply(status, reason, actor=who.actor, result="rejected",
                 device_id=result.device_id)
