"""Batch issuance: CSRs in, certificates out, each in the registry, on disk and in the log.

Signing is CPU work done outside any transaction; the registry is written once per chunk in a
single ``BEGIN IMMEDIATE`` transaction that re-checks every decision under the write lock, so
concurrent ``sign`` processes neither duplicate nor lose anything. Output files are promised
in ``pending_outputs`` inside that transaction and written right after the commit; a crash in
between is finished by the next ``sign`` (:func:`finish_pending_outputs`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, Literal, cast

from provisioning.certfiles import FileWriter, remove_dead_temporaries
from provisioning.config import PKIConfig
from provisioning.csr import CSRFormatError, CSRInput, parse_csr
from provisioning.pki import IssuingCA
from provisioning.policy import CSRContext, check
from provisioning.profile import (
    DeviceTemplate,
    IssuablePublicKey,
    certificate_pem,
    random_serial,
    validity,
)
from provisioning.registry.audit import detail_json
from provisioning.registry.issuance import ChunkRows, SerialCollisionError
from provisioning.registry.schema import (
    CERT_SUPERSEDED,
    DEVICE_ACTIVE,
    REFUSED_CERT_STATUSES,
)
from provisioning.registry.store import Registry, operator
from provisioning.registry.transactions import Transaction
from provisioning.serial import format_serial
from provisioning.timefmt import iso, utcnow

# CSRs per registry transaction (and the most the enrollment service batches): each commit
# fsyncs the WAL and rewrites the index pages (serial, fingerprint, key hash: random keys)
# its rows touch, so larger chunks write less; 512 measured best on disk against 256 and
# 1024 (10,000 certificates: 128, 114, 104 MB written), about 0.2 s of signing each.
CHUNK = 512
# The old name of format_serial, for callers outside provisioning/ (device_sim/enroll.py,
# tests/integration); new code imports provisioning.serial.
serial_hex = format_serial
Status = Literal["issued", "existing", "rejected"]


@dataclass(frozen=True)
class SignResult:
    """The outcome for one CSR, as ``sign --json`` prints it."""

    source: str
    device_id: str | None
    status: Status
    serial: str | None = None
    reason: str | None = None
    # The certificate (PEM) for "issued" and "existing": what the enrollment service returns.
    pem: str | None = field(default=None, repr=False, compare=False)
    # Something asked for but not done, the CSR still accepted: a --group that an existing
    # device keeps its own group against (issue 11 defect 12: it was ignored silently).
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """DESIGN section 4's keys; ``note`` is added only when there is one."""
        row: dict[str, Any] = {"source": self.source, "device_id": self.device_id,
                               "status": self.status, "serial": self.serial,
                               "reason": self.reason}
        if self.note is not None:
            row["note"] = self.note
        return row


@dataclass(frozen=True)
class SignOptions:
    manifest: frozenset[str] | None = None
    group: str | None = None
    days: int | None = None
    out_dir: Path | None = None
    renew: bool = False


@dataclass(frozen=True)
class _Window:
    """One chunk's clock: its certificates share the times, so they are formatted once."""

    stamp: str  # iso(now): issued_at and the audit events' time
    not_before_iso: str
    not_after_iso: str
    template: DeviceTemplate  # device_certificate for this validity, fixed parts made once


def _window(ca: IssuingCA, config: PKIConfig, days: int, now: dt.datetime,
            previous: _Window | None = None) -> _Window:
    """Validity counts from the minute (DESIGN: back-dated "by a few minutes"), so every
    chunk of that minute shares the *previous* window's template, proven once: the enrollment
    service signs many small chunks, and building and proving a template costs about two
    certificates."""
    not_before, not_after = validity(ca, days, now.replace(second=0, microsecond=0))
    if (previous is not None and previous.template.not_before == not_before
            and previous.template.not_after == not_after):
        template = previous.template
    else:
        template = DeviceTemplate(ca, config, not_before, not_after)
    return _Window(iso(now), iso(not_before), iso(not_after), template)


