"""CRLs as the hub takes them: signed by a ``client_ca`` CA, complete, never rolled back.

A CRL is used only when its signature verifies against a ``client_ca`` certificate whose subject
is the CRL's issuer, and never when its CRL number is below the last one accepted from the same
source (RFC 5280 §5.2.3: the number only grows, so a lower one is an old list replayed).
The number to beat is that of the last *good* CRL: one that arrived before its nextUpdate. A
higher-numbered CRL that arrives already past its nextUpdate (a CA with a slow clock) does not
replace the good list: it is enforced together with it (a serial listed by either is refused),
the source reports ``stale``, and the good CRL put back is not a rollback. A later fresh CRL
with a number at least the stale one's supersedes both. A first CRL that arrives stale is used
(better than nothing) and reported stale.

Everything here is blocking CPU work (parsing, signature checks, unions of large lists): the
sources call it from worker threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from hub.errors import RevocationError, SourceError
from hub.revocation.model import SourceData, iso_utc

__all__ = ["CrlLists", "CrlVerifier", "load_ca_bundle"]

_SIGNER_KEYS = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey,
                ed448.Ed448PublicKey, dsa.DSAPublicKey)


def load_ca_bundle(path: Path | str) -> list[x509.Certificate]:
    """The PEM certificates of a CA bundle (``client_ca``); RevocationError if there are none."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise RevocationError(f"cannot read the CA bundle: {exc.strerror} ({file})") from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise RevocationError(f"the CA bundle holds no PEM certificate: {exc} ({file})") from exc


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    with contextlib.suppress(x509.ExtensionNotFound):
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    with contextlib.suppress(x509.ExtensionNotFound):
        # RFC 5280 §4.2.1.3: a CRL signer's key usage must include cRLSign.
        if not ca.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign:
            return False
    key = ca.public_key()
    return isinstance(key, _SIGNER_KEYS) and crl.is_signature_valid(key)


def _refuse_unusable_extensions(crl: x509.CertificateRevocationList) -> None:
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            raise SourceError("a delta CRL; want a complete CRL")
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            # RFC 5280 §5.2: a critical extension we cannot process voids the CRL.
            raise SourceError(f"unknown critical CRL extension {ext.oid.dotted_string}")


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        raise SourceError("CRL has no CRL number (RFC 5280 §5.2.3)") from None


def _entries(crl: x509.CertificateRevocationList) -> dict[int, str]:
    revoked: dict[int, str] = {}
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = x509.ReasonFlags.unspecified
        if reason is x509.ReasonFlags.remove_from_crl:
            continue  # only meaningful in delta CRLs (RFC 5280 §5.3.1)
        revoked[entry.serial_number] = (
            "on-hold" if reason is x509.ReasonFlags.certificate_hold else "revoked")
    return revoked


class CrlVerifier:
    """Parse a CRL (PEM or DER) and accept it only from a client_ca CA (rollbacks: CrlLists)."""

    def __init__(self, ca_certs: Sequence[x509.Certificate]) -> None:
        self._cas = tuple(ca_certs)

    def replace(self, ca_certs: Sequence[x509.Certificate]) -> None:
        """Check later CRLs against *ca_certs* (a reloaded client_ca); one reference swapped,
        so a check running in a worker thread sees the old tuple or the new one."""
        self._cas = tuple(ca_certs)

    def check(self, blob: bytes) -> SourceData:
        """Runs in a worker thread: parsing and signature checks are CPU work."""
        try:
            return self._check(blob)
        except ValueError as exc:  # cryptography's word for malformed DER, anywhere in it
            raise SourceError(f"not a valid CRL: {exc}") from exc

    def _check(self, blob: bytes) -> SourceData:
        if not blob.strip():
            raise SourceError("empty CRL")
        if b"-----BEGIN X509 CRL-----" in blob:
            crl = x509.load_pem_x509_crl(blob)
        else:
            crl = x509.load_der_x509_crl(blob)
        issuer = crl.issuer.rfc4514_string()
        signers = [ca for ca in self._cas if ca.subject == crl.issuer]  # one read of _cas
        if not signers:
            raise SourceError(f"CRL issuer {issuer!r} is not a CA of the client_ca bundle")
        if not any(_signed_by(crl, ca) for ca in signers):
            raise SourceError(f"CRL signature does not verify against the client_ca "
                              f"certificate of {issuer!r}")
        _refuse_unusable_extensions(crl)
        number = _crl_number(crl)
        next_update = crl.next_update_utc
        return SourceData(_entries(crl), crl_number=number,
                          next_update=None if next_update is None else next_update.timestamp())


