"""CA certificates the feed names (contract C1): its signer and its ``issuers``, checked against
the roots of ``client_ca``.

After ``fleet-provision issuing-ca rotate`` the CA service signs with a new intermediate that
a hub's ``client_ca`` may not list yet, and every document names the live issuing CAs in
``issuers``. A hub takes such a certificate when it is byte for byte a CA of ``client_ca``, or
when it is a CA certificate (BasicConstraints ca=TRUE), inside its validity, *directly* signed
by a root of ``client_ca`` (a self-signed CA there). A device certificate also chains to the
root, but it is no CA; a CA two levels down is not the fleet's issuing CA.

The verified ``issuers`` become the intermediates a device may come from
(:mod:`hub.issuers`) and join the listener's TLS trust (:class:`hub.cabundle.BundleWatcher`,
:func:`compose`). Signature checks are CPU work: call these from a worker thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["compose", "is_ca", "under_root", "verify_issuers"]


def is_ca(cert: x509.Certificate) -> bool:
    with contextlib.suppress(x509.ExtensionNotFound):
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    return False


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _roots(ca_certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    return [c for c in ca_certs if c.subject == c.issuer and is_ca(c)]


def _live_ca(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """Why *cert* is not a CA certificate in its validity; None when it is."""
    if not is_ca(cert):
        return "not a CA certificate (BasicConstraints ca=TRUE)"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return (f"outside its validity ({cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    return None


def under_root(cert: x509.Certificate, ca_certs: Sequence[x509.Certificate],
               now: dt.datetime) -> str | None:
    """Why *cert* is not a CA directly signed by a root of *ca_certs*, in its validity; None
    when it is."""
    why = _live_ca(cert, now)
    if why is not None:
        return why
    for root in _roots(ca_certs):
        if root.subject != cert.issuer:
            continue
        with contextlib.suppress(InvalidSignature, TypeError, ValueError):
            cert.verify_directly_issued_by(root)
            return None
    return "not signed by a root of client_ca"


def verify_issuers(ders: Sequence[bytes], ca_certs: Sequence[x509.Certificate],
                   now: dt.datetime) -> tuple[tuple[x509.Certificate, ...], tuple[str, ...]]:
    """The certificates of *ders* a hub may take as issuing CAs (each a CA in its validity,
    byte for byte one of *ca_certs* or signed directly by a root there), and why each other
    one was not (one line each)."""
    known = {_der(c) for c in ca_certs if is_ca(c)}
    taken: list[x509.Certificate] = []
    problems: list[str] = []
    for n, der in enumerate(ders):
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            problems.append(f"issuers[{n}]: not a certificate: {exc}")
            continue
        # A CA of the trust in force is taken as it is, once it is a CA in its validity.
        why = _live_ca(cert, now) if der in known else under_root(cert, ca_certs, now)
        if why is None:
            taken.append(cert)
        else:
            problems.append(f"issuers[{n}] {cert.subject.rfc4514_string()!r}: {why}")
    return tuple(taken), tuple(problems)


def compose(configured: Sequence[x509.Certificate],
            announced: Sequence[x509.Certificate] | None) -> tuple[x509.Certificate, ...]:
    """The trust in force: ``client_ca``'s certificates (*configured*), and with the feed's
    verified ``issuers`` (*announced*; None: the feed names none) only those of its
    intermediates the feed still lists, plus the feed's issuers. A retired intermediate
    (no longer in ``issuers``) stops being trusted even if ``client_ca`` still lists it;
    roots always stay."""
    if not announced:
        return tuple(configured)
    listed = {_der(c) for c in announced}
    kept = [c for c in configured if c.subject == c.issuer or _der(c) in listed]
    have = {_der(c) for c in kept}
    return (*kept, *(c for c in announced if _der(c) not in have))
