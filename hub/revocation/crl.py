"""CRLs as the hub takes them: signed by a ``client_ca`` CA, complete, never rolled back.

A CRL is used only when its signature verifies against a ``client_ca`` certificate whose subject
is the CRL's issuer, and never when its CRL number is below the last one accepted from the same
source for the same issuer (RFC 5280 §5.2.3: the number only grows, so a lower one is an old
list replayed).

One source may carry several CRLs, one per issuer (an issuing-CA rotation, contract C1:
``crl.pem`` and ``GET /crl`` with ``Accept: application/x-pem-file`` hold the PEM CRL of every
live issuing CA, concatenated). Each is verified against its own issuer and kept in its own
:class:`CrlLists` (its own rollback floor); :class:`CrlSet` unites them: a serial is refused
when any issuer's CRL lists it (serials are random and unique fleet-wide). An issuer whose CRL
is missing from a later blob keeps its last lists in force while it is still a CA of
``client_ca`` (a serial once revoked stays revoked), but no longer makes the source stale;
one not yet in ``client_ca`` is left out while another issuer's CRL is there.
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
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from hub.errors import RevocationError, SourceError
from hub.revocation.model import SourceData, iso_utc

logger = logging.getLogger("hub.revocation")

__all__ = ["CrlLists", "CrlSet", "CrlVerifier", "VerifiedCrl", "load_ca_bundle", "split_pem"]

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", re.DOTALL)

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


@dataclass(frozen=True, slots=True)
class VerifiedCrl:
    """One CRL whose signature verified: its issuer (Name DER, and as text) and its list."""

    issuer: bytes
    name: str
    data: SourceData


def split_pem(blob: bytes) -> list[bytes]:
    """The PEM CRL blocks of *blob*, in order; [] when it holds none (then it is DER)."""
    return _PEM_CRL.findall(blob)


class CrlVerifier:
    """Parse CRLs (one DER, or one or more PEM) and accept each only from its client_ca CA
    (rollbacks: CrlLists, per issuer)."""

    def __init__(self, ca_certs: Sequence[x509.Certificate]) -> None:
        self._cas = tuple(ca_certs)

    def replace(self, ca_certs: Sequence[x509.Certificate]) -> None:
        """Check later CRLs against *ca_certs* (a reloaded client_ca); one reference swapped,
        so a check running in a worker thread sees the old tuple or the new one."""
        self._cas = tuple(ca_certs)

    def issuers(self) -> frozenset[bytes]:
        """The subjects (DER) of the CAs CRLs are checked against now."""
        return frozenset(ca.subject.public_bytes() for ca in self._cas)

    def check(self, blob: bytes) -> tuple[VerifiedCrl, ...]:
        """Every CRL of *blob*, each verified; SourceError for the first that is not, or for
        two of one issuer. A CRL whose issuer is no CA of client_ca is left out (logged) when
        another one is of a CA there: a rotation's new intermediate may reach crl.pem before
        this gateway's client_ca, and no certificate of it is admitted meanwhile, while the
        other issuers' CRLs must go on being enforced. Runs in a worker thread: parsing and
        signatures are CPU work."""
        if not blob.strip():
            raise SourceError("empty CRL")
        cas = self._cas  # one read: a reload meanwhile applies to the next blob
        try:
            blocks = split_pem(blob)
            if blocks and blob.count(b"-----BEGIN") == len(blocks):
                crls = [x509.load_pem_x509_crl(block) for block in blocks]
            elif b"-----BEGIN" in blob:  # a cut or foreign block: never half a set of CRLs
                raise SourceError("not a valid CRL: want complete PEM X509 CRL blocks only")
            else:
                crls = [x509.load_der_x509_crl(blob)]
            known = {ca.subject for ca in cas}
            foreign = [crl for crl in crls if crl.issuer not in known]
            if len(foreign) < len(crls):
                crls = [crl for crl in crls if crl.issuer in known]
                for left_out in foreign:
                    logger.warning("a CRL of %r, no CA of client_ca, is left out; the other "
                                   "issuers' CRLs are used", left_out.issuer.rfc4514_string())
            verified = tuple(_verify(crl, cas) for crl in crls)
        except ValueError as exc:  # cryptography's word for malformed DER, anywhere in it
            raise SourceError(f"not a valid CRL: {exc}") from exc
        seen: set[bytes] = set()
        for taken in verified:
            if taken.issuer in seen:
                raise SourceError(f"two CRLs of issuer {taken.name!r} in one source; want one "
                                  "per issuer")
            seen.add(taken.issuer)
        return verified


def _verify(crl: x509.CertificateRevocationList,
            cas: Sequence[x509.Certificate]) -> VerifiedCrl:
    issuer = crl.issuer.rfc4514_string()
    signers = [ca for ca in cas if ca.subject == crl.issuer]
    if not signers:
        raise SourceError(f"CRL issuer {issuer!r} is not a CA of the client_ca bundle")
    if not any(_signed_by(crl, ca) for ca in signers):
        raise SourceError(f"CRL signature does not verify against the client_ca "
                          f"certificate of {issuer!r}")
    _refuse_unusable_extensions(crl)
    number = _crl_number(crl)
    next_update = crl.next_update_utc
    return VerifiedCrl(crl.issuer.public_bytes(), issuer, SourceData(
        _entries(crl), crl_number=number,
        next_update=None if next_update is None else next_update.timestamp()))


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


_NO_LISTS: Mapping[bytes, CrlLists] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CrlSet:
    """What one CRL source enforces: the :class:`CrlLists` of every issuer it has carried.

    ``current`` are the issuers of the last blob taken: only theirs count for staleness. An
    issuer absent from a later blob keeps its lists in force while it is still a CA the
    verifier knows (*trusted* at :meth:`take`); then it is dropped.
    """

    lists: Mapping[bytes, CrlLists] = field(default_factory=lambda: _NO_LISTS)
    names: Mapping[bytes, str] = field(default_factory=lambda: MappingProxyType({}))
    current: tuple[bytes, ...] = ()
    data: SourceData | None = None  # the union, computed once (in the worker thread)

    def take(self, incoming: Sequence[VerifiedCrl], now: float,
             trusted: frozenset[bytes] | None = None) -> CrlSet:
        """The set once *incoming* (one blob's CRLs, verified) is taken; SourceError naming the
        issuer on a rollback of any of them (then nothing of the blob is taken)."""
        lists = {issuer: kept for issuer, kept in self.lists.items()
                 if trusted is None or issuer in trusted}
        names = {issuer: self.names[issuer] for issuer in lists}
        for crl in incoming:
            try:
                lists[crl.issuer] = lists.get(crl.issuer, _EMPTY_LISTS).take(crl.data, now)
            except SourceError as exc:
                raise SourceError(f"{crl.name}: {exc}") from None
            names[crl.issuer] = crl.name
        current = tuple(crl.issuer for crl in incoming)
        return CrlSet(MappingProxyType(lists), MappingProxyType(names), current,
                      _union([lists[i].data for i in lists], [lists[i].data for i in current]))

    def warning(self, now: float) -> str | None:
        """Why the current issuers' lists are stale; None while every one is fresh."""
        found = [(issuer, text) for issuer in self.current
                 if (text := self.lists[issuer].warning(now)) is not None]
        if len(self.current) == 1 or not found:
            return found[0][1] if found else None
        return "; ".join(f"{self.names[issuer]}: {text}" for issuer, text in found)


_EMPTY_LISTS: Final = CrlLists()


def _union(every: Sequence[SourceData | None], current: Sequence[SourceData | None]
           ) -> SourceData | None:
    """Every issuer's refusals (revoked outranks on-hold); the current issuers' earliest
    nextUpdate."""
    datas = [d for d in every if d is not None]
    if len(datas) == 1 and len(current) == 1 and current[0] is datas[0]:
        return datas[0]
    revoked: dict[int, str] = {}
    for data in datas:
        for serial, reason in data.revoked.items():
            if reason == "revoked" or serial not in revoked:
                revoked[serial] = reason
    updates = [d.next_update for d in current if d is not None and d.next_update is not None]
    return SourceData(revoked, next_update=min(updates) if updates else None)
