"""The PKI folder: where each file lives, creating it once, and loading the issuing CA (and
the retiring one an ``issuing-ca rotate`` keeps live until ``retire``: :mod:`.rotation`)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from provisioning.config import PKIConfig, load_config
from provisioning.errors import PassphraseError, PKIError
from provisioning.fsutil import create_exclusive

ROOT_YEARS = 20
ISSUING_YEARS = 5
ENV_PKI = "FLEET_PKI"
DEFAULT_PKI = "fleet-pki"


@dataclass(frozen=True)
class PKIPaths:
    """File names of DESIGN section 2, relative to the folder given with ``--pki``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "pki.toml"

    @property
    def root_cert(self) -> Path:
        return self.root / "root-ca.pem"

    @property
    def root_key(self) -> Path:
        return self.root / "root-ca.key"

    @property
    def issuing_cert(self) -> Path:
        return self.root / "issuing-ca.pem"

    @property
    def issuing_key(self) -> Path:
        return self.root / "issuing-ca.key"

    @property
    def chain(self) -> Path:
        return self.root / "ca-chain.pem"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def retiring(self) -> Path:
        """Issuing CAs replaced by ``issuing-ca rotate``, still live until ``retire``:
        ``retiring/issuing-ca-<serial>.pem`` and ``.key`` (:mod:`provisioning.rotation`)."""
        return self.root / "retiring"

    @property
    def retired(self) -> Path:
        """Certificates (never keys) of issuing CAs ``issuing-ca retire`` dropped."""
        return self.root / "retired"

    def retiring_files(self) -> list[tuple[Path, Path]]:
        """(certificate, key) of each retiring issuing CA, newest first (file mtime)."""
        if not self.retiring.is_dir():
            return []
        pems = sorted(self.retiring.glob("issuing-ca-*.pem"),
                      key=lambda p: p.stat().st_mtime_ns, reverse=True)
        return [(pem, pem.with_suffix(".key")) for pem in pems]


@dataclass(frozen=True)
class IssuingCA:
    """The intermediate that signs devices, CRLs and server certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @cached_property
    def chain_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @cached_property
    def ski(self) -> x509.SubjectKeyIdentifier:
        return self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    @cached_property
    def key_id(self) -> str:
        """The SKI as lowercase hex: ``certificates.issuer_key_id`` of what it signs."""
        return self.ski.digest.hex()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PKI:
    """An existing PKI folder: reading needs no CA key, signing only the issuing one."""

    def __init__(self, root: Path) -> None:
        self.paths = PKIPaths(root)
        if not root.is_dir():
            raise PKIError("no PKI here: the folder does not exist", str(root))
        self.config: PKIConfig = load_config(self.paths.config)
        for needed in (self.paths.issuing_cert, self.paths.chain):
            if not needed.is_file():
                raise PKIError(f"incomplete PKI: {needed.name} is missing", str(root))

    @cached_property
    def issuing_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.paths.issuing_cert.read_bytes())

    def load_issuing_ca(self, passphrase: bytes | None) -> IssuingCA:
        """Load the issuing key; a wrong or missing passphrase is a clear error."""
        return load_ca_pair(self.issuing_cert, self.paths.issuing_key, passphrase)

    def load_retiring(self, passphrase: bytes | None) -> tuple[IssuingCA, ...]:
        """The issuing CAs ``issuing-ca rotate`` replaced and ``retire`` has not dropped
        yet: they still sign their own certificates' CRLs and OCSP answers. Their keys
        share the current one's passphrase."""
        return tuple(load_ca_pair(x509.load_pem_x509_certificate(pem.read_bytes()), key,
                                  passphrase)
                     for pem, key in self.paths.retiring_files())


