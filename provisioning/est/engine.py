"""Engine side: the enrollment service's CA worker process, the only code that writes SQLite
or holds the CA key.

Started by :class:`provisioning.est.channel.EngineChannel` as its own interpreter (``python
-c`` running :func:`engine_main`), it opens the PKI as the HTTP process did and takes whatever
arrived on its pipe while it was busy as one batch: every enrollment of the batch goes
through one ``Issuer.sign`` call (one transaction, the same policy, manifest and idempotency
as ``fleet-provision sign``), and the audit events sent meanwhile are written in that same
transaction. Events with no enrollment to ride along with wait for the next one, at most
``EVENT_DELAY_SECONDS`` of idleness or ``CHUNK`` events, then get a commit of their own. The
answers of a batch go back as one message; when the batch also signs enrollments, the quick
answers (feed signatures, OCSP, CRL) go first, before that transaction's commit.

Token secrets are checked here against the registry's rows, re-read whenever another
connection committed (``PRAGMA data_version``), so ``token revoke`` takes effect for every
request picked up after it. A secret not seen before comes back as ``NeedsVerification``
(:mod:`provisioning.est.authorize` decides who is asking).
"""

from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.errors import ProvisioningError
from provisioning.est.authorize import Authorizer, Principal, csr_der, enrollment_reply
from provisioning.est.crlfile import CRLFile
from provisioning.est.messages import (
    LOG_FORMAT,
    SERVICE_ACTOR,
    AuditEvent,
    CRLJob,
    EnrollJob,
    Failed,
    FeedSignJob,
    OCSPJob,
    Setup,
    Statistics,
    text_reply,
    write_audit_events,
)
from provisioning.feed.jws import raw_signature
from provisioning.fsutil import file_stamp
from provisioning.grace import sweep_interval
from provisioning.issuer import CHUNK, SignOptions
from provisioning.ocsp import Responder
from provisioning.registry.transactions import Transaction
from provisioning.timefmt import iso, utcnow
from provisioning.tokens import TokenBook

log = logging.getLogger("provisioning.est")

HOUSEKEEPING_SECONDS = 30.0  # at most; the superseded sweep may want it sooner
# Request events wait this long for the next signing transaction to ride along with, rather
# than paying a commit (an fsync) of their own; an idle worker then writes them on their own.
EVENT_DELAY_SECONDS = 0.05


@dataclass(frozen=True)
class _ToSign:
    csr: bytes
    job: EnrollJob
    who: Principal


def engine_main(fd: int) -> None:
    """The worker process: open the PKI as the HTTP process did, then serve its jobs."""
    conn = Connection(fd)
    # The HTTP process decides when to stop (Ctrl-C reaches the whole process group), and
    # it tells the worker, which then writes the last audit events.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        setup: Setup = conn.recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=setup.log_level, stream=sys.stderr, format=LOG_FORMAT)
    try:
        authority = Authority(setup.root, setup.passphrase, actor=setup.actor)
        try:
            _ = authority.ca
            engine = Engine(authority, setup.manifest, TokenBook(setup.token_key), conn)
        except BaseException:
            authority.close()
            raise
    except Exception as exc:  # noqa: BLE001  (told to the HTTP process, which exits with it)
        conn.send(("failed", str(exc) or type(exc).__name__))
        return
    with authority:
        conn.send(("ready",))
        engine.run()


_Item = tuple[Any, "int | None"]  # (job, its id) or (audit event, None)


