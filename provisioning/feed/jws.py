"""The feed's JWS signature (RFC 7515, ES256/ES384 of RFC 7518 section 3.4): the protected
header that names the signer, and the raw ``r || s`` signature over the signing input.

The CA worker process (:mod:`provisioning.est.engine`, the only holder of the issuing key)
calls :func:`raw_signature`; the HTTP side builds the header from the issuing certificate.
ECDSA as cryptography (OpenSSL) makes it is DER (``SEQUENCE {r, s}``); JWS wants both
integers as fixed-width big-endian octets, so any JOSE library verifies it.
"""

from __future__ import annotations

import base64
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from provisioning.registry.feeddoc import JWS_TYPE, b64url

__all__ = ["algorithm", "envelope", "header", "raw_signature", "verify"]

# curve name -> (JWS alg, hash, octets per integer)
_ALGORITHMS: Final = {
    "secp256r1": ("ES256", hashes.SHA256, 32),
    "secp384r1": ("ES384", hashes.SHA384, 48),
}


def _params(curve: ec.EllipticCurve) -> tuple[str, type[hashes.HashAlgorithm], int]:
    try:
        return _ALGORITHMS[curve.name]
    except KeyError:
        raise ValueError(f"no JWS algorithm for the curve {curve.name}; want P-256 or "
                         "P-384") from None


def algorithm(cert: x509.Certificate) -> str:
    """``ES256`` or ``ES384`` for the certificate's EC key."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the signer's key is not an EC key")  # noqa: TRY004
    return _params(key.curve)[0]


def header(cert: x509.Certificate) -> dict[str, Any]:
    """The protected header: ``alg``, ``typ`` and the signer's certificate (``x5c``, RFC 7515
    4.1.6: standard base64 of the DER, not base64url)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return {"alg": algorithm(cert), "typ": JWS_TYPE,
            "x5c": [base64.b64encode(der).decode("ascii")]}


def envelope(signing_input: bytes, signature: bytes) -> bytes:
    """``encode_jws(header, payload, signature)[1]`` from the signing input it returned: the
    same bytes, without encoding a snapshot's megabytes a second time (base64url needs no
    JSON escaping)."""
    protected, _, payload = signing_input.partition(b".")
    return b"".join((b'{"protected":"', protected, b'","payload":"', payload,
                     b'","signature":"', b64url(signature).encode("ascii"), b'"}'))


def raw_signature(key: ec.EllipticCurvePrivateKey, signing_input: bytes) -> bytes:
    """ECDSA over *signing_input*, as JWS carries it: ``r || s``."""
    _, hash_type, size = _params(key.curve)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hash_type())))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify(key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes) -> bool:
    """True when *signature* (``r || s``) is *key*'s over *signing_input*."""
    _, hash_type, size = _params(key.curve)
    if len(signature) != 2 * size:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                               int.from_bytes(signature[size:], "big"))
    try:
        key.verify(der, signing_input, ec.ECDSA(hash_type()))
    except InvalidSignature:
        return False
    return True
