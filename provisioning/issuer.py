"""Batch issuance: CSRs in, certificates out, each in the registry, on disk and in the log.

Signing is CPU work done outside any transaction; the registry is written once per chunk in a
single ``BEGIN IMMEDIATE`` transaction that re-checks every decision under the write lock, so
concurrent ``sign`` processes neither duplicate nor lose anything. Output files are promised
in ``pending_outputs`` inside that transaction and written right after the commit; a crash in
between is finished by the next ``sign`` (:func:`finish_pending_outputs`). What is decided in
that transaction is :mod:`provisioning.chunk`'s; the values are :mod:`provisioning.signing`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

from provisioning.certfiles import FileWriter, remove_dead_temporaries
from provisioning.chunk import ChunkView, record
from provisioning.config import PKIConfig
from provisioning.csr import CSRFormatError, CSRInput, parse_csr
from provisioning.pki import IssuingCA
from provisioning.policy import CSRContext, check
from provisioning.profile import IssuablePublicKey, certificate_pem, random_serial
from provisioning.registry.issuance import SerialCollisionError
from provisioning.registry.store import Registry, operator
from provisioning.registry.transactions import Transaction
from provisioning.serial import format_serial
from provisioning.signing import (
    Candidate,
    SignOptions,
    SignResult,
    Status,
    Window,
    chunk_window,
)
from provisioning.timefmt import utcnow

# CSRs per registry transaction (and the most the enrollment service batches): each commit
# fsyncs the WAL and rewrites the index pages (serial, fingerprint, key hash: random keys)
# its rows touch, so larger chunks write less; 512 measured best on disk against 256 and
# 1024 (10,000 certificates: 128, 114, 104 MB written), about 0.2 s of signing each.
CHUNK = 512
# The old name of format_serial, for callers outside provisioning/ (device_sim/enroll.py,
# tests/integration); new code imports provisioning.serial.
serial_hex = format_serial


class Issuer:
    """Signs CSRs for one PKI; ``progress`` is told after every committed chunk.

    *serials* draws each certificate's serial (:func:`provisioning.profile.random_serial`);
    a seam for the tests that make serials collide.
    """

    def __init__(self, registry: Registry, ca: IssuingCA, config: PKIConfig,
                 actor: str | None = None, *,
                 serials: Callable[[], int] = random_serial) -> None:
        self.actor = actor or operator()
        self._serials = serials
        self.registry = registry
        self.ca = ca
        self.config = config
        self._window: Window | None = None  # the last chunk's: its template is reused

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
        window = self._window = chunk_window(self.ca, self.config,
                                             options.validity or self.config.validity,
                                             utcnow(), self._window)
        slots: list[SignResult | Candidate] = [self._screen(item, options) for item in inputs]
        candidates = [s for s in slots if isinstance(s, Candidate)]
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

    def _commit(self, candidates: list[Candidate], options: SignOptions, window: Window,
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
            view = ChunkView(tx, [c.device_id for c in candidates], options, window,
                             batched=batched)
            for cand in candidates:
                record(tx, view, cand, options, window, writes, self._mint)
            view.flush()
            if in_transaction is not None:
                in_transaction(tx)
            if written:
                tx.clear_promises(written)
        return writes

    def _screen(self, item: CSRInput, options: SignOptions) -> SignResult | Candidate:
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
        return Candidate(item.source, device_id, hashlib.sha256(der).hexdigest(), public_key,
                          der, actor=item.actor, renews=item.renews)

    def _mint(self, cand: Candidate, window: Window) -> None:
        serial = self._serials()
        der = window.template.certificate_der(cand.device_id, cand.public_key, serial,
                                              cand.spki_der)
        cand.der = der
        cand.pem = certificate_pem(der)  # what cert.public_bytes(PEM) gives, from the DER
        cand.fingerprint = hashlib.sha256(der).hexdigest()  # cert.fingerprint(SHA256())
        cand.serial = format_serial(serial)

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


def _result(cand: Candidate) -> SignResult:
    assert cand.result is not None  # noqa: S101
    return cand.result


def _cn_or_none(ctx: CSRContext) -> str | None:
    with contextlib.suppress(IndexError, ValueError):
        return ctx.device_id
    return None


__all__ = ["CHUNK", "Issuer", "SignOptions", "SignResult", "Status", "serial_hex"]
