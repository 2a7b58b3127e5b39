"""CSR policy as a chain of small named rules, each failing with what it got and wanted."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import SignatureAlgorithmOID

from provisioning import der
from provisioning.csrder import UNCOMPRESSED_EC_SPKI, plain_common_names, subject_common_names
from provisioning.errors import UsageError
from provisioning.identity import device_id_problem, is_valid_device_id, spiffe_id

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


@dataclass(frozen=True)
class Rejection:
    """Why a CSR was refused: a stable code for machines and a sentence for people."""

    code: str
    reason: str

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@dataclass(frozen=True)
class CSRContext:
    """What the rules look at: the request, and the fleet it asks to join.

    The parsed pieces are computed once: several rules and the issuer need them. The
    subject's CNs and the key's SubjectPublicKeyInfo are read from the request's DER where
    it has the usual plain form, which is several times cheaper than cryptography's Python
    objects for the whole subject; anything else is left to cryptography, so every result
    (and every exception) is the one cryptography gives.
    """

    csr: x509.CertificateSigningRequest
    trust_domain: str
    manifest: frozenset[str] | None

    @cached_property
    def request_info(self) -> bytes:
        """The CertificationRequestInfo DER: what the CSR's signature covers."""
        return self.csr.tbs_certrequest_bytes

    @cached_property
    def _fields(self) -> list[tuple[int, int, int, int]] | None:
        """version, subject, subjectPKInfo, attributes of :attr:`request_info`, as
        :func:`provisioning.der.children` gives them; None when not laid out so."""
        data = self.request_info
        top = der.header(data, 0, der.SEQUENCE)
        if top is None or top[2] != len(data):
            return None
        fields = der.children(data, top[1], top[2])
        if fields is None or len(fields) < 3 or (fields[0][0], fields[1][0], fields[2][0]) != (
                der.INTEGER, der.SEQUENCE, der.SEQUENCE):
            return None
        return fields

    @cached_property
    def common_names(self) -> list[str]:
        """Every CN value of the subject, in order, as ``subject.get_attributes_for_oid``."""
        fields = self._fields
        if fields is not None:
            names = plain_common_names(self.request_info, fields[1])
            if names is not None:
                return names
        return subject_common_names(self.csr)

    @cached_property
    def spki_der(self) -> bytes:
        """The key's DER SubjectPublicKeyInfo as ``public_key().public_bytes`` writes it
        (its hash identifies the key in the registry; the certificate carries it). Only
        meaningful once :func:`key_type_allowed` accepted the key. The CSR's own bytes
        when they are that already: an uncompressed P-256 or P-384 point with the curve
        named, the form every device sends and the one encoding of such a key."""
        fields = self._fields
        if fields is not None:
            _, start, _, end = fields[2]
            prefix = UNCOMPRESSED_EC_SPKI.get(end - start)
            if prefix is not None and self.request_info.startswith(prefix, start):
                return self.request_info[start:end]
        key = cast("ec.EllipticCurvePublicKey", self.public_key)  # any key type, in fact
        return key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def device_id(self) -> str | None:
        names = self.common_names
        return names[0] if names else None

    @cached_property
    def public_key(self) -> object:
        return self.csr.public_key()


Rule = Callable[[CSRContext], Rejection | None]


def _requested(ctx: CSRContext, kind: type[_Ext]) -> _Ext | None:
    """The requested extension of this kind, as ``get_extension_for_class`` finds it.

    Most factory CSRs request none: a loop over the (cached) extensions is cheaper than the
    ``ExtensionNotFound`` raised for every rule.
    """
    for ext in ctx.csr.extensions:
        if isinstance(ext.value, kind):
            return ext.value
    return None