@dataclass
class _Candidate:
    source: str
    device_id: str
    key_sha256: str
    public_key: IssuablePublicKey
    spki_der: bytes  # the key's DER SubjectPublicKeyInfo: its hash above, and the SKI
    actor: str | None = None
    renews: str | None = None
    der: bytes | None = None  # the certificate, once minted
    result: SignResult | None = None
    pem: str = field(default="")
    serial: str = field(default="")  # format_serial of the certificate
    fingerprint: str = field(default="")  # SHA-256 of der, hex


class Issuer:
    """Signs CSRs for one PKI; ``progress`` is told after every committed chunk."""

    def __init__(self, registry: Registry, ca: IssuingCA, config: PKIConfig,
                 actor: str | None = None) -> None:
        self.actor = actor or operator()
        self.registry = registry
        self.ca = ca
        self.config = config
        self._window: _Window | None = None  # the last chunk's: its template is reused

    def sign(self, inputs: list[CSRInput], options: SignOptions,
             progress: Callable[[list[SignResult]], None] | None = None,
             in_transaction: Callable[[Transaction], None] | None = None) -> list[SignResult]:
        """Issue per chunk; *in_transaction* also writes into each chunk's transaction.

        The enrollment service passes its queued audit events that way, so a busy batch
        costs one commit instead of two.
        """
        self.finish_pending_outputs()
        if options.out_dir is not None:
            options.out_dir.mkdir(parents=True, exist_ok=True)
        results: list[SignResult] = []
        # The files of a chunk are written right after its commit, in this thread: a writer
        # thread would wait for the GIL between every syscall while signing holds it. Their
        # promises are cleared in the next chunk's transaction, saving a commit per chunk.
        written: list[str] = []
        for start in range(0, len(inputs), CHUNK):
            chunk, writes = self._sign_chunk(inputs[start:start + CHUNK], options,
                                             in_transaction, written)
            written = self._write_files(writes)
            results.extend(chunk)
            if progress is not None:
                progress(chunk)
        self._clear_promises(written)
        return results

    def _sign_chunk(self, inputs: list[CSRInput], options: SignOptions,
                    in_transaction: Callable[[Transaction], None] | None = None,
                    written: list[str] | None = None,
                    ) -> tuple[list[SignResult], list[tuple[str, str]]]:
        window = self._window = _window(self.ca, self.config,
                                        options.days or self.config.default_days, utcnow(),
                                        self._window)
        slots: list[SignResult | _Candidate] = [self._screen(item, options) for item in inputs]
        candidates = [s for s in slots if isinstance(s, _Candidate)]
        known = self.registry.known_keys([(c.device_id, c.key_sha256) for c in candidates])
        for cand in candidates:
            if (cand.device_id, cand.key_sha256) not in known or cand.renews is not None:
                self._mint(cand, window)
        try:
            writes = self._commit(candidates, options, window, in_transaction, written,
                                  batched=True)
        except SerialCollisionError:
            # Odds of 2^-159 a certificate, or a bug; that transaction was rolled back whole.
            # Decide the chunk again, inserting row by row, which re-mints a colliding
            # certificate before its audit event and file name its serial.
            for cand in candidates:
                cand.result = None
            writes = self._commit(candidates, options, window, in_transaction, written,
                                  batched=False)
        return [s if isinstance(s, SignResult) else _result(s) for s in slots], writes

    def _commit(self, candidates: list[_Candidate], options: SignOptions, window: _Window,
                in_transaction: Callable[[Transaction], None] | None,
                written: list[str] | None, *, batched: bool) -> list[tuple[str, str]]:
        """Decide and record *candidates* in one transaction; the files it promises.

        *batched*: certificate rows are inserted with one statement per chunk (raising
        :class:`SerialCollisionError` when one collides), else one at a time.
        """
        writes: list[tuple[str, str]] = []
        with self.registry.write(actor=self.actor) as tx:
            # New device and certificate rows are inserted in one statement per chunk; a
            # certificate row may precede its device row: the reference is checked at COMMIT.
            tx.defer_foreign_keys()
            view = _ChunkView(tx, [c.device_id for c in candidates], options, window,
                              batched=batched)
            for cand in candidates:
                self._record(tx, view, cand, options, window, writes)
            view.flush()
            if in_transaction is not None:
                in_transaction(tx)
            if written:
                tx.clear_promises(written)
        return writes

    def _screen(self, item: CSRInput, options: SignOptions) -> SignResult | _Candidate:
        try:
            csr = parse_csr(item.data)
        except CSRFormatError as exc:
            return SignResult(item.source, None, "rejected", reason=str(exc))
        ctx = CSRContext(csr, self.config.trust_domain, options.manifest)
        rejection = check(ctx)
        device_id = _cn_or_none(ctx)
        if rejection is not None:
            return SignResult(item.source, device_id, "rejected", reason=str(rejection))
        public_key = cast("IssuablePublicKey", ctx.public_key)  # key_type_allowed checked it
        assert device_id is not None  # cn_is_device_id accepted it  # noqa: S101
        der = ctx.spki_der
        return _Candidate(item.source, device_id, hashlib.sha256(der).hexdigest(), public_key,
                          der, actor=item.actor, renews=item.renews)

    def _mint(self, cand: _Candidate, window: _Window) -> None:
        serial = random_serial()
        der = window.template.certificate_der(cand.device_id, cand.public_key, serial,
                                              cand.spki_der)
        cand.der = der
        cand.pem = certificate_pem(der)  # what cert.public_bytes(PEM) gives, from the DER
        cand.fingerprint = hashlib.sha256(der).hexdigest()  # cert.fingerprint(SHA256())
        cand.serial = format_serial(serial)

    def _record(self, tx: Transaction, view: _ChunkView, cand: _Candidate,
                options: SignOptions, window: _Window,
                writes: list[tuple[str, str]]) -> None:
        """Decide under the write lock; the read-only pre-check may be stale."""
        device = view.devices.get(cand.device_id)
        if device is not None and device[0] != DEVICE_ACTIVE:
            cand.result = _reject(cand, f"device-{device[0]}: device {cand.device_id!r} is "
                                  f"{device[0]}; want an active device")
            return
        if cand.renews is not None and not self._renewable(tx, view, cand):
            return
        same = view.newest_with_key(cand.device_id, cand.key_sha256)
        # RFC 7030 4.2.2: re-enrolling with the key of the certificate being renewed renews
        # it. A retry after that renewal finds the newer certificate first: "existing".
        if same is not None and same[0] == cand.renews:
            same = None
        if same is not None:
            serial, status, pem = same
            if status in REFUSED_CERT_STATUSES:
                cand.result = _reject(cand, f"key-{status.replace('_', '-')}: the certificate "
                                      f"for this key ({serial}) is {status}; make a new key")
                return
            cand.result = SignResult(cand.source, cand.device_id, "existing", serial, pem=pem,
                                     note=_group_note(cand.device_id, device, options))
            view.promise(cand.device_id, serial, pem, writes)
            return
        current = view.live_serials(cand.device_id)
        if current and not options.renew:
            cand.result = _reject(cand, f"has-certificate: device {cand.device_id!r} already "
                                  f"has active certificate {current[0]} for another key; "
                                  "use --renew (EST: simplereenroll) to replace it")
            return
        if cand.der is None:  # the pre-check saw this key, but it has gone since: mint now
            self._mint(cand, window)
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
            tx.supersede(old)
            view.set_status(cand.device_id, old, CERT_SUPERSEDED)
            tx.audit(stamp, "certificate.supersede", cand.device_id, old, {"by": "renewal"},
                     actor=cand.actor)
        serial = self._store(tx, view, cand, window)
        view.add_certificate(cand.device_id, serial, cand.key_sha256, cand.pem)
        # detail_json({"source": ..., "renewal": ..., "not_after": ...}), spelled out
        tx.audit_text(stamp, "certificate.issue", cand.device_id, serial,
                      f'{{"not_after":{view.not_after_json},'
                      f'"renewal":{"true" if current else "false"},'
                      f'"source":{encode_basestring_ascii(cand.source)}}}', actor=cand.actor)
        cand.result = SignResult(cand.source, cand.device_id, "issued", serial, pem=cand.pem)
        view.promise(cand.device_id, serial, cand.pem, writes)

    @staticmethod
    def _renewable(tx: Transaction, view: _ChunkView, cand: _Candidate) -> bool:
        """Re-checked under the write lock: the renewed certificate is the device's and live."""
        view.flush()  # its row may be one of this chunk's pending rows
        assert cand.renews is not None  # noqa: S101 (only renewals are checked)
        row = tx.renewal_target(cand.renews)
        if row is None:
            cand.result = _reject(cand, f"renew-unknown: certificate {cand.renews} is not in "
                                  "the registry")
        elif row[0] != cand.device_id:
            cand.result = _reject(cand, f"device-mismatch: the CSR names {cand.device_id!r}, "
                                  f"the certificate being renewed names {row[0]!r}; want the "
                                  "same device id")
        elif row[1] in REFUSED_CERT_STATUSES:
            cand.result = _reject(cand, f"renew-{row[1].replace('_', '-')}: certificate "
                                  f"{cand.renews} is {row[1]}; it cannot be renewed")
        return cand.result is None

    def _store(self, tx: Transaction, view: _ChunkView, cand: _Candidate,
               window: _Window) -> str:
        """The certificate row: kept for the chunk's one INSERT statement, or inserted now."""
        if not view.batched:
            return self._insert(tx, cand, window)
        view.certificate_rows.append(
            (cand.serial, cand.device_id, cand.fingerprint, cand.key_sha256,
             window.not_before_iso, window.not_after_iso, window.stamp, cand.pem))
        return cand.serial

    def _insert(self, tx: Transaction, cand: _Candidate, window: _Window) -> str:
        """Insert the row; a serial collision (2^-159 odds) is re-minted, never reused."""
        while not tx.store_certificate(
                (cand.serial, cand.device_id, cand.fingerprint, cand.key_sha256,
                 window.not_before_iso, window.not_after_iso, window.stamp, cand.pem)):
            self._mint(cand, window)
        return cand.serial

    def _write_files(self, writes: list[tuple[str, str]]) -> list[str]:
        """Write promised files (each complete before it has its name: :class:`FileWriter`).

        No fsync: SIGKILL cannot lose them, and after a power cut re-running the same batch
        rewrites every file from the registry (each CSR comes back "existing").
        """
        writer = FileWriter(self.ca.chain_pem)
        try:
            for path, pem in writes:
                writer.write(path, pem)
        finally:
            writer.close()
        return [path for path, _ in writes]

    def _clear_promises(self, written: list[str]) -> None:
        if not written:
            return
        with self.registry.write(actor=self.actor) as tx:
            tx.clear_promises(written)

    def finish_pending_outputs(self) -> int:
        """Write the files an interrupted run committed but did not get to write."""
        writes = self.registry.pending_outputs()
        for folder in {Path(path).parent for path, _ in writes}:
            folder.mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries(folder)
        self._clear_promises(self._write_files(writes))
        return len(writes)


class _ChunkView(ChunkRows):
    """A chunk's registry rows plus what its audit events and promised files share.

    Per chunk, not per certificate: the audit details that do not vary and the absolute
    output folder (``pending_outputs`` holds absolute paths).
    """

    def __init__(self, tx: Transaction, device_ids: list[str], options: SignOptions,
                 window: _Window, *, batched: bool = True) -> None:
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


def _result(cand: _Candidate) -> SignResult:
    assert cand.result is not None  # noqa: S101
    return cand.result


def _group_note(device_id: str, device: tuple[str, str | None] | None,
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


def _reject(cand: _Candidate, reason: str) -> SignResult:
    return SignResult(cand.source, cand.device_id, "rejected", reason=reason)


def _cn_or_none(ctx: CSRContext) -> str | None:
    with contextlib.suppress(IndexError, ValueError):
        return ctx.device_id
    return None
