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

from provisioning import der

__all__ = ["ANY_UNDER_ROOT", "AllowedIssuers", "allowed_issuers", "describe", "is_intermediate",
           "issuer_name"]

AllowedIssuers = frozenset[bytes] | None  # subjects' DER; None: any intermediate under a root
ANY_UNDER_ROOT: Final[AllowedIssuers] = None


def issuer_name(certificate: bytes) -> bytes | None:
    """The DER of the issuer Name of *certificate* (DER); None when it is not laid out as
    a certificate (the caller refuses it).

    ``Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial
    INTEGER, signature AlgorithmIdentifier, issuer Name, ... }, ... }``.
    """
    top = der.header(certificate, 0, der.SEQUENCE)
    if top is None:
        return None
    tbs = der.header(certificate, top[1], der.SEQUENCE)
    if tbs is None:
        return None
    pos = tbs[1]
    field = der.header(certificate, pos)
    if field is not None and field[0] == 0xA0:  # version: absent only in v1 certificates
        pos = field[2]
        field = der.header(certificate, pos)
    if field is None or field[0] != der.INTEGER:  # serialNumber
        return None
    algorithm = der.header(certificate, field[2], der.SEQUENCE)
    if algorithm is None:
        return None
    issuer = der.header(certificate, algorithm[2], der.SEQUENCE)
    if issuer is None:
        return None
    return certificate[algorithm[2]:issuer[2]]


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
