"""One chunk's commit: every candidate decided again under the registry's write lock.

:class:`provisioning.issuer.Issuer` screens and mints outside any transaction; here, inside
the chunk's ``BEGIN IMMEDIATE`` transaction, each candidate becomes "existing" (the same
key already has a certificate), "rejected" (a device suspended or revoked, a refused key, a
second key without ``--renew``, a renewal that does not hold) or "issued" (device created
or moved, older certificates superseded, the certificate row and its audit events, the
output file promised), because the read-only pre-check may be stale.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from json.encoder import encode_basestring_ascii

from provisioning.registry.audit import detail_json
from provisioning.registry.issuance import ChunkRows
from provisioning.registry.schema import (
    CERT_ACTIVE,
    CERT_SUPERSEDED,
    DEVICE_ACTIVE,
    REFUSED_CERT_STATUSES,
)
from provisioning.registry.transactions import Transaction
from provisioning.signing import Candidate, SignOptions, SignResult, Window

RENEW_REFUSE_ACTION = "certificate.renew.refuse"  # audited: a renewal refused, and why
Mint = Callable[[Candidate, Window], None]  # a (new) serial and certificate for a candidate


class ChunkView(ChunkRows):
    """A chunk's registry rows plus what its audit events and promised files share.

    Per chunk, not per certificate: the audit details that do not vary and the absolute
    output folder (``pending_outputs`` holds absolute paths).
    """

    def __init__(self, tx: Transaction, device_ids: list[str], options: SignOptions,
                 window: Window, *, batched: bool = True) -> None:
        super().__init__(tx, device_ids, batched=batched)
        self.create_detail = detail_json({"group": options.group})
        self.not_after_json = encode_basestring_ascii(window.not_after_iso)
        self._out_prefix: str | None = None
        if options.out_dir is not None:
            folder = str(options.out_dir.absolute())
            self._out_prefix = folder if folder.endswith(os.sep) else folder + os.sep

    def promise(self, device_id: str, serial: str, pem: str,
                writes: list[tuple[str, str]]) -> None:
        """``OUT/<device-id>.pem`` is promised in this transaction, written after it."""
        if self._out_prefix is None:
            return
        path = f"{self._out_prefix}{device_id}.pem"
        self.promise_output(path, serial)
        writes.append((path, pem))


def record(tx: Transaction, view: ChunkView, cand: Candidate, options: SignOptions,
           window: Window, writes: list[tuple[str, str]], mint: Mint) -> None:
    """Decide under the write lock; the read-only pre-check may be stale."""
    device = view.devices.get(cand.device_id)
    if device is not None and device[0] != DEVICE_ACTIVE:
        cand.result = reject(cand, f"device-{device[0]}: device {cand.device_id!r} is "
                             f"{device[0]}; want an active device")
        return
    renewal = options.renew or cand.renews is not None
    target = _renewal_target(tx, view, cand) if cand.renews is not None else None
    if cand.result is not None:
        _refuse_renewal(tx, window, cand)
        return
    same = view.newest_with_key(cand.device_id, cand.key_sha256)
    if same is not None:
        serial, status, pem = same
        if status in REFUSED_CERT_STATUSES:
            cand.result = reject(cand, f"key-{status.replace('_', '-')}: the certificate "
                                 f"for this key ({serial}) is {status}; make a new key")
            return
        # DESIGN section 10: a renewal needs a key the device has never used. The same CSR
        # again (its certificate still the device's active one: a retry, the answer lost)
        # returns that certificate; the key of the certificate being renewed, or of any
        # superseded one, is refused. A plain sign of an old CSR keeps returning its
        # certificate, superseded or not: re-submission is idempotent (DESIGN section 3).
        if renewal and (status != CERT_ACTIVE or serial == cand.renews):
            cand.result = reject(cand, f"renew-key-reused: this key is the key of the "
                                 f"device's certificate {serial} ({status}); a renewal "
                                 "needs a key the device has never used: make a new key")
            _refuse_renewal(tx, window, cand)
            return
        cand.result = SignResult(cand.source, cand.device_id, "existing", serial, pem=pem,
                                 note=group_note(cand.device_id, device, options))
        view.promise(cand.device_id, serial, pem, writes)
        return
    current = view.live_serials(cand.device_id)
    if current and not options.renew:
        cand.result = reject(cand, f"has-certificate: device {cand.device_id!r} already "
                             f"has active certificate {current[0]} for another key; "
                             "use --renew (EST: simplereenroll) to replace it")
        return
    # The certificate being renewed must be the device's active one: a superseded one was
    # renewed already, a held or revoked one is not the device's to renew.
    if target is not None:
        inactive = [] if target == CERT_ACTIVE else [(cand.renews or "", target)]
    else:
        inactive = [(s, st) for s, st in view.current_statuses(cand.device_id)
                    if st != CERT_ACTIVE]
    if renewal and inactive:
        serial, status = inactive[0]
        cand.result = reject(cand, f"renew-not-active: certificate {serial} is {status}; "
                             "want the device's active certificate")
        _refuse_renewal(tx, window, cand)
        return
    if cand.der is None:  # the pre-check saw this key, but it has gone since: mint now
        mint(cand, window)
    _issue(tx, view, cand, options, window, writes, mint, device, current)


def _issue(tx: Transaction, view: ChunkView, cand: Candidate, options: SignOptions,
           window: Window, writes: list[tuple[str, str]], mint: Mint,
           device: tuple[str, str | None] | None, current: list[str]) -> None:
    """The decision is "issued": device created or moved, *current* superseded, the row."""
    stamp = window.stamp
    if device is None:
        view.add_device(cand.device_id, options.group, stamp)
        tx.audit_text(stamp, "device.create", cand.device_id, None, view.create_detail,
                      actor=cand.actor)
    elif options.group is not None and device[1] != options.group:
        view.flush()  # the device row may be one of this chunk's pending inserts
        tx.set_group(cand.device_id, options.group, stamp)
        view.devices[cand.device_id] = (DEVICE_ACTIVE, options.group)
        tx.audit(stamp, "device.group", cand.device_id, None,
                 {"from": device[1], "to": options.group}, actor=cand.actor)
    if current:
        view.flush()  # an old certificate's row may be one of this chunk's pending rows
    for old in current:
        tx.supersede(old, stamp)
        view.set_status(cand.device_id, old, CERT_SUPERSEDED)
        tx.audit(stamp, "certificate.supersede", cand.device_id, old, {"by": "renewal"},
                 actor=cand.actor)
    serial = _store(tx, view, cand, window, mint)
    view.add_certificate(cand.device_id, serial, cand.key_sha256, cand.pem)
    # detail_json({"source": ..., "renewal": ..., "not_after": ...}), spelled out
    tx.audit_text(stamp, "certificate.issue", cand.device_id, serial,
                  f'{{"not_after":{view.not_after_json},'
                  f'"renewal":{"true" if current else "false"},'
                  f'"source":{encode_basestring_ascii(cand.source)}}}', actor=cand.actor)
    cand.result = SignResult(cand.source, cand.device_id, "issued", serial, pem=cand.pem)
    view.promise(cand.device_id, serial, cand.pem, writes)


def _renewal_target(tx: Transaction, view: ChunkView, cand: Candidate) -> str | None:
    """Re-read under the write lock: the certificate being renewed is the device's; its
    status (None, with ``cand.result`` set, when it is not)."""
    view.flush()  # its row may be one of this chunk's pending rows
    assert cand.renews is not None  # noqa: S101 (only renewals are checked)
    row = tx.renewal_target(cand.renews)
    if row is None:
        cand.result = reject(cand, f"renew-unknown: certificate {cand.renews} is not in "
                             "the registry")
    elif row[0] != cand.device_id:
        cand.result = reject(cand, f"device-mismatch: the CSR names {cand.device_id!r}, "
                             f"the certificate being renewed names {row[0]!r}; want the "
                             "same device id")
    elif row[1] in REFUSED_CERT_STATUSES:
        cand.result = reject(cand, f"renew-{row[1].replace('_', '-')}: certificate "
                             f"{cand.renews} is {row[1]}; it cannot be renewed")
    else:
        return row[1]
    return None


def _refuse_renewal(tx: Transaction, window: Window, cand: Candidate) -> None:
    """A refused renewal is audited (a refused first enrollment is only answered): who
    tried to replace which device's certificate, and why."""
    assert cand.result is not None  # noqa: S101
    tx.audit(window.stamp, RENEW_REFUSE_ACTION, cand.device_id, cand.renews,
             {"reason": cand.result.reason, "source": cand.source}, actor=cand.actor)


