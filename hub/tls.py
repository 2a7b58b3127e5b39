"""The listener's TLS: a client certificate is required, and a failed handshake says why.

The listener hand-shakes accepted sockets itself (:mod:`hub.listener`) instead of
``start_server(ssl=...)``: that way the hub sees *why* OpenSSL refused a client (expired,
unknown issuer, wrong EKU, no certificate) and can audit it, where asyncio would only log it
at debug level. :func:`client_hello_size` reads the first record's header, so the listener
spends a handshake slot only on a ClientHello that has fully arrived.

The context carries the intermediates a device certificate may come from
(:attr:`ServerContext.allowed_issuers`, :mod:`hub.issuers`), built from the same bytes as its
trust store: a reloaded bundle swaps both in one reference.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from cryptography import x509

from hub.config import ListenerConfig
from hub.identity import DeviceIdentity
from hub.issuers import AllowedIssuers, allowed_issuers

RECORD_HEADER_BYTES = 5  # content type, legacy version (2), length (2): RFC 8446 section 5.1
# The largest record a peer may send: TLSCiphertext's bound (RFC 8446 section 5.2). A
# ClientHello is a few hundred bytes (about 1.8 KB with an ML-KEM key share).
MAX_RECORD_BYTES = 16384 + 2048
_HANDSHAKE_RECORD = 0x16
_CLIENT_HELLO = 0x01

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) mapped to the hub's refusal reasons.
_VERIFY_REASONS = {
    9: "not-yet-valid",  # X509_V_ERR_CERT_NOT_YET_VALID
    10: "expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    26: "wrong-eku",  # X509_V_ERR_INVALID_PURPOSE
}


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    """Why a TLS handshake failed: a reason code for the audit store and OpenSSL's words."""

    reason: str
    detail: str
    # Who the certificate names, when the refusal came after the handshake (unknown-issuer).
    identity: DeviceIdentity | None = None


class ServerContext(ssl.SSLContext):
    """The listener's context and the issuers its trust allows (None: any under a root)."""

    allowed_issuers: AllowedIssuers = None


def server_context(listener: ListenerConfig, cadata: str | None = None) -> ServerContext:
    """Certificate required, verified against ``client_ca`` (or *cadata*, the PEM text of the
    bundle in force: :mod:`hub.cabundle`); TLS 1.2 at the least. Blocking (reads and parses
    the bundle): call it at start or from a worker thread."""
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = listener.min_tls_version
    context.verify_mode = ssl.CERT_REQUIRED
    if cadata is None:
        context.load_verify_locations(cafile=str(listener.client_ca))
        pem = listener.client_ca.read_bytes()
    else:
        context.load_verify_locations(cadata=cadata)
        pem = cadata.encode("ascii")
    context.allowed_issuers = allowed_issuers(x509.load_pem_x509_certificates(pem))
    context.load_cert_chain(str(listener.server_cert), str(listener.server_key))
    context.options |= ssl.OP_NO_COMPRESSION
    # Every CA in client_ca is a trust anchor: the chain stops at the issuing CA instead of
    # re-verifying the root's signature on it at every handshake (about 40% of the broker's
    # CPU per connect). The file is the operator's statement of trust either way; validity
    # periods and the device certificate's own signature are still checked.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # No TLS 1.3 session tickets: each costs a copy and re-parse of the client certificate,
    # and devices reconnect rarely enough that resumption would not pay for it.
    context.num_tickets = 0
    return context


def classify(exc: BaseException) -> HandshakeRefusal:
    """Map an exception from the server-side handshake to a refusal reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(exc.verify_code, "untrusted")
        return HandshakeRefusal(reason, exc.verify_message or str(exc))
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or str(exc)
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
            return HandshakeRefusal("no-certificate", "client sent no certificate")
        return HandshakeRefusal("tls-error", text)
    if isinstance(exc, TimeoutError):
        return HandshakeRefusal("handshake-timeout", "TLS handshake did not finish in time")
    return HandshakeRefusal("tls-error", f"{type(exc).__name__}: {exc}")


def client_hello_size(head: bytes) -> int | HandshakeRefusal:
    """Bytes (header included) of the first record a client sends, from at least its header.

    A refusal when the bytes cannot open a TLS connection: not a handshake record (plain MQTT on
    the TLS port starts with 0x10), a length no record may have, or a handshake message that is
    not a ClientHello (checked once the record's first byte is in *head*).
    """
    if head[0] != _HANDSHAKE_RECORD or head[1] != 3:
        return HandshakeRefusal("tls-error",
                                f"not a TLS handshake record (starts {head[:3].hex()})")
    length = int.from_bytes(head[3:5], "big")
    if not 0 < length <= MAX_RECORD_BYTES:
        return HandshakeRefusal("tls-error", f"first TLS record of {length} bytes; want 1 to "
                                f"{MAX_RECORD_BYTES}")
    if len(head) > RECORD_HEADER_BYTES and head[RECORD_HEADER_BYTES] != _CLIENT_HELLO:
        return HandshakeRefusal("tls-error", "first handshake message is not a ClientHello "
                                f"(type {head[RECORD_HEADER_BYTES]})")
    return RECORD_HEADER_BYTES + length