class Engine:
    """The CA worker process's batches: the registry connection and the CA key live here."""

    def __init__(self, authority: Authority, manifest: frozenset[str] | None,
                 tokens: TokenBook, conn: Connection) -> None:
        self.authority = authority
        self.tokens = tokens
        self._gate = Authorizer(tokens, authority.registry,
                                frozenset(authority.config.station_groups))
        self._issuer = authority.issuer()
        self._registry = authority.registry
        self._pipe = conn
        self._manifest = manifest
        self._responder = Responder(authority.ca, authority.registry.issued_status,
                                    authority.retiring)
        self._feed_keys = self._signing_keys()
        self._bad_chain: tuple[int, int, int] | None = None  # a ca-chain.pem that failed
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._events: list[AuditEvent] = []
        self._crl = CRLFile(authority.paths.crl)
        self._last_housekeeping = 0.0
        # DESIGN section 10: superseded certificates are revoked at most a quarter of the
        # grace late (provisioning.grace.sweep_interval: 1 s to 30 s).
        self._housekeeping_s = min(HOUSEKEEPING_SECONDS,
                                   sweep_interval(authority.config.renew_grace))
        self._batches = self._jobs = self._largest = self._signed = 0
        self._parent_gone = False
        self.tokens.refresh(self._registry)

    def statistics(self) -> Statistics:
        return Statistics(self._batches, self._jobs, self._largest, self._signed)

    # -- the pipe ----------------------------------------------------------------------------

    def _read(self) -> None:
        """A thread that always drains the pipe, so the HTTP process never waits on a write."""
        try:
            while True:
                for message in self._pipe.recv():
                    kind = message[0]
                    if kind == "job":
                        self._queue.put((message[2], message[1]))
                    elif kind == "audit":
                        self._queue.put((message[1], None))
                    elif kind == "remember":
                        self.tokens.remember(*message[1:])
                    else:  # stop
                        self._queue.put(None)
                        return
        except (EOFError, OSError):  # the HTTP process is gone: write what came, then exit
            self._queue.put(None)

    def _reply(self, message: tuple[Any, ...]) -> None:
        if self._parent_gone:
            return
        try:
            self._pipe.send(message)
        except OSError as exc:
            log.warning("the HTTP process is gone (%s): writing the last audit events", exc)
            self._parent_gone = True

    def run(self) -> None:
        threading.Thread(target=self._read, name="est-worker-pipe", daemon=True).start()
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(
                    timeout=EVENT_DELAY_SECONDS if self._events else self._housekeeping_s)
            except queue.Empty:
                self._flush_events()
                if time.monotonic() - self._last_housekeeping >= self._housekeeping_s:
                    self._housekeeping()
                continue
            batch: list[_Item] = []
            item: _Item | None = first
            while item is not None:
                batch.append(item)
                if len(batch) >= CHUNK:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            if batch:
                try:
                    self._handle(batch)
                except Exception as exc:  # a bug: fail these requests, keep the worker alive
                    log.exception("enrollment service batch failed")
                    failed = Failed(f"{type(exc).__name__}: {exc}")
                    self._reply(("done", [(job_id, failed) for _, job_id in batch
                                          if job_id is not None], self.statistics()))
            if time.monotonic() - self._last_housekeeping >= self._housekeeping_s:
                self._housekeeping()
        self._flush_events()
        self._reply(("stopped", self.statistics()))

    # -- the issuing CAs ---------------------------------------------------------------------

    def _signing_keys(self) -> dict[bytes, ec.EllipticCurvePrivateKey]:
        """SHA-256 of each live issuing CA's DER -> its key (a feed JWS names its signer)."""
        return {ca.cert.fingerprint(hashes.SHA256()): ca.key
                for ca in (self.authority.ca, *self.authority.retiring)}

    def _refresh_cas(self) -> None:
        """Take a rotation or retirement made by ``fleet-provision issuing-ca`` (another
        process): one ``stat`` of ca-chain.pem when nothing changed. Asked before each batch
        and each housekeeping, so what the worker signs next is signed by the new CA."""
        authority = self.authority
        if self._bad_chain is not None and file_stamp(authority.paths.chain) == self._bad_chain:
            return  # told once; tried again when the file changes again
        try:
            if not authority.refresh_cas():
                return
        except (OSError, ValueError, ProvisioningError) as exc:
            self._bad_chain = file_stamp(authority.paths.chain)
            log.warning("cannot load the issuing CAs after ca-chain.pem changed (signing "
                        "with the ones loaded before): %s", exc)
            return
        self._bad_chain = None
        self._issuer = authority.issuer()
        self._responder = Responder(authority.ca, authority.registry.issued_status,
                                    authority.retiring)
        self._feed_keys = self._signing_keys()
        log.info("issuing CA changed: now signing with %s (serial %x); %d retiring",
                 authority.ca.cert.subject.rfc4514_string(), authority.ca.cert.serial_number,
                 len(authority.retiring))

    def _handle(self, batch: list[_Item]) -> None:
        self._refresh_cas()
        self._batches += 1
        self._jobs += len(batch)
        self._largest = max(self._largest, len(batch))
        settled: list[tuple[int, Any]] = []
        signing: dict[bool, list[tuple[int, _ToSign]]] = {False: [], True: []}
        try:
            self.tokens.refresh(self._registry)
        except Exception:  # the batch is still answered: each job fails on its own below
            log.exception("cannot re-read enrollment tokens")
        for job, job_id in batch:
            if job_id is None:
                self._events.append(job)
                continue
            try:
                answer = self._dispatch(job)
            except Exception as exc:  # one bad job must not take the others down
                log.exception("enrollment service job failed")
                answer = Failed(f"{type(exc).__name__}: {exc}")
            if isinstance(answer, _ToSign):
                signing[answer.job.renew].append((job_id, answer))
            else:
                settled.append((job_id, answer))
        if settled and (signing[False] or signing[True]):  # no wait on the commit
            self._reply(("done", settled, self.statistics()))
            settled = []
        for renew, group in signing.items():
            if group:
                settled.extend(self._sign(renew, group))
        if settled:
            self._reply(("done", settled, self.statistics()))
        if len(self._events) >= CHUNK:  # else they wait for a transaction or an idle moment
            self._flush_events()

    def _dispatch(self, job: EnrollJob | OCSPJob | CRLJob | FeedSignJob) -> Any:
        """The answer to one job, or the enrollment to put into this batch's signing."""
        if isinstance(job, FeedSignJob):  # ~50 us each: a burst of gateways is one batch
            key = self._feed_keys.get(job.signer) if job.signer is not None else None
            return raw_signature(key or self.authority.ca.key, job.signing_input)
        if isinstance(job, OCSPJob):
            return self._responder.respond(job.request_der, utcnow())
        if isinstance(job, CRLJob):
            return self._crl.snapshot()
        decided = self._gate.authorize(job)
        if not isinstance(decided, Principal):
            return decided
        csr = csr_der(job.body, decided)
        return _ToSign(csr, job, decided) if isinstance(csr, bytes) else csr

    # -- enrollment ------------------------------------------------------------------------

    def _sign(self, renew: bool, group: list[tuple[int, _ToSign]],
              ) -> list[tuple[int, Any]]:
        operation = "simplereenroll" if renew else "simpleenroll"
        inputs = [CSRInput(f"est:{operation}:{e.job.peer}", e.csr, actor=e.who.actor,
                           renews=e.who.renews) for _, e in group]
        # The manifest is the factory's production list: it gates first enrollment only.
        options = SignOptions(manifest=None if renew else self._manifest, renew=renew)
        queued = len(self._events)

        def write_events(tx: Transaction) -> None:
            write_audit_events(tx, self._events[:queued])

        try:
            results = self._issuer.sign(inputs, options, in_transaction=write_events)
            del self._events[:queued]
        except ProvisioningError as exc:
            log.warning("enrollment batch failed: %s", exc)
            return [(job_id, text_reply(503, "the CA registry is unavailable; try again later",
                                   actor=e.who.actor, result="error", reason=str(exc)))
                    for job_id, e in group]
        self._signed += sum(1 for r in results if r.status == "issued")
        return [(job_id, enrollment_reply(result, e.who))
                for (job_id, e), result in zip(group, results, strict=True)]

    # -- revocation status ---------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Revoke superseded certificates whose grace is over (the CRL re-signed when any
        were), then re-sign the CRL once half its lifetime has passed, so /crl never serves
        a stale one."""
        self._last_housekeeping = time.monotonic()
        self._refresh_cas()
        try:
            swept = self.authority.sweep_superseded()
            if swept:
                log.info("revoked %d superseded certificate(s) whose renew_grace is over: %s",
                         len(swept), ", ".join(f"{s.device_id} {s.serial}" for s in swept[:5])
                         + (" ..." if len(swept) > 5 else ""))
        except (OSError, sqlite3.Error, ProvisioningError) as exc:  # the next sweep retries
            log.warning("cannot revoke superseded certificates yet: %s", exc)
        try:
            snapshot = self._crl.snapshot()
            if snapshot.next_update is not None and (
                    utcnow() >= snapshot.this_update
                    + (snapshot.next_update - snapshot.this_update) / 2):
                crl = self.authority.publish_crl()
                log.info("re-signed the CRL before it went stale (next update %s)",
                         iso(crl.next_update_utc or utcnow()))
        except (OSError, ValueError, ProvisioningError) as exc:
            log.warning("cannot refresh the CRL: %s", exc)
        self._flush_events()

    def _flush_events(self) -> None:
        if not self._events:
            return
        events, self._events = self._events, []
        try:
            with self.authority.registry.write(SERVICE_ACTOR) as tx:
                write_audit_events(tx, events)
        except ProvisioningError as exc:
            log.warning("audit events not written yet (%d kept for the next try): %s",
                      len(events), exc)
            self._events[:0] = events
