"""The OCSP responder (RFC 6960): the registry's word on one certificate, signed by the CA.

Responses are signed by the issuing CA itself (RFC 6960 4.2.2.2: the CA that issued the
certificate is an authorised responder), identified by the hash of its key. During an
``issuing-ca rotate`` overlap both live issuing CAs answer, each for its own certificates
(the request's issuer hashes pick it; the registry's ``issuer_key_id`` must agree). A
request for a certificate of another issuer (a retired one included), or a serial this CA
never issued, is answered ``unknown`` (RFC 6960 2.2), signed by the current issuing CA.
A request that cannot be parsed gets the ``malformedRequest`` response status (RFC 6960
2.3). cryptography parses requests for exactly one certificate, which is what ``openssl
ocsp -cert`` and TLS stapling clients send; a multi-certificate request is
answered ``malformedRequest`` too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from provisioning.crl import REASONS
from provisioning.pki import IssuingCA
from provisioning.serial import format_serial
from provisioning.timefmt import parse_iso

# How long a client may rely on an answer (nextUpdate); short, so a revocation shows soon.
VALIDITY = dt.timedelta(minutes=10)
CONTENT_TYPE = "application/ocsp-response"

# serial (hex) -> (status, revoked_at, reason, issuer_key_id) from the registry, or None
# when unknown (Registry.issued_status); issuer_key_id None: from before v4, one issuer.
Lookup = Callable[[str], tuple[str, str | None, str | None, str | None] | None]


@dataclass(frozen=True)
class Answer:
    """The DER response and what to audit about it."""

    der: bytes
    result: str  # good | revoked | unknown | malformed
    serial: str | None = None
    nonce: bool = False


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512}


def _digest(algorithm: str, data: bytes) -> bytes:
    h = hashes.Hash(_HASHES[algorithm]())
    h.update(data)
    return h.finalize()


def malformed() -> Answer:
    """The ``malformedRequest`` response status: unsigned, no response bytes (RFC 6960 2.3)."""
    response = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    return Answer(response.public_bytes(serialization.Encoding.DER), "malformed")


class _Issuer:
    """One issuing CA as a responder knows it: its hashes under each algorithm."""

    def __init__(self, ca: IssuingCA) -> None:
        self.ca = ca
        self._name = ca.cert.subject.public_bytes()
        # The key hash covers the subjectPublicKey BIT STRING's value: for EC, the point.
        self._key = ca.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        self._hashes: dict[str, tuple[bytes, bytes]] = {}

    def hashes(self, algorithm: str) -> tuple[bytes, bytes]:
        """(issuerNameHash, issuerKeyHash) of the CA under *algorithm* (RFC 6960 4.1.1)."""
        found = self._hashes.get(algorithm)
        if found is None:
            found = (_digest(algorithm, self._name), _digest(algorithm, self._key))
            self._hashes[algorithm] = found
        return found


class Responder:
    """Answers DER OCSPRequests for the live issuing CAs (*ca*, the current one, and the
    retiring *others*) from a registry *lookup*."""

    def __init__(self, ca: IssuingCA, lookup: Lookup,
                 others: tuple[IssuingCA, ...] = ()) -> None:
        self.ca = ca
        self.lookup = lookup
        self._issuers = [_Issuer(c) for c in (ca, *others)]

    def _issuer(self, algorithm: str, name_hash: bytes, key_hash: bytes) -> IssuingCA | None:
        for issuer in self._issuers:
            if issuer.hashes(algorithm) == (name_hash, key_hash):
                return issuer.ca
        return None

    def respond(self, request_der: bytes, now: dt.datetime) -> Answer:
        """Answer one DER OCSPRequest."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
            name_hash, key_hash = request.issuer_name_hash, request.issuer_key_hash
            serial_number = request.serial_number
            extensions = request.extensions
        except (ValueError, UnsupportedAlgorithm, NotImplementedError):
            # NotImplementedError: cryptography refuses requests for several certificates.
            return malformed()
        if algorithm.name not in _HASHES:
            return malformed()
        serial = format_serial(serial_number)
        issuer = self._issuer(algorithm.name, name_hash, key_hash)
        row = self.lookup(serial) if issuer is not None else None
        if row is not None and row[3] is not None and issuer is not None \
                and row[3] != issuer.key_id:
            row = None  # that serial is the other live CA's
        signer = issuer or self.ca
        status, result = ocsp.OCSPCertStatus.UNKNOWN, "unknown"
        revoked_at: dt.datetime | None = None
        reason: x509.ReasonFlags | None = None
        if row is not None:
            state, when, why, _ = row
            if state in ("active", "superseded"):
                status, result = ocsp.OCSPCertStatus.GOOD, "good"
            elif state in ("revoked", "on_hold") and when is not None:
                status, result = ocsp.OCSPCertStatus.REVOKED, "revoked"
                revoked_at = parse_iso(when)
                flag = REASONS["certificateHold"] if state == "on_hold" else REASONS.get(
                    why or "unspecified", x509.ReasonFlags.unspecified)
                # As in the CRL (RFC 5280 5.3.1): "unspecified" is said by leaving it out.
                reason = None if flag is x509.ReasonFlags.unspecified else flag
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(name_hash, key_hash, serial_number, algorithm, status,
                                  now, now + VALIDITY, revoked_at, reason)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
        )
        nonce = _nonce(extensions)
        if nonce is not None:  # RFC 6960 4.4.1: echo the client's nonce
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        response = builder.sign(signer.key, hashes.SHA256())
        return Answer(response.public_bytes(serialization.Encoding.DER), result, serial,
                      nonce is not None)


def _nonce(extensions: x509.Extensions) -> bytes | None:
    try:
        return extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None
