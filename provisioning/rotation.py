"""Issuing-CA rotation (DESIGN section 10, issue 14): a new intermediate under the same root,
an overlap while the old one's certificates are still in service, then its retirement.

``rotate`` needs the root key once (from where it is kept offline, ``--root-key``). It
makes a new EC P-256 intermediate (pathlen 0, a new generation number in its CN so the two
never share a subject name), keeps the old pair as ``retiring/issuing-ca-<serial>.pem`` and
``.key``, and makes the new one ``issuing-ca.pem``/``.key``: from then on it signs
everything new. ``ca-chain.pem`` carries both (new first) and the root; ``crl.pem`` one CRL
per live issuer (:func:`provisioning.crl.publish_crl`). Certificate rows written before the
registry recorded issuers are stamped with the old CA's key identifier in the same
transaction, so every row names its issuer from then on.

``retire`` drops the retiring CA once no certificate it signed is in service (active,
superseded within its grace, or on hold, and not expired): its certificate moves to
``retired/``, its key is deleted, the chain and ``crl.pem`` carry the current CA only.

Both run in one registry write transaction, with their audit event (``issuing-ca.rotate``,
``issuing-ca.retire``), and write the files inside it, ``ca-chain.pem`` last among the
issuers' files: another process holding the CAs (the enrollment service's worker,
:meth:`provisioning.authority.Authority.refresh_cas`) re-reads them when ``ca-chain.pem``
changed, once it got the same lock (so after the commit, or after a rollback put the files
back): it never signs with a CA that was not committed. If anything fails before the
commit, every file is put back as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.authority import Authority
from provisioning.crl import publish_crl
from provisioning.errors import InUseError, PassphraseError, PKIError, UsageError
from provisioning.fsutil import atomic_write, create_exclusive
from provisioning.pki import IssuingCA, key_pem, load_private_key, new_issuing_ca
from provisioning.serial import format_serial
from provisioning.timefmt import iso, utcnow

ROTATE_ACTION = "issuing-ca.rotate"
RETIRE_ACTION = "issuing-ca.retire"
_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Rotated:
    """What ``rotate`` did: the new CA, and where the old one now lives."""

    new: x509.Certificate
    old: x509.Certificate
    retiring_cert: Path
    stamped: int  # certificate rows that had no issuer recorded (all the old CA's)


@dataclass(frozen=True)
class Retired:
    """What ``retire`` did: the CA dropped, and where its certificate was kept."""

    old: x509.Certificate
    retired_cert: Path


@dataclass(frozen=True)
class IssuerInfo:
    """One live issuing CA, as ``issuing-ca show`` lists it."""

    cert: x509.Certificate
    current: bool
    in_service: int  # certificates it signed still in service
    latest_not_after: str | None


def cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def load_root_key(path: Path, passphrase: bytes | None,
                  root_cert: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    """The root key from *path* (``--root-key``), checked to be the root certificate's."""
    if not path.is_file():
        raise UsageError(f"no root CA key at {path} (moved offline?): give where it is with "
                         "--root-key PATH", "--root-key")
    try:
        key = load_private_key(path, passphrase)
    except PassphraseError as exc:
        raise PassphraseError(exc.message.replace("--passphrase-env",
                                                  "--root-passphrase-env"),
                              "--root-passphrase-env") from None
    except PKIError as exc:
        raise UsageError(exc.message, "--root-key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != \
            root_cert.public_key():
        raise UsageError(f"{path} is not the key of root-ca.pem", "--root-key")
    return key


def rotate(authority: Authority, root_key_path: Path,
           root_passphrase: bytes | None) -> Rotated:
    """``issuing-ca rotate``: see the module docstring. Refused while a retiring CA is
    still live (one overlap at a time: retire it first)."""
    paths = authority.paths
    live = paths.retiring_files()
    if live:
        raise InUseError(f"issuing CA {live[0][0].name} is still retiring: retire it first "
                         "(fleet-provision issuing-ca retire)", str(paths.retiring))
    old = authority.ca  # the issuing passphrase is checked before the root key is read
    root_cert = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    root_key = load_root_key(root_key_path, root_passphrase, root_cert)
    now = utcnow()
    generation = authority.registry.count_events(ROTATE_ACTION) + 2
    new = new_issuing_ca(authority.config, root_cert, root_key, generation, now)
    while new.cert.subject == old.cert.subject:  # an old CA named by hand: never the same
        generation += 1
        new = new_issuing_ca(authority.config, root_cert, root_key, generation, now)
    old_serial = format_serial(old.cert.serial_number)
    retiring_cert = paths.retiring / f"issuing-ca-{old_serial}.pem"
    retiring_key = retiring_cert.with_suffix(".key")
    saved = _Saved([paths.issuing_key, paths.issuing_cert, paths.chain, paths.crl])
    created: list[Path] = []
    try:
        with authority.registry.write(authority.actor) as tx:
            stamped = tx.stamp_issuer(old.key_id)
            paths.retiring.mkdir(mode=0o700, exist_ok=True)
            create_exclusive(retiring_key, saved.data[paths.issuing_key], 0o600)
            created.append(retiring_key)
            create_exclusive(retiring_cert, old.cert.public_bytes(_PEM), 0o644)
            created.append(retiring_cert)
            atomic_write(paths.issuing_key, key_pem(new.key, authority.passphrase), 0o600)
            atomic_write(paths.issuing_cert, new.cert.public_bytes(_PEM))
            atomic_write(paths.chain, _chain(new, [old], root_cert))
            publish_crl(tx, new, authority.config, paths.crl, now, others=(old,))
            tx.audit(iso(now), ROTATE_ACTION, None, format_serial(new.cert.serial_number),
                     {"subject": new.cert.subject.rfc4514_string(),
                      "not_after": iso(new.cert.not_valid_after_utc),
                      "previous": old_serial,
                      "previous_subject": old.cert.subject.rfc4514_string(),
                      "retiring": str(retiring_cert.relative_to(paths.root)),
                      "stamped": stamped})
    except BaseException:
        saved.restore()
        for path in created:
            path.unlink(missing_ok=True)
        raise
    authority.reload_cas()
    return Rotated(new.cert, old.cert, retiring_cert, stamped)


def retire(authority: Authority) -> Retired | None:
    """``issuing-ca retire``: drop the retiring CA when nothing in service needs it; None
    when no CA is retiring. :class:`InUseError` (exit 1) names how many still need it."""
    paths = authority.paths
    live = paths.retiring_files()
    if not live:
        return None
    cert_path, key_path = live[-1]  # the oldest
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    old_key_id = old.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()
    authority.refresh_cas()
    root_cert = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    now = utcnow()
    retired_cert = paths.retired / cert_path.name
    saved = _Saved([key_path, paths.chain, paths.crl])
    moved = False
    try:
        with authority.registry.write(authority.actor) as tx:
            ca, others = authority.ca, authority.retiring
            _refuse_if_needed(authority, old, old_key_id, iso(now),
                              str(cert_path.relative_to(paths.root)))
            remaining = tuple(o for o in others if o.cert != old)
            paths.retired.mkdir(mode=0o755, exist_ok=True)
            cert_path.replace(retired_cert)
            moved = True
            key_path.unlink()
            atomic_write(paths.chain, _chain(ca, list(remaining), root_cert))
            publish_crl(tx, ca, authority.config, paths.crl, now, others=remaining)
            tx.audit(iso(now), RETIRE_ACTION, None, format_serial(old.serial_number),
                     {"subject": old.subject.rfc4514_string(),
                      "retired": str(retired_cert.relative_to(paths.root))})
    except BaseException:
        if moved:
            retired_cert.replace(cert_path)
        saved.restore()
        raise
    authority.reload_cas()
    with contextlib.suppress(OSError):
        paths.retiring.rmdir()  # empty now: nothing is retiring
    return Retired(old, retired_cert)


def show(authority: Authority) -> list[IssuerInfo]:
    """The live issuing CAs, current first, each with how many certificates it signed are
    still in service (no key is loaded)."""
    paths = authority.paths
    current = authority.pki.issuing_cert
    retiring = [x509.load_pem_x509_certificate(pem.read_bytes())
                for pem, _ in paths.retiring_files()]
    counts = authority.registry.in_service_by_issuer(iso(utcnow()))
    unstamped = counts.get(None)
    found: list[IssuerInfo] = []
    for cert in [current, *retiring]:
        key_id = cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest.hex()
        count, latest = counts.get(key_id, (0, None))
        if unstamped is not None and cert is current and not retiring:
            # Rows from before v4: the one issuing CA's until a rotation stamps them.
            count, latest = count + unstamped[0], max(latest or "", unstamped[1])
        found.append(IssuerInfo(cert, cert is current, count, latest))
    return found


def _refuse_if_needed(authority: Authority, old: x509.Certificate, key_id: str, now_iso: str,
                      where: str) -> None:
    """:class:`InUseError` when certificates of the CA *key_id* are still in service (rows
    with no issuer recorded count too: a rotation stamped them all, so any left came from a
    tool older than v4)."""
    counts = authority.registry.in_service_by_issuer(now_iso)
    count, latest = counts.get(key_id, (0, ""))
    if None in counts:
        count += counts[None][0]
        latest = max(latest, counts[None][1])
    if count:
        raise InUseError(f"{count} certificate(s) issued by {cn(old)} are still in service "
                         f"(the last expires {latest}): revoke them or let them expire first "
                         "(fleet-provision issuing-ca show counts them, fleet-provision "
                         "expiring --within DURATION lists them)", where)


def _chain(current: IssuingCA, retiring: list[IssuingCA], root: x509.Certificate) -> bytes:
    """``ca-chain.pem``: every live issuing CA (current first), then the root."""
    certs = [current.cert, *(c.cert for c in retiring), root]
    return b"".join(c.public_bytes(_PEM) for c in certs)


class _Saved:
    """Files as they were before a rotation step, to put back if it fails."""

    def __init__(self, paths: list[Path]) -> None:
        self.data = {path: path.read_bytes() for path in paths if path.exists()}
        self.modes = {path: path.stat().st_mode & 0o777 for path in self.data}

    def restore(self) -> None:
        for path, data in self.data.items():
            with contextlib.suppress(OSError):
                atomic_write(path, data, self.modes[path])


__all__ = ["RETIRE_ACTION", "ROTATE_ACTION", "IssuerInfo", "Retired", "Rotated", "load_root_key",
           "retire", "rotate", "show"]
