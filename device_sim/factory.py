"""What a device does at the factory: make its own EC P-256 key and a CSR naming itself.

DESIGN section 1: the device key never leaves the device; the simulator plays the devices,
so it makes their keys here and keeps them in the fleet folder, mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DevicePrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> DevicePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_csr(device_id: str, key: DevicePrivateKey) -> x509.CertificateSigningRequest:
    """A PKCS#10 request with CN = device id, signed by the device's key (what openssl
    ``req -new -subj /CN=ID`` makes); the CA adds everything else from its profile."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256()))


def csr_pem(device_id: str, key: DevicePrivateKey) -> bytes:
    """:func:`new_csr` as PEM."""
    return new_csr(device_id, key).public_bytes(serialization.Encoding.PEM)


def key_pem(key: DevicePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key(path: Path, key: DevicePrivateKey) -> None:
    """Write a device key readable by its owner only, through a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key_pem(key))
    finally:
        os.close(fd)
    tmp.replace(path)


def load_key(path: Path) -> DevicePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path} is not an EC key")
    return key