def describe_key(key: object) -> str:
    """A short human name for a public key type, e.g. ``EC secp256k1`` or ``RSA 1024``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "")


def key_type_allowed(ctx: CSRContext) -> Rejection | None:
    """Keys of DESIGN section 1 only: EC P-256/P-384, Ed25519, RSA 2048-8192."""
    try:
        key = ctx.public_key
    except (ValueError, UnsupportedAlgorithm) as exc:
        return Rejection("key-type", f"unsupported public key ({exc}); want EC P-256/P-384, "
                         "Ed25519 or RSA 2048-8192")
    want = "want EC P-256/P-384, Ed25519 or RSA 2048-8192"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ALLOWED_CURVES:
            return None
        return Rejection("key-type", f"got EC curve {key.curve.name}, {want}")
    if isinstance(key, rsa.RSAPublicKey):
        if RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            return None
        return Rejection("key-size", f"got RSA {key.key_size} bits, {want}")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return Rejection("key-type", f"got {describe_key(key)} key, {want}")


def signature_valid(ctx: CSRContext) -> Rejection | None:
    """Proof of possession: the CSR must be signed by the key it carries (RFC 2986 §3)."""
    try:
        ok = _signature_ok(ctx)
    except (ValueError, UnsupportedAlgorithm) as exc:
        return Rejection("bad-signature", f"CSR signature cannot be checked: {exc}")
    return None if ok else Rejection("bad-signature", "CSR signature does not verify")


_ECDSA_SHA256_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


def _signature_ok(ctx: CSRContext) -> bool:
    """``csr.is_signature_valid``. For the usual CSR, an EC key signing with ECDSA-SHA256
    (cryptography loads that algorithm only without parameters), it is the very check
    ``is_signature_valid`` makes (the key's ``verify`` over the request info, with ECDSA
    and SHA-256), made with the key the policy has loaded already and the request info
    hashed here: that saves loading the key again for every CSR."""
    csr = ctx.csr
    if csr.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        try:
            key = ctx.public_key
        except (ValueError, UnsupportedAlgorithm):
            key = None  # is_signature_valid says what it says about such a key
        if isinstance(key, ec.EllipticCurvePublicKey):
            try:
                key.verify(csr.signature, hashlib.sha256(ctx.request_info).digest(),
                           _ECDSA_SHA256_PREHASHED)
            except InvalidSignature:
                return False
            return True
    return csr.is_signature_valid


def extensions_readable(ctx: CSRContext) -> Rejection | None:
    """Malformed or duplicate requested extensions make every later check unreliable."""
    try:
        _ = ctx.csr.extensions
    except ValueError as exc:
        return Rejection("bad-extensions", f"requested extensions are malformed: {exc}")
    return None


def not_a_ca(ctx: CSRContext) -> Rejection | None:
    """A device never becomes a CA, whatever it asks for."""
    bc = _requested(ctx, x509.BasicConstraints)
    if bc is not None and bc.ca:
        return Rejection("ca-requested", "CSR asks for BasicConstraints CA:TRUE, want CA:FALSE")
    return None


def cn_is_device_id(ctx: CSRContext) -> Rejection | None:
    """The subject carries exactly one CN, and it is a valid device id."""
    try:
        cns = ctx.common_names
    except ValueError as exc:  # e.g. a UTF8String that is not UTF-8: cryptography refuses it
        return Rejection("bad-cn", f"subject cannot be read: {exc}")
    if len(cns) != 1:
        return Rejection("bad-cn", f"subject has {len(cns)} CN attributes, want exactly 1")
    problem = device_id_problem(cns[0])
    return Rejection("bad-cn", f"CN {problem}") if problem else None


def san_matches_cn(ctx: CSRContext) -> Rejection | None:
    """A requested SAN may only repeat the identity the CN names, never another one."""
    san = _requested(ctx, x509.SubjectAlternativeName)
    if san is None:
        return None
    device_id = ctx.common_names[0]
    want_uri = spiffe_id(ctx.trust_domain, device_id)
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            if name.value != want_uri:
                return Rejection("san-mismatch", f"SAN URI {name.value!r} contradicts CN "
                                 f"{device_id!r}, want {want_uri!r}")
        elif isinstance(name, x509.DNSName):
            if name.value != device_id:
                return Rejection("san-mismatch", f"SAN DNS {name.value!r} contradicts CN "
                                 f"{device_id!r}")
        else:
            return Rejection("san-mismatch", f"SAN entry {name!r} is not allowed, want only "
                             f"URI {want_uri!r}")
    return None


def in_manifest(ctx: CSRContext) -> Rejection | None:
    """With a production manifest, only the devices on it are issued certificates."""
    if ctx.manifest is None:
        return None
    device_id = ctx.common_names[0]
    if device_id in ctx.manifest:
        return None
    return Rejection("not-in-manifest", f"device {device_id!r} is not in the manifest")


RULES: Sequence[Rule] = (
    key_type_allowed,
    signature_valid,
    extensions_readable,
    not_a_ca,
    cn_is_device_id,
    san_matches_cn,
    in_manifest,
)


def check(ctx: CSRContext, rules: Sequence[Rule] = RULES) -> Rejection | None:
    """The first rule that refuses the CSR, or None when all accept it."""
    for rule in rules:
        rejection = rule(ctx)
        if rejection is not None:
            return rejection
    return None


def device_id_of(csr: x509.CertificateSigningRequest) -> str:
    """The CN; only meaningful after :func:`cn_is_device_id` accepted it."""
    return subject_common_names(csr)[0]


def load_manifest(path: Path) -> frozenset[str]:
    """One device id a line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("manifest not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"manifest cannot be read: {exc}", str(path)) from exc
    ids: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not is_valid_device_id(line):
            raise UsageError(f"manifest line {number}: {device_id_problem(line)}", str(path))
        ids.add(line)
    return frozenset(ids)
