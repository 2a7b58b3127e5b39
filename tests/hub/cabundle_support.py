"""A second issuing CA under a PKI's root, made as ``issuing-ca rotate`` will (issue 14), and
device certificates from it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sim.factory import new_key, write_key
from device_sim.lab import Enrolled
from provisioning.config import load_config
from provisioning.pki import IssuingCA, load_private_key
from provisioning.profile import device_certificate, random_serial
from provisioning.serial import format_serial


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


def leaf_from(pki: Path, ca: IssuingCA, device_id: str, out: Path, *, chain: bool = False,
              lifetime: dt.timedelta = dt.timedelta(days=1)) -> Enrolled:
    """A device certificate of the fleet's profile from *ca*, written to *out* alone (or
    followed by *ca*'s certificate, as ``sign`` writes them), with its own new key."""
    key = new_key()
    key_path = out / f"{device_id}.key"
    write_key(key_path, key)
    now = dt.datetime.now(dt.UTC)
    cert = device_certificate(ca, load_config(pki / "pki.toml"), device_id, key.public_key(),
                              random_serial(), now - dt.timedelta(minutes=5), now + lifetime)
    path = out / f"{device_id}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                     + (ca.cert.public_bytes(serialization.Encoding.PEM) if chain else b""))
    return Enrolled(device_id, path, key_path, format_serial(cert.serial_number))
