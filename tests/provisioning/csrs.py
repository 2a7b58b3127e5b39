"""Real CSRs, good and bad, made the way devices (or attackers) make them."""

from __future__ import annotations

import base64
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

KEY_MAKERS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "rsa1024": lambda: rsa.generate_private_key(65537, 1024),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "dsa": lambda: dsa.generate_private_key(2048),
}

PrivateKey = (ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
              | rsa.RSAPrivateKey | dsa.DSAPrivateKey)


def make_key(kind: str = "p256") -> PrivateKey:
    return KEY_MAKERS[kind]()  # type: ignore[no-any-return]


def make_csr(
    cn: str | None = "dev-1",
    key: PrivateKey | None = None,
    *,
    san: list[x509.GeneralName] | None = None,
    ca: bool | None = None,
    extra_cns: tuple[str, ...] = (),
    organisation: str | None = None,
    key_usage_cert_sign: bool = False,
    der: bool = False,
) -> bytes:
    """A signed PKCS#10 request; every keyword is something a device might ask for."""
    key = key or make_key("p256")
    attrs = []
    if organisation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    if cn is not None:
        # _validate=False lets a test build the over-long CN a broken device might send.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False))
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, c) for c in extra_cns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                        critical=True)
    if key_usage_cert_sign:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) \
        else hashes.SHA256()
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    return csr.public_bytes(encoding)


def tamper(pem: bytes, old: bytes = b"dev-1", new: bytes = b"dev-9") -> bytes:
    """Change the subject after signing, as an attacker would: the signature no longer fits."""
    csr = x509.load_pem_x509_csr(pem)
    der = csr.public_bytes(serialization.Encoding.DER)
    assert old in der
    b64 = base64.encodebytes(der.replace(old, new, 1)).decode().replace("\n", "")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines)
            + "\n-----END CERTIFICATE REQUEST-----\n").encode()
