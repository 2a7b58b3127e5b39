"""A second issuing CA under a PKI's root, made as ``issuing-ca rotate`` will (issue 14)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.pki import IssuingCA, load_private_key
from provisioning.profile import random_serial


def second_intermediate(pki: Path) -> IssuingCA:
    """A new issuing CA under the fleet's root, shaped like the first (EC P-256, pathlen 0)."""
    serial = random_serial()
    root_cert = x509.load_pem_x509_certificate((pki / "root-ca.pem").read_bytes())
    root_key = load_private_key(pki / "root-ca.key", None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Org"),
                                     x509.NameAttribute(NameOID.COMMON_NAME,
                                                        f"Issuing CA {serial:x}")]))
            .issuer_name(root_cert.subject).public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384()))
    return IssuingCA(cert=cert, key=key)
