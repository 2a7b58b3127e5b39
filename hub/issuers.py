"""Which intermediates may issue the fleet's devices: the issuer check (reason ``unknown-issuer``).

The listener's TLS trusts every CA of ``client_ca``, the root included (a fleet may trust
the root alone). With the root a trust anchor, a device that sends its own intermediate
under that root verifies, even when that intermediate is not in ``client_ca``: a CA the root
signed for another purpose, or an issuing CA retired after a rotation. So after the
handshake the listener looks at the leaf's issuer: it must be the subject of one of the
*allowed* intermediates (contract C1): ``client_ca``'s intermediates, or, with a fleet-state
feed whose documents name them, the feed's ``issuers`` (:mod:`hub.revocation.feed_issuers`).

The check costs one walk over the first five elements of the leaf's DER (no certificate
object) and one frozenset lookup; the set is built when the trust changes, never per
connection. Names are compared as DER bytes: a leaf's issuer field is a copy of its issuer's
subject field (RFC 5280 section 7.1), and ``issuing-ca rotate`` gives every generation a
distinct subject, so one name stands for one intermediate.

A ``client_ca`` that holds no intermediate (a root only) allows any intermediate under it,
as before this check; the hub says so with a WARNING (:func:`describe`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from cryptography import x509

__all__ = ["ANY_UNDER_ROOT", "AllowedIssuers", "allowed_issuers", "describe", "is_intermediate",
           "issuer_name"]

_SEQUENCE: Final = 0x30
_INTEGER: Final = 0x02
_VERSION: Final = 0xA0  # [0] EXPLICIT
AllowedIssuers = frozenset[bytes] | None  # subjects' DER; None: any intermediate under a root
ANY_UNDER_ROOT: Final[AllowedIssuers] = None


def issuer_name(certificate: bytes) -> bytes | None:
    """The DER of the issuer Name of *certificate* (DER); None when it is not laid out as
    a certificate (the caller refuses it).

    ``Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial
    INTEGER, signature AlgorithmIdentifier, issuer Name, ... }, ... }``. The hub may not
    import provisioning's DER reader (STYLE's import rule): these few lines walk it here.
    """
    top = _header(certificate, 0, _SEQUENCE)
    tbs = None if top is None else _header(certificate, top[0], _SEQUENCE)
    if tbs is None:
        return None
    field = _header(certificate, tbs[0], _VERSION)
    pos = tbs[0] if field is None else field[1]  # version: absent only in v1 certificates
    serial = _header(certificate, pos, _INTEGER)
    algorithm = None if serial is None else _header(certificate, serial[1], _SEQUENCE)
    issuer = None if algorithm is None else _header(certificate, algorithm[1], _SEQUENCE)
    if algorithm is None or issuer is None:
        return None
    return certificate[algorithm[1]:issuer[1]]


def _header(data: bytes, pos: int, tag: int) -> tuple[int, int] | None:
    """(content start, end) of the DER element with *tag* at *pos*; None when the tag
    differs, the length is indefinite or too long, or it runs past the end of *data*."""
    if pos + 2 > len(data) or data[pos] != tag:
        return None
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        count = n & 0x7F
        if not 0 < count <= 4 or pos + count > len(data):
            return None
        n = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    end = pos + n
    return (pos, end) if end <= len(data) else None


def is_intermediate(cert: x509.Certificate) -> bool:
    """A CA certificate that is not self-issued: one a root (or another CA) signed."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    return cert.subject != cert.issuer


def allowed_issuers(certificates: Iterable[x509.Certificate]) -> AllowedIssuers:
    """The subjects of the intermediates among *certificates* (the trust in force); None
    (any intermediate under a root) when there is none."""
    found = frozenset(cert.subject.public_bytes() for cert in certificates
                      if is_intermediate(cert))
    return found or ANY_UNDER_ROOT


def describe(certificates: Iterable[x509.Certificate]) -> str:
    """One line for the log: which issuers are allowed."""
    names = [cert.subject.rfc4514_string() for cert in certificates if is_intermediate(cert)]
    if not names:
        return ("the trust holds no intermediate (a root only): a device certificate from "
                "any intermediate under the root is admitted")
    return "device certificates are admitted from " + "; ".join(repr(n) for n in names)
