"""Signed checkpoints: what lets old audit records go while the chain stays verifiable.

Pruning deletes the oldest records; the first record left still names the hash of the last one
pruned as its ``prev_hash``. A checkpoint keeps that head (its id and hash), how many records
went, where the pruned run started (``first_id``, ``first_prev_hash``: so checkpoints chain to
one another and to :data:`~hub.audit.chain.GENESIS`) and when, signed with the hub's own TLS
key and carrying its certificate. ``fleet-hub events verify`` checks the signature, that the
certificate is the hub's (the configured server certificate, or a server-auth certificate a CA
in ``client_ca`` issued, directly or through the CA certificates the checkpoint carries), and
that the first record left continues from the newest checkpoint's head.

A signature proves who wrote the checkpoint, not that the records it covers were never edited
before it was written: ``prune`` therefore verifies the whole chain first and refuses to
checkpoint a broken one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from hub.audit.records import format_time
from hub.errors import ConfigError

__all__ = ["Checkpoint", "CheckpointSigner", "CheckpointTrust", "check", "load_signer"]

_KIND = "fleet-hub audit checkpoint"
_ECDSA = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One row of the ``checkpoints`` table: the head of a pruned run, signed."""

    id: int
    time: float
    first_id: int
    first_prev_hash: str
    head_id: int
    head_hash: str
    count: int
    certificate: str  # PEM: the signer's certificate first, then any CA certificates
    signature: str  # base64

    def payload(self) -> bytes:
        """The signed bytes: canonical JSON of every field but the certificate and signature."""
        return _payload(self.id, self.time, self.first_id, self.first_prev_hash, self.head_id,
                        self.head_hash, self.count)

    def describe(self) -> str:
        return (f"checkpoint #{self.id} ({format_time(self.time)}: {self.count} records "
                f"#{self.first_id}..#{self.head_id} pruned)")


def _payload(checkpoint_id: int, at: float, first_id: int, first_prev_hash: str, head_id: int,
             head_hash: str, count: int) -> bytes:
    body = {"kind": _KIND, "id": checkpoint_id, "time": at, "first_id": first_id,
            "first_prev_hash": first_prev_hash, "head_id": head_id, "head_hash": head_hash,
            "count": count}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True, slots=True)
class CheckpointSigner:
    """The hub's TLS key and certificate (PEM, as ``listener.server_cert`` holds it)."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey \
        | ed448.Ed448PrivateKey
    certificate_pem: str

    def sign(self, checkpoint_id: int, at: float, first_id: int, first_prev_hash: str,
             head_id: int, head_hash: str, count: int) -> Checkpoint:
        body = _payload(checkpoint_id, at, first_id, first_prev_hash, head_id, head_hash, count)
        key = self.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            signature = key.sign(body, _ECDSA)
        elif isinstance(key, rsa.RSAPrivateKey):
            signature = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        else:
            signature = key.sign(body)
        return Checkpoint(checkpoint_id, at, first_id, first_prev_hash, head_id, head_hash,
                          count, self.certificate_pem, base64.b64encode(signature).decode())


def load_signer(cert_path: Path, key_path: Path, source: Path | None) -> CheckpointSigner:
    """The listener's certificate and key; ConfigError naming the key when either is unusable
    or they do not belong together."""
    try:
        pem = cert_path.read_text("ascii")
        certificate = x509.load_pem_x509_certificate(pem.encode())
    except (OSError, ValueError) as exc:
        raise ConfigError(source, "listener.server_cert",
                          f"cannot read the certificate to sign a checkpoint: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(source, "listener.server_key",
                          f"cannot read the key to sign a checkpoint: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                      | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise ConfigError(source, "listener.server_key",
                          f"a {type(key).__name__} cannot sign a checkpoint: want EC, RSA or "
                          "EdDSA")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) \
            != certificate.public_key().public_bytes(encoding, public):
        raise ConfigError(source, "listener.server_key",
                          f"does not match the certificate in {cert_path}")
    return CheckpointSigner(key, pem)


@dataclass(frozen=True, slots=True)
class CheckpointTrust:
    """Whose checkpoints verify accepts: the hub's server certificate(s) and client_ca."""

    server: frozenset[bytes]  # DER of the configured server certificate
    cas: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, server_cert: Path, client_ca: Path) -> CheckpointTrust:
        """From the listener's files; an unreadable one simply trusts nothing from it."""
        server = _certificates(_read(server_cert))
        return cls(frozenset(c.public_bytes(serialization.Encoding.DER) for c in server[:1]),
                   tuple(_certificates(_read(client_ca))))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def check(checkpoint: Checkpoint, trust: CheckpointTrust) -> str | None:
    """None when *checkpoint* is signed by a certificate *trust* accepts; else what is wrong."""
    chain = _certificates(checkpoint.certificate.encode("ascii", "replace"))
    if not chain:
        return "its certificate cannot be read"
    leaf = chain[0]
    try:
        _verify(leaf, base64.b64decode(checkpoint.signature, validate=True),
                checkpoint.payload())
    except (InvalidSignature, ValueError, TypeError):
        return ("its signature does not match its content: altered, or not signed by the key "
                "of the certificate it carries")
    moment = datetime.fromtimestamp(checkpoint.time, UTC)
    if not leaf.not_valid_before_utc <= moment <= leaf.not_valid_after_utc:
        return (f"it was signed at {format_time(checkpoint.time)}, outside the validity of its "
                f"certificate ({leaf.subject.rfc4514_string()})")
    if not _trusted(leaf, chain[1:], trust):
        return (f"its certificate ({leaf.subject.rfc4514_string()}) is neither the hub's "
                "listener.server_cert nor a server certificate issued by a CA in client_ca")
    return None


def _verify(certificate: x509.Certificate, signature: bytes, body: bytes) -> None:
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, body, _ECDSA)
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, body)
    else:
        raise InvalidSignature


def _trusted(leaf: x509.Certificate, carried: Iterable[x509.Certificate],
             trust: CheckpointTrust) -> bool:
    der = serialization.Encoding.DER
    if leaf.public_bytes(der) in trust.server:
        return True
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    if ExtendedKeyUsageOID.SERVER_AUTH not in usage:  # a device certificate never signs one
        return False
    anchors = {c.public_bytes(der) for c in trust.cas}
    candidates = [*carried, *trust.cas]
    current = leaf
    for _ in range(4):  # leaf <- issuing CA <- root, with room for one more level
        issuer = next((c for c in candidates if _issued_by(current, c)), None)
        if issuer is None:
            return False
        if issuer.public_bytes(der) in anchors:
            return True
        current = issuer
    return False


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