def load_ca_pair(cert: x509.Certificate, key_path: Path,
                 passphrase: bytes | None) -> IssuingCA:
    """An issuing CA's certificate with its key from *key_path*, which must be its pair."""
    key = load_private_key(key_path, passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("issuing CA key is not an EC key", str(key_path))
    if key.public_key() != cert.public_key():
        raise PKIError("the key is not the pair of its certificate (an interrupted "
                       "issuing-ca rotate? see docs/provisioning.md)", str(key_path))
    return IssuingCA(cert=cert, key=key)


def load_private_key(path: Path, passphrase: bytes | None) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PKIError("CA key is missing", str(path)) from None
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and passphrase is None:
        raise PassphraseError(
            "CA key is encrypted: give its passphrase with --passphrase-env VAR", str(path)
        )
    try:
        return serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        if encrypted:
            raise PassphraseError("wrong passphrase for CA key", str(path)) from exc
        raise PKIError(f"CA key cannot be read: {exc}", str(path)) from exc


def key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM, encrypted when *passphrase* is given."""
    return _key_pem(key, passphrase)


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _ca_name(config: PKIConfig, label: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{config.organisation} {label}"[:64]),
        ]
    )


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    years: int,
    path_length: int | None,
    now: dt.datetime,
    hash_alg: hashes.SHA256 | hashes.SHA384,
) -> x509.Certificate:
    public = key.public_key()
    issuer_public = issuer_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365 * years + years // 4))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
        .sign(issuer_key, hash_alg)
    )


def init_pki(
    root: Path, config: PKIConfig, passphrase: bytes | None
) -> tuple[list[Path], IssuingCA]:
    """Write the CA keys and certificates; refuses a folder that holds any PKI file.

    Returns the files written (for the caller to remove if a later step fails) and the
    issuing CA, so the caller can sign the first CRL without reading the key back.
    """
    paths = PKIPaths(root)
    ours = [paths.config, paths.root_cert, paths.root_key, paths.issuing_cert,
            paths.issuing_key, paths.chain, paths.crl, paths.registry]
    existing = [p.name for p in ours if p.exists()]
    if existing:
        raise PKIError(f"a PKI already exists here ({existing[0]}); refusing to overwrite",
                       str(root))
    root.mkdir(parents=True, exist_ok=True)
    now = utcnow()
    root_key = ec.generate_private_key(ec.SECP384R1())
    root_name = _ca_name(config, "Fleet Root CA")
    root_cert = _ca_cert(root_name, root_key, root_name, root_key, ROOT_YEARS, None, now,
                         hashes.SHA384())
    issuing = new_issuing_ca(config, root_cert, root_key, 1, now)
    issuing_key, issuing_cert = issuing.key, issuing.cert
    pem = serialization.Encoding.PEM
    created: list[Path] = []
    try:
        for path, data, mode in (
            (paths.root_key, _key_pem(root_key, passphrase), 0o600),
            (paths.issuing_key, _key_pem(issuing_key, passphrase), 0o600),
            (paths.root_cert, root_cert.public_bytes(pem), 0o644),
            (paths.issuing_cert, issuing_cert.public_bytes(pem), 0o644),
            (paths.chain, issuing_cert.public_bytes(pem) + root_cert.public_bytes(pem), 0o644),
        ):
            create_exclusive(path, data, mode)
            created.append(path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return created, issuing


def issuing_label(generation: int) -> str:
    """The issuing CA's CN after the organisation: init's is generation 1, and each
    ``issuing-ca rotate`` adds one, so two live issuing CAs never share a subject name."""
    return "Fleet Issuing CA" if generation <= 1 else f"Fleet Issuing CA {generation}"


def new_issuing_ca(config: PKIConfig, root_cert: x509.Certificate,
                   root_key: ec.EllipticCurvePrivateKey, generation: int,
                   now: dt.datetime) -> IssuingCA:
    """A new intermediate under the root (EC P-256, 5 years, pathlen 0): init's, or a
    rotation's (:mod:`provisioning.rotation`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca_cert(_ca_name(config, issuing_label(generation)), key, root_cert.subject,
                    root_key, ISSUING_YEARS, 0, now, hashes.SHA384())
    return IssuingCA(cert=cert, key=key)


def pki_root(option: Path | None) -> Path:
    """``--pki``, else ``$FLEET_PKI``, else ``./fleet-pki``."""
    if option is not None:
        return option
    return Path(os.environ.get(ENV_PKI) or DEFAULT_PKI)