def _store(tx: Transaction, view: ChunkView, cand: Candidate, window: Window,
           mint: Mint) -> str:
    """The certificate row: kept for the chunk's one INSERT statement, or inserted now."""
    if not view.batched:
        return _insert(tx, cand, window, mint)
    view.certificate_rows.append(
        (cand.serial, cand.device_id, cand.fingerprint, cand.key_sha256,
         window.not_before_iso, window.not_after_iso, window.stamp, cand.pem,
         window.issuer_key_id))
    return cand.serial


def _insert(tx: Transaction, cand: Candidate, window: Window, mint: Mint) -> str:
    """Insert the row; a serial collision (2^-159 odds) is re-minted, never reused."""
    while not tx.store_certificate(
            (cand.serial, cand.device_id, cand.fingerprint, cand.key_sha256,
             window.not_before_iso, window.not_after_iso, window.stamp, cand.pem,
             window.issuer_key_id)):
        mint(cand, window)
    return cand.serial


def group_note(device_id: str, device: tuple[str, str | None] | None,
               options: SignOptions) -> str | None:
    """Why ``--group`` was not applied to an existing certificate's device, or None.

    Re-submitting a CSR returns its certificate and changes nothing else: moving a device
    is ``group set``'s job, an explicit and audited act of its own.
    """
    if options.group is None or device is None or device[1] == options.group:
        return None
    where = f"group {device[1]!r}" if device[1] is not None else "no group"
    return (f"--group {options.group!r} ignored: device {device_id!r} exists and stays in "
            f"{where}; move it with fleet-provision group set")


def reject(cand: Candidate, reason: str) -> SignResult:
    return SignResult(cand.source, cand.device_id, "rejected", reason=reason)
