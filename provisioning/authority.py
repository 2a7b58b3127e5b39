"""The CA's operations on one PKI folder, each one registry transaction with its audit event."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509

from provisioning import tokens
from provisioning.config import PKIConfig
from provisioning.crl import REVOKE_REASONS, publish_crl, reason_name
from provisioning.errors import NotFoundError, PassphraseError, UsageError
from provisioning.fsutil import atomic_write, file_stamp
from provisioning.grace import POLICY_ACTOR, Superseded, any_due, revoke_due
from provisioning.identity import device_id_problem, hash_password
from provisioning.issuer import Issuer
from provisioning.pki import PKI, IssuingCA, PKIPaths, init_pki
from provisioning.registry.schema import (
    CERT_REVOKED,
    DEVICE_ACTIVE,
    DEVICE_REVOKED,
    DEVICE_SUSPENDED,
    PKI_INIT_ACTION,
)
from provisioning.registry.store import Registry, operator
from provisioning.registry.transactions import Transaction
from provisioning.serial import format_serial, parse_serial
from provisioning.servercert import IPAddress, issue_server_cert, server_names
from provisioning.timefmt import iso, utcnow


@dataclass(frozen=True)
class Change:
    """What a revoke/suspend/resume did: the serials it touched (empty when nothing changed)."""

    device_id: str
    serials: tuple[str, ...]
    crl_number: int | None


@dataclass(frozen=True)
class GroupMove:
    """One device of ``group set``: its group before; ``moved`` is False when it was there."""

    device_id: str
    previous: str | None
    moved: bool


def check_group(group: str) -> None:
    """A group name follows the device-id rules (it is an ACL's ``{group}``, a topic level)."""
    if device_id_problem(group) is not None:
        raise UsageError(f"group {group!r} is not valid (same rules as a device id)", "--group")


class Authority:
    """An opened PKI: the registry now, the issuing key only when an operation signs."""

    def __init__(self, root: Path, passphrase: bytes | None = None,
                 actor: str | None = None) -> None:
        self.pki = PKI(root)
        self.paths = self.pki.paths
        self.config = self.pki.config
        self.registry = Registry(self.paths.registry)
        self._passphrase = passphrase
        self.actor = actor or operator()
        self._chain_stamp: tuple[int, int, int] | None = None  # ca-chain.pem when loaded

    @property
    def passphrase(self) -> bytes | None:
        """What opens the issuing key: a worker process opens the same PKI with it."""
        return self._passphrase

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> Authority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @cached_property
    def ca(self) -> IssuingCA:
        self._chain_stamp = file_stamp(self.paths.chain)
        return self.pki.load_issuing_ca(self._passphrase)

    @cached_property
    def retiring(self) -> tuple[IssuingCA, ...]:
        """The issuing CAs a rotation replaced and ``retire`` has not dropped: each still
        signs its own certificates' CRL (:func:`provisioning.crl.publish_crl`) and OCSP."""
        return self.pki.load_retiring(self._passphrase)

    def reload_cas(self) -> None:
        """Forget the loaded issuing CAs: the next use reads the PKI folder again."""
        self.pki = PKI(self.paths.root)
        for name in ("ca", "retiring"):
            self.__dict__.pop(name, None)

    def refresh_cas(self, *, settle: bool = True) -> bool:
        """Re-read the issuing CAs when ``ca-chain.pem`` changed since they were loaded (an
        ``issuing-ca rotate`` or ``retire`` by another process: both rewrite it last, under
        the registry's write lock); True when it did. One ``stat`` otherwise: the
        enrollment service's worker asks before each batch. When the new files cannot be
        loaded, raises and keeps the CAs it had.

        *settle*: when it changed, first wait for the registry's write lock (taken and given
        back at once), so a rotation still in its transaction has committed, or rolled back
        and put the files back, before they are read: nothing signs with a CA that was never
        committed. Inside a write transaction (the lock held already) pass False."""
        stamp = file_stamp(self.paths.chain)
        if "ca" not in self.__dict__ or stamp == self._chain_stamp:
            return False
        if settle:
            self.registry.settle()
            stamp = file_stamp(self.paths.chain)
        pki = PKI(self.paths.root)  # all of it loaded before any of it is taken
        ca = pki.load_issuing_ca(self._passphrase)
        retiring = pki.load_retiring(self._passphrase)
        self.pki = pki
        self.__dict__.update(ca=ca, retiring=retiring)
        self._chain_stamp = stamp
        return True

    def _signers(self, *, locked: bool = False) -> tuple[IssuingCA, tuple[IssuingCA, ...]]:
        """The live issuing CAs (current, retiring), as of now: called before a write
        transaction, then again inside it (*locked*), where a rotation by another process is
        either whole or not begun."""
        self.refresh_cas(settle=not locked)
        return self.ca, self.retiring

    def issuer(self) -> Issuer:
        return Issuer(self.registry, self.ca, self.config, self.actor)

    # -- revocation --------------------------------------------------------------------

    def revoke(self, device_id: str, serial: str | None, reason: str) -> Change:
        """Revoke one certificate, or every unrevoked one of the device and the device itself."""
        canonical = _reason(reason)
        self._signers()
        now = utcnow()
        stamp = iso(now)
        with self.registry.write(self.actor) as tx:
            ca, others = self._signers(locked=True)
            serials = self._revoke_in(tx, device_id, serial, canonical, stamp)
            crl = publish_crl(tx, ca, self.config, self.paths.crl, now, others=others)
        return Change(device_id, tuple(serials), _crl_number(crl))

    def revoke_many(self, device_ids: Sequence[str], reason: str) -> list[Change]:
        """Revoke whole devices in one transaction with one new CRL: all of them or none.

        An operator revoking a batch (a compromised production lot) gets one commit and one
        CRL signature instead of one each, so hubs see the whole batch at once.
        """
        canonical = _reason(reason)
        self._signers()
        now = utcnow()
        stamp = iso(now)
        unique = list(dict.fromkeys(device_ids))
        with self.registry.write(self.actor) as tx:
            ca, others = self._signers(locked=True)
            touched = [(device_id, self._revoke_in(tx, device_id, None, canonical, stamp))
                       for device_id in unique]
            crl = publish_crl(tx, ca, self.config, self.paths.crl, now, others=others)
        number = _crl_number(crl)
        return [Change(device_id, tuple(serials), number) for device_id, serials in touched]

    def _revoke_in(self, tx: Transaction, device_id: str, serial: str | None, canonical: str,
                   stamp: str) -> list[str]:
        self._device_status(tx, device_id)
        if serial is not None:
            try:
                wanted = format_serial(parse_serial(serial))
            except ValueError:
                raise UsageError(f"{serial!r} is not a hexadecimal serial", "--serial") from None
            status = tx.certificate_status(wanted, device_id)
            if status is None:
                raise NotFoundError(f"device {device_id!r} has no certificate with serial "
                                    f"{serial}", "--serial")
            serials = [wanted] if status != CERT_REVOKED else []
        else:
            serials = tx.unrevoked_serials(device_id)
            tx.revoke_device(device_id, stamp)
        for s in serials:
            tx.revoke(s, stamp, canonical)
            tx.audit(stamp, "certificate.revoke", device_id, s, {"reason": canonical})
        if serial is None:
            tx.audit(stamp, "device.revoke", device_id, None, {"reason": canonical})
        return serials

    def suspend(self, device_id: str) -> Change:
        """certificateHold on every active certificate; the device cannot enroll meanwhile."""
        return self._hold(device_id, hold=True)

    def resume(self, device_id: str) -> Change:
        """Lift the hold: the certificates return to the status they had before it."""
        return self._hold(device_id, hold=False)

    def _hold(self, device_id: str, *, hold: bool) -> Change:
        self._signers()
        now = utcnow()
        stamp = iso(now)
        with self.registry.write(self.actor) as tx:
            ca, others = self._signers(locked=True)
            status = self._device_status(tx, device_id)
            if status == DEVICE_REVOKED:
                raise UsageError(f"device {device_id!r} is revoked; a revocation cannot be "
                                 f"{'suspended' if hold else 'resumed'}", device_id)
            if hold:
                serials = tx.hold(device_id, stamp)
                new_status, action = DEVICE_SUSPENDED, "device.suspend"
            else:
                serials = tx.release(device_id)
                new_status, action = DEVICE_ACTIVE, "device.resume"
            changed = status != new_status or bool(serials)
            if not changed:
                return Change(device_id, (), None)
            tx.set_device_status(device_id, new_status, stamp)
            tx.audit(stamp, action, device_id, None, {"serials": serials})
            crl = publish_crl(tx, ca, self.config, self.paths.crl, now, others=others)
        return Change(device_id, tuple(serials), _crl_number(crl))

    def sweep_superseded(self, now: dt.datetime | None = None, *,
                         key_optional: bool = False) -> list[Superseded]:
        """Revoke the superseded certificates whose ``renew_grace`` is over (reason
        superseded, actor ``policy``, :mod:`provisioning.grace`) in one transaction, and
        rewrite ``crl.pem`` when there were any. Looks first without the write lock, so an
        idle sweep costs one indexed read.

        *key_optional*: a command that needs no CA key (``group set``, ``token create``...)
        sweeps only when the issuing key opens without a passphrase; else it leaves the
        sweep to the next command that has it (the CRL is re-signed in the same
        transaction, so a sweep never runs without the key)."""
        now = now or utcnow()
        grace = self.config.renew_grace
        if not any_due(self.registry, grace, now):
            return []
        try:
            self._signers()
        except PassphraseError:
            if key_optional:
                return []
            raise
        with self.registry.write(POLICY_ACTOR) as tx:
            ca, others = self._signers(locked=True)
            swept = revoke_due(tx, grace, now)
            if swept:
                publish_crl(tx, ca, self.config, self.paths.crl, now, others=others)
        return swept

    @staticmethod
    def _device_status(tx: Transaction, device_id: str) -> str:
        status = tx.device_status(device_id)
        if status is None:
            raise NotFoundError(f"no device {device_id!r} in the registry", device_id)
        return status

    def publish_crl(self, out: Path | None = None) -> x509.CertificateRevocationList:
        """A fresh CRL; superseded certificates whose grace is over are revoked first, in
        the same transaction (:mod:`provisioning.grace`)."""
        self._signers()
        now = utcnow()
        with self.registry.write(self.actor) as tx:
            ca, others = self._signers(locked=True)
            revoke_due(tx, self.config.renew_grace, now)
            crl = publish_crl(tx, ca, self.config, self.paths.crl, now, extra_out=out,
                              others=others)
            tx.audit(iso(now), "crl.publish", None, None, {"crl_number": _crl_number(crl)})
        return crl

    # -- groups (no CA key needed) ----------------------------------------------------------

    def set_group(self, device_ids: Sequence[str], group: str) -> list[GroupMove]:
        """Move devices to *group* in one transaction: all of them, or none when one is unknown.

        Each move is a ``device.group`` audit event: the audit head moving is what tells a
        hub watching the registry to read the devices' groups again (its ACL ``{group}``).
        """
        check_group(group)
        unique = list(dict.fromkeys(device_ids))
        stamp = iso(utcnow())
        with self.registry.write(self.actor) as tx:
            previous = tx.device_groups(unique)
            unknown = [d for d in unique if d not in previous]
            if unknown:
                shown = ", ".join(repr(d) for d in unknown[:5])
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                raise NotFoundError(f"no device {shown}{more} in the registry; no device was "
                                    "moved", str(self.paths.root))
            moves = [GroupMove(d, previous[d], previous[d] != group) for d in unique]
            for move in moves:
                if not move.moved:
                    continue
                tx.set_group(move.device_id, group, stamp)
                tx.audit(stamp, "device.group", move.device_id, None,
                         {"from": move.previous, "to": group})
        return moves

    # -- hub certificates --------------------------------------------------------------

    def server_cert(self, name: str, ips: Sequence[str], out_dir: Path,
                    days: int | None = None, basename: str = "server") -> tuple[Path, Path]:
        """Key and certificate for a hub (or the enrollment service: ``basename="est-server"``).

        The server's key is made here; a device's never is. *name* and *ips* are checked
        (:func:`server_names`) before anything is signed or written.
        """
        host, addresses = server_names(name, ips)
        return issue_server_cert(self.registry, self.ca, self.config, self.actor, host,
                                 addresses, out_dir, days, basename)

    # -- enrollment tokens and device passwords (no CA key needed) ------------------------

    def create_token(self, name: str) -> str:
        """A new enrollment token; returns the secret, which is stored only as a hash."""
        return tokens.create(self.registry, name, self.actor)

    def revoke_token(self, name: str) -> bool:
        """Revoke a token; False when it was revoked already."""
        return tokens.revoke(self.registry, name, self.actor)

    def set_password(self, device_id: str, password: str | None) -> None:
        """Store the hash of the device's MQTT password (the hub's optional second factor).

        ``None`` clears it. The scrypt hash is computed before the write lock is taken.
        """
        stored = hash_password(password) if password is not None else None
        stamp = iso(utcnow())
        with self.registry.write(self.actor) as tx:
            self._device_status(tx, device_id)
            tx.set_password_hash(device_id, stored, stamp)
            tx.audit(stamp, "device.password.set" if stored else "device.password.clear",
                     device_id)


def _reason(reason: str) -> str:
    canonical = reason_name(reason)
    if canonical is None:
        raise UsageError(f"unknown revocation reason {reason!r}; want one of "
                         f"{', '.join(REVOKE_REASONS)}", "--reason")
    return canonical


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def initialize(root: Path, config: PKIConfig, passphrase: bytes | None) -> PKIPaths:
    """``init``: CA files, registry with its first audit event, an empty CRL, then pki.toml."""
    paths = PKIPaths(root)
    created_root = not root.exists()
    ca_files, issuing = init_pki(root, config, passphrase)
    try:
        now = utcnow()
        with Registry(paths.registry, create=True) as registry, registry.write(operator()) as tx:
            tx.audit(iso(now), PKI_INIT_ACTION, None, None,
                     {"trust_domain": config.trust_domain, "organisation": config.organisation,
                      "encrypted": passphrase is not None})
            publish_crl(tx, issuing, config, paths.crl, now)
        atomic_write(paths.config, config.to_toml().encode())
    except BaseException:
        for path in [*ca_files, paths.crl, paths.registry,
                     paths.registry.with_name("registry.db-wal"),
                     paths.registry.with_name("registry.db-shm")]:
            path.unlink(missing_ok=True)
        if created_root:
            _rmdir_quietly(root)
        raise
    return paths


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


__all__ = ["Authority", "Change", "GroupMove", "IPAddress", "check_group", "initialize",
           "server_names"]
