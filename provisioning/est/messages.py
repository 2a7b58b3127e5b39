"""What the enrollment service's HTTP process and its worker process say to each other.

The jobs a handler submits, the replies and snapshots that come back, the audit events, and
the few reply builders both sides use. Everything here is a plain, picklable value: it
crosses a pipe between two interpreters (:mod:`provisioning.est.channel` on the HTTP side,
:mod:`provisioning.est.engine` in the CA worker process).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning import der
from provisioning.registry.transactions import Transaction

ANONYMOUS = "est:anonymous"
SERVICE_ACTOR = "est:service"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
LOG_FORMAT = "fleet-provision serve: %(message)s"


# -- what handlers submit ------------------------------------------------------------------

@dataclass(frozen=True)
class TokenAuth:
    """HTTP Basic: user = token name, password = its secret (kept in memory only)."""

    name: str
    secret: str = field(repr=False)
    mac: bytes = field(repr=False)


@dataclass(frozen=True)
class CertAuth:
    """The TLS client certificate (DER), already verified against ca-chain.pem."""

    der: bytes = field(repr=False)


@dataclass(frozen=True)
class EnrollJob:
    body: bytes  # as received: base64 of a DER PKCS#10, decoded once the caller is known
    auth: TokenAuth | CertAuth
    renew: bool  # simplereenroll
    peer: str


@dataclass(frozen=True)
class OCSPJob:
    request_der: bytes


@dataclass(frozen=True)
class CRLJob:
    pass


@dataclass(frozen=True)
class FeedSignJob:
    """A fleet-state feed document's JWS signing input; the answer is the raw ``r || s``
    signature by the issuing key (:func:`provisioning.feed.jws.raw_signature`)."""

    signing_input: bytes = field(repr=False)
    # SHA-256 of the DER of the issuing CA the JWS header names (None: the current one);
    # during a rotation's overlap the worker holds both keys.
    signer: bytes | None = None


@dataclass(frozen=True)
class AuditEvent:
    time: str
    actor: str
    action: str
    device_id: str | None
    serial: str | None
    detail: dict[str, Any]


# -- what comes back -----------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """An HTTP answer plus what the audit record says about it (``reason`` is not shown)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    actor: str = ANONYMOUS
    device_id: str | None = None
    serial: str | None = None
    result: str = ""
    reason: str | None = None


@dataclass(frozen=True)
class NeedsVerification:
    """The token's secret has not been verified by this process yet: run scrypt on it."""

    stored_hash: str


@dataclass(frozen=True)
class CRLSnapshot:
    """``crl.pem`` as ``/crl`` serves it: the current issuer's CRL in DER (the first of the
    file), and the whole file (one PEM CRL per live issuing CA) for a client that accepts
    ``application/x-pem-file``; each with its own ETag."""

    der: bytes
    etag: str
    this_update: dt.datetime
    next_update: dt.datetime | None
    pem: bytes = field(default=b"", repr=False)
    pem_etag: str = ""


@dataclass(frozen=True)
class Statistics:
    """An immutable snapshot of the worker's counters."""

    batches: int
    jobs: int
    largest_batch: int
    signed: int


def b64_body(data: bytes) -> bytes:
    """Base64 in 64-character lines: what ``openssl base64 -d`` and RFC 2045 readers take."""
    return der.base64_lines(data) or b"\n"


def certs_only(certs: Iterable[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData (RFC 7030 4.1.3, 4.2.3), base64 for the wire."""
    return b64_body(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


_SIGNED_DATA = der.oid("1.2.840.113549.1.7.2")
_DATA = der.oid("1.2.840.113549.1.7.1")


def certs_only_der(certificate: bytes) -> bytes:
    """``pkcs7.serialize_certificates([cert], DER)`` for one certificate's DER, without
    parsing it (every enrollment answers with one; tests/provisioning/test_est.py compares):
    ContentInfo { signedData, [0] SignedData { version 1, digestAlgorithms {},
    encapContentInfo { data }, certificates [0] { cert }, signerInfos {} } }."""
    signed = der.sequence(der.integer(1), der.tlv(der.SET, b""), der.sequence(_DATA),
                          der.tlv(0xA0, certificate), der.tlv(der.SET, b""))
    return der.sequence(_SIGNED_DATA, der.explicit(0, signed))


def pem_der(pem: str) -> bytes:
    """The DER inside one PEM block (the text between the BEGIN and END lines)."""
    return binascii.a2b_base64(pem.split("-----")[2].encode("ascii"))


def text_reply(status: int, message: str, *, actor: str = ANONYMOUS, result: str,
          reason: str | None = None, device_id: str | None = None,
          serial: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, message.encode() + b"\n", "text/plain", headers, actor, device_id,
                 serial, result, reason or message)


@dataclass(frozen=True)
class Failed:
    """A job's exception, as text: exceptions need not survive pickling."""

    message: str


@dataclass(frozen=True)
class Issued:
    """A certificate for the HTTP process to wrap: the PKCS#7 reply is built there, so the
    worker, the busier of the two, spends its time on signing."""

    pem: str = field(repr=False)
    actor: str
    device_id: str | None
    serial: str | None
    result: str

    def reply(self) -> Reply:
        return Reply(200, b64_body(certs_only_der(pem_der(self.pem))), CERTS_ONLY,
                     (("Content-Transfer-Encoding", "base64"),), self.actor, self.device_id,
                     self.serial, self.result)


@dataclass(frozen=True)
class Setup:
    """What the worker process needs to open the same PKI as the HTTP process."""

    root: Path
    passphrase: bytes | None = field(repr=False)
    actor: str
    manifest: frozenset[str] | None
    token_key: bytes = field(repr=False)
    log_level: int


# Messages from the HTTP process, sent as lists (everything queued in one loop iteration):
#   ("job", id, job)  ("audit", event)  ("remember", name, stored_hash, mac)  ("stop",)
# and from the worker, one at a time:
#   ("ready",)  ("failed", message)  ("done", [(id, answer), ...], statistics)
#   ("stopped", statistics)


def write_audit_events(tx: Transaction, events: list[AuditEvent]) -> None:
    for e in events:
        tx.audit(e.time, e.action, e.device_id, e.serial, e.detail, actor=e.actor)


def unauthorized(reason: str) -> Reply:
    """401 with the challenge RFC 7235 requires; the reason is audited, not shown."""
    return text_reply(401, "authentication failed: unknown token or wrong secret",
                 result="unauthorized", reason=reason,
                 headers=(("WWW-Authenticate", 'Basic realm="fleet-est", charset="UTF-8"'),))


def forbidden(message: str, *, actor: str = ANONYMOUS, device_id: str | None = None,
               serial: str | None = None) -> Reply:
    return text_reply(403, message, actor=actor, result="forbidden", device_id=device_id,
                 serial=serial)


def decode_base64(body: bytes) -> bytes | None:
    """Strict base64 that tolerates line breaks and blanks anywhere (RFC 8951 section 3.1)."""
    compact = body.translate(None, b" \t\r\n")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
