"""weak-key: a device certificate whose key the policy no longer allows.

RSA below ``[checks] min_rsa_bits`` (default 2048), an EC key on a curve not in ``curves``
(default P-256, P-384, P-521), or a key type the hub does not know to be sound (DSA). Ed25519
and Ed448 pass. The certificate is parsed here, in a worker thread after the accept (the
engine batches the serials it has not seen yet), never on the CONNECT path.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa


def key_problem(der: bytes, min_rsa_bits: int,
                curves: Collection[str]) -> dict[str, object] | None:
    """The evidence of a weak key in the certificate *der*; None when the key is fine."""
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except (ValueError, TypeError) as exc:  # an algorithm cryptography cannot load
        return {"algorithm": "unknown", "problem": str(exc)}
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < min_rsa_bits:
            return {"algorithm": "RSA", "bits": key.key_size, "min_rsa_bits": min_rsa_bits}
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in curves:
            return {"algorithm": "EC", "curve": key.curve.name, "curves": sorted(curves)}
        return None
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return None
    return {"algorithm": type(key).__name__, "problem": "key type not allowed"}
