"""Feed documents as the hub accepts them: signed by a ``client_ca`` CA, for this gateway, forward.

A document (:mod:`provisioning.registry.feeddoc`, a flattened JWS) is accepted only if, in
this order (the first failure names the refusal):

- ``envelope``: it parses as the feed's JWS, with ``typ`` ``fleet-state+json``, ``alg``
  ES256 or ES384 and an ``x5c`` certificate;
- ``signer``: ``x5c[0]`` is byte for byte a CA certificate (BasicConstraints ca=True) of the
  hub's ``client_ca`` bundle, or a CA certificate in its validity directly signed by a root
  of that bundle (an issuing CA made by ``issuing-ca rotate`` that ``client_ca`` does not list
  yet: contract C1, :mod:`~hub.revocation.feed_issuers`). A device certificate also chains to
  the CA, so chaining is not enough: only a CA's own key may sign the fleet's state;
- ``signature``: the signature (RFC 7518 section 3.4: ``r || s``, not DER) verifies with that
  certificate's key on the curve the ``alg`` names;
- ``format``: :func:`~provisioning.registry.feeddoc.parse_document` accepts the payload;
- ``trust-domain``, ``gateway``: it is the hub's fleet and names this gateway (the ``<name>``
  of its feed certificate's ``spiffe://<domain>/gateway/<name>``);
- ``rollback``: a snapshot's version is not below the version in force;
- ``replay``: its ``issued`` is strictly later than the last accepted document's.

A delta whose base is not the version in force is a gap
(:class:`~hub.errors.FeedGapError`): not a refusal, the hub asks for a snapshot. A refusal is
a :class:`~hub.errors.FeedRefusedError` naming its reason. Everything here is CPU work (JSON of
a whole fleet, an ECDSA check): the feed source calls it from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from hub.errors import FeedGapError, FeedRefusedError
from hub.revocation.feed_issuers import is_ca, under_root
from provisioning.registry.feeddoc import (
    JWS_TYPE,
    Document,
    FeedFormatError,
    decode_jws,
    parse_document,
)

__all__ = ["REASONS", "FeedGapError", "FeedRefusedError", "FeedVerifier", "issued_time"]

REASONS: Final = ("envelope", "signer", "signature", "format", "trust-domain", "gateway",
                  "rollback", "replay")
# alg -> (curve, hash, bytes of r and of s): RFC 7518 section 3.4.
_ALGORITHMS: Final[dict[str, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm], int]]] = {
    "ES256": (ec.SECP256R1, hashes.SHA256, 32),
    "ES384": (ec.SECP384R1, hashes.SHA384, 48),
}


def issued_time(issued: str) -> dt.datetime:
    """A document's ``issued`` (ISO 8601 UTC, checked by parse_document) as a datetime."""
    return dt.datetime.fromisoformat(issued)


def _signers(ca_certs: Sequence[x509.Certificate]) -> dict[bytes, x509.Certificate]:
    return {cert.public_bytes(Encoding.DER): cert for cert in ca_certs if is_ca(cert)}


class FeedVerifier:
    """Checks documents for one gateway of one trust domain against the ``client_ca`` CAs."""

    def __init__(self, ca_certs: Sequence[x509.Certificate], trust_domain: str,
                 gateway: str) -> None:
        self.trust_domain = trust_domain
        self.gateway = gateway
        self._cas = tuple(ca_certs)
        self._signers = _signers(ca_certs)

    @property
    def ca_certs(self) -> tuple[x509.Certificate, ...]:
        """The client_ca certificates documents are checked against now."""
        return self._cas

    def replace(self, ca_certs: Sequence[x509.Certificate]) -> None:
        """Accept signers from *ca_certs* from now on (a reloaded client_ca); one reference
        swapped, so a check running in a worker thread sees the old set or the new one."""
        self._cas, self._signers = tuple(ca_certs), _signers(ca_certs)

    def check(self, body: bytes, version: int, last_issued: str | None) -> Document:
        """The document in *body* if it may follow *version* (0: none yet) and a document
        issued at *last_issued*; FeedRefusedError or FeedGapError otherwise."""
        doc = self.verify(body)
        if doc.snapshot:
            if doc.version < version:
                raise FeedRefusedError("rollback", f"snapshot version {doc.version} is below "
                                  f"version {version} in force")
        elif doc.base != version:
            raise FeedGapError(f"delta from version {doc.base} to {doc.version} does not build on "
                          f"version {version} in force")
        if last_issued is not None and issued_time(doc.issued) <= issued_time(last_issued):
            raise FeedRefusedError("replay", f"issued {doc.issued}, not after {last_issued} of the "
                              "last document accepted")
        return doc

    def verify(self, body: bytes) -> Document:
        """The signed, well-formed document for this gateway in *body* (no version rules)."""
        try:
            header, payload, signing_input, signature = decode_jws(body)
        except FeedFormatError as exc:
            raise FeedRefusedError("envelope", str(exc)) from None
        alg, signer = self._header(header)
        curve, digest, size = _ALGORITHMS[alg]
        key = signer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
            raise FeedRefusedError("signature", f"{alg} needs a {curve.name} key; the signer's is "
                              f"{getattr(key, 'curve', key).__class__.__name__}")
        if len(signature) != 2 * size:
            raise FeedRefusedError("signature", f"{alg} signature of {len(signature)} bytes; want "
                              f"r || s, {2 * size} bytes")
        der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                   int.from_bytes(signature[size:], "big"))
        try:
            key.verify(der, signing_input, ec.ECDSA(digest()))
        except InvalidSignature:
            raise FeedRefusedError("signature", "the signature does not verify with the signer's "
                              "key") from None
        try:
            doc = parse_document(payload)
        except FeedFormatError as exc:
            raise FeedRefusedError("format", str(exc)) from None
        if doc.trust_domain != self.trust_domain:
            raise FeedRefusedError("trust-domain", f"document for trust domain {doc.trust_domain!r}"
                              f", the hub's is {self.trust_domain!r}")
        if doc.gateway != self.gateway:
            raise FeedRefusedError("gateway", f"document served to gateway {doc.gateway!r}, this "
                              f"is {self.gateway!r}")
        return doc

    def _header(self, header: dict[str, object]) -> tuple[str, x509.Certificate]:
        alg, typ, chain = header.get("alg"), header.get("typ"), header.get("x5c")
        if typ != JWS_TYPE:
            raise FeedRefusedError("envelope", f"want typ {JWS_TYPE!r}, got {typ!r}")
        if not isinstance(alg, str) or alg not in _ALGORITHMS:
            raise FeedRefusedError("envelope", f"want alg ES256 or ES384, got {alg!r}")
        if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
            raise FeedRefusedError("envelope", "want x5c, a list of base64 certificates")
        try:
            der = base64.b64decode(chain[0], validate=True)
        except (binascii.Error, ValueError):
            raise FeedRefusedError("envelope", "x5c[0] is not base64") from None
        signer = self._signers.get(der)
        if signer is None:
            signer = self._under_root(der)
        return alg, signer

    def _under_root(self, der: bytes) -> x509.Certificate:
        """A signer client_ca does not list: taken when a root of client_ca made it a CA."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise FeedRefusedError("signer", "x5c[0] is not a certificate") from None
        why = under_root(cert, self._cas, dt.datetime.now(dt.UTC))
        if why is not None:
            raise FeedRefusedError("signer", f"x5c[0] is not a CA certificate of client_ca nor "
                                   f"one a root of client_ca signed: {why} (a device or "
                                   "foreign certificate may not sign the feed)")
        return cert