def _number(data: SourceData) -> int:
    return data.crl_number if data.crl_number is not None else -1


@dataclass(frozen=True, slots=True)
class CrlLists:
    """What one CRL source enforces: its last good CRL, and a newer one that arrived stale.

    DESIGN section 5: a CRL already past its nextUpdate when it arrives (a CA with a slow
    clock) must not replace the last good list, yet it is genuine and newer, so both are
    enforced (``data`` is their union). Only a CRL that arrives fresh moves the rollback floor;
    otherwise the stale one would make the good one, put back, look like a rollback.
    """

    good: SourceData | None = None  # the last CRL that arrived before its nextUpdate
    newer: SourceData | None = None  # a higher-numbered CRL that arrived past its nextUpdate
    data: SourceData | None = None  # the union, computed once (in the worker thread)

    def take(self, incoming: SourceData, now: float) -> CrlLists:
        """The lists once *incoming* (signature already verified) is taken; raises on a
        rollback. Runs in a worker thread: the union of two large lists is CPU work."""
        number = incoming.crl_number
        assert number is not None  # noqa: S101 - the verifier refuses a CRL without one
        good, newer = self.good, self.newer
        floor = good.crl_number if good is not None else None
        if floor is not None and number < floor:
            raise SourceError(f"CRL number {number} is below {floor}, the last good one: "
                              "refusing a rollback")
        arrived_stale = incoming.next_update is not None and incoming.next_update <= now
        if not arrived_stale or number == floor:
            # Fresh (or the good CRL itself again, now past its nextUpdate): the new good list.
            # A stale-on-arrival CRL numbered above it is still newer: it stays in the union.
            kept = newer if newer is not None and _number(newer) > number else None
            return CrlLists.of(incoming, kept)
        if newer is not None and number < _number(newer):
            raise SourceError(f"CRL number {number} is below {_number(newer)}, a newer one "
                              "already taken (past its nextUpdate): refusing a rollback")
        return CrlLists.of(good, incoming)

    @classmethod
    def of(cls, good: SourceData | None, newer: SourceData | None) -> CrlLists:
        if good is None or newer is None:
            return cls(good, newer, good or newer)
        revoked = dict(newer.revoked)
        for serial, reason in good.revoked.items():
            if reason == "revoked" or serial not in revoked:  # revoked outranks on-hold
                revoked[serial] = reason
        next_update = min(t for t in (good.next_update, newer.next_update) if t is not None)
        return cls(good, newer, SourceData(revoked, next_update=next_update,
                                           crl_number=good.crl_number))

    def warning(self, now: float) -> str | None:
        """Why these lists are stale; None while fresh. Stable while the lists are unchanged."""
        good, newer = self.good, self.newer
        if newer is not None and newer.next_update is not None:
            arrived = (f"CRL number {_number(newer)} arrived already past its nextUpdate "
                       f"{iso_utc(newer.next_update)}")
            if good is None:
                return f"{arrived}; used, as no earlier good CRL is known"
            return (f"{arrived}; enforced together with CRL number {_number(good)}, the last "
                    "good one")
        if good is not None and good.next_update is not None and now > good.next_update:
            return (f"CRL number {_number(good)} is past its nextUpdate "
                    f"{iso_utc(good.next_update)}")
        return None
