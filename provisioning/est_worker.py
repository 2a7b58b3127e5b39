"""The enrollment service's worker thread: the only code that touches SQLite or the CA key.

The event loop never blocks: a handler puts a job on a queue and awaits a future. The worker
takes whatever queued up while it was busy as one batch: every enrollment of the batch goes
through one ``Issuer.sign`` call (one transaction, the same policy, manifest and idempotency
as ``fleet-provision sign``), and every audit event queued meanwhile is written in one more
transaction. An idle service answers each request alone, so batching adds no latency; a busy
one amortises the commits over the batch.

Token secrets are checked here against the registry's rows, re-read whenever another
connection committed (``PRAGMA data_version``), so ``token revoke`` takes effect for every
request the worker picks up after it. A secret not seen before comes back as
:class:`NeedsVerification`: the caller runs scrypt off this thread and asks again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.errors import ProvisioningError
from provisioning.identity import serial_hex
from provisioning.issuer import CHUNK, SignOptions, SignResult
from provisioning.ocsp import Responder
from provisioning.registry import Transaction
from provisioning.timefmt import iso, utcnow
from provisioning.tokens import TokenBook, TokenCheck

log = logging.getLogger("provisioning.est")

ANONYMOUS = "est:anonymous"
SERVICE_ACTOR = "est:service"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
HOUSEKEEPING_SECONDS = 30.0


# -- what handlers submit ------------------------------------------------------------------

@dataclass(frozen=True)
class TokenAuth:
    """HTTP Basic: user = token name, password = its secret (kept in memory only)."""

    name: str
    secret: str = field(repr=False)
    mac: bytes = field(repr=False)


@dataclass(frozen=True)
class CertAuth:
    """The TLS client certificate (DER), already verified against ca-chain.pem."""

    der: bytes = field(repr=False)


@dataclass(frozen=True)
class EnrollJob:
    body: bytes  # as received: base64 of a DER PKCS#10, decoded once the caller is known
    auth: TokenAuth | CertAuth
    renew: bool  # simplereenroll
    peer: str


@dataclass(frozen=True)
class OCSPJob:
    request_der: bytes


@dataclass(frozen=True)
class CRLJob:
    pass


@dataclass(frozen=True)
class AuditEvent:
    time: str
    actor: str
    action: str
    device_id: str | None
    serial: str | None
    detail: dict[str, Any]


# -- what comes back -----------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """An HTTP answer plus what the audit record says about it (``reason`` is not shown)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    actor: str = ANONYMOUS
    device_id: str | None = None
    serial: str | None = None
    result: str = ""
    reason: str | None = None


@dataclass(frozen=True)
class NeedsVerification:
    """The token's secret has not been verified by this process yet: run scrypt on it."""

    stored_hash: str


@dataclass(frozen=True)
class CRLSnapshot:
    der: bytes
    etag: str
    this_update: dt.datetime
    next_update: dt.datetime | None


@dataclass(frozen=True)
class Statistics:
    """An immutable snapshot of the worker's counters."""

    batches: int
    jobs: int
    largest_batch: int
    signed: int


@dataclass(frozen=True)
class _Principal:
    actor: str
    renews: str | None = None


@dataclass(frozen=True)
class _ToSign:
    csr: bytes
    job: EnrollJob
    who: _Principal


def b64_body(der: bytes) -> bytes:
    """Base64 in 64-character lines: what ``openssl base64 -d`` and RFC 2045 readers take."""
    text = base64.b64encode(der)
    return b"\n".join(text[i:i + 64] for i in range(0, len(text), 64)) + b"\n"


def certs_only(certs: Iterable[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData (RFC 7030 4.1.3, 4.2.3), base64 for the wire."""
    return b64_body(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


def _text(status: int, message: str, *, actor: str = ANONYMOUS, result: str,
          reason: str | None = None, device_id: str | None = None,
          serial: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, message.encode() + b"\n", "text/plain", headers, actor, device_id,
                 serial, result, reason or message)


def _settle(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the loop: hand each waiting handler its answer (one wake-up for a whole batch)."""
    for fut, value in answers:
        if fut.done():  # the client went away and the handler was cancelled
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


_Item = tuple[Any, "asyncio.Future[Any] | None"]


class Worker:
    """Owns the :class:`Authority` (registry connection and CA key) on one thread."""

    def __init__(self, authority: Authority, manifest: frozenset[str] | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.authority = authority
        self.tokens = TokenBook()
        self._issuer = authority.issuer()
        self._conn = authority.registry.conn
        self._manifest = manifest
        self._stations = frozenset(authority.config.station_groups)
        self._responder = Responder(authority.ca, self._status_of)
        self._loop = loop
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="est-worker", daemon=True)
        self._events: list[AuditEvent] = []
        self._crl: CRLSnapshot | None = None
        self._crl_key: tuple[int, int, int] | None = None
        self._last_housekeeping = 0.0
        self._batches = self._jobs = self._largest = self._signed = 0
        self.tokens.refresh(self._conn)

    # -- the loop side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, write the last audit events, end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def submit(self, job: EnrollJob | OCSPJob | CRLJob) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((job, fut))
        return fut

    def audit(self, event: AuditEvent) -> None:
        """Queue an event; it is written with the next batch (or on stop)."""
        self._queue.put((event, None))

    def statistics(self) -> Statistics:
        return Statistics(self._batches, self._jobs, self._largest, self._signed)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=HOUSEKEEPING_SECONDS)
            except queue.Empty:
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
                    self._loop.call_soon_threadsafe(
                        _settle, [(fut, exc) for _, fut in batch if fut is not None])
            if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_SECONDS:
                self._housekeeping()
        self._flush_events()

    def _handle(self, batch: list[_Item]) -> None:
        self._batches += 1
        self._jobs += len(batch)
        self._largest = max(self._largest, len(batch))
        settled: list[tuple[asyncio.Future[Any], Any]] = []
        signing: dict[bool, list[tuple[asyncio.Future[Any], _ToSign]]] = {False: [], True: []}
        try:
            self.tokens.refresh(self._conn)
        except Exception:  # the batch is still answered: each job fails on its own below
            log.exception("cannot re-read enrollment tokens")
        for job, fut in batch:
            if fut is None:
                self._events.append(job)
                continue
            try:
                answer = self._dispatch(job)
            except Exception as exc:  # one bad job must not take the others down
                log.exception("enrollment service job failed")
                answer = exc
            if isinstance(answer, _ToSign):
                signing[answer.job.renew].append((fut, answer))
            else:
                settled.append((fut, answer))
        for renew, group in signing.items():
            if group:
                settled.extend(self._sign(renew, group))
        if settled:
            self._loop.call_soon_threadsafe(_settle, settled)
        self._flush_events()

    def _dispatch(self, job: EnrollJob | OCSPJob | CRLJob) -> Any:
        """The answer to one job, or the enrollment to put into this batch's signing."""
        if isinstance(job, OCSPJob):
            return self._responder.respond(job.request_der, utcnow())
        if isinstance(job, CRLJob):
            return self._crl_snapshot()
        decided = self._authorize(job)
        if not isinstance(decided, _Principal):
            return decided
        csr = _csr_der(job.body, decided)
        return _ToSign(csr, job, decided) if isinstance(csr, bytes) else csr

    # -- enrollment ------------------------------------------------------------------------

    def _authorize(self, job: EnrollJob) -> _Principal | Reply | NeedsVerification:
        auth = job.auth
        if isinstance(auth, CertAuth):
            return self._cert_principal(auth.der, renew=job.renew)
        verdict, stored = self.tokens.check(auth.name, auth.mac)
        if verdict is TokenCheck.OK:
            return _Principal(f"est:token:{auth.name}")
        if verdict is TokenCheck.VERIFY:
            assert stored is not None  # noqa: S101
            return NeedsVerification(stored)
        return unauthorized(f"token {auth.name!r} is {verdict.value}")

    def _cert_principal(self, der: bytes, *, renew: bool) -> _Principal | Reply:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return _forbidden("the client certificate cannot be parsed")
        serial = serial_hex(cert.serial_number)
        now = utcnow()
        # TLS leaves validity times to us (est.py) so the client hears why, not a bare alert.
        if now > cert.not_valid_after_utc:
            return _forbidden(f"client certificate {serial} expired at "
                              f"{iso(cert.not_valid_after_utc)}", serial=serial)
        if now < cert.not_valid_before_utc:
            return _forbidden(f"client certificate {serial} is not valid before "
                              f"{iso(cert.not_valid_before_utc)}", serial=serial)
        row = self._conn.execute(
            'SELECT c.device_id, c.status, c.fingerprint, d.status, d."group" FROM certificates '
            "c JOIN devices d ON d.device_id = c.device_id WHERE c.serial = ?",
            (serial,)).fetchone()
        if row is None or row[2] != hashlib.sha256(der).hexdigest():
            return _forbidden(f"client certificate {serial} is not a device certificate of "
                              "this CA's registry", serial=serial)
        device_id, cert_status, _, device_status, group = row
        actor = f"est:cert:{device_id}"
        if cert_status in ("revoked", "on_hold"):
            return _forbidden(f"client certificate {serial} is {cert_status.replace('_', ' ')}",
                              actor=actor, device_id=device_id, serial=serial)
        if device_status != "active":
            return _forbidden(f"device {device_id!r} is {device_status}", actor=actor,
                              device_id=device_id, serial=serial)
        if renew:
            return _Principal(actor, renews=serial)
        if group not in self._stations:
            return _forbidden(f"device {device_id!r} (group {group or 'none'}) is not a factory "
                              "station: want a group listed in pki.toml station_groups (a "
                              "device renews its own certificate with simplereenroll)",
                              actor=actor, device_id=device_id, serial=serial)
        return _Principal(actor)

    def _sign(self, renew: bool, group: list[tuple[asyncio.Future[Any], _ToSign]],
              ) -> list[tuple[asyncio.Future[Any], Any]]:
        operation = "simplereenroll" if renew else "simpleenroll"
        inputs = [CSRInput(f"est:{operation}:{e.job.peer}", e.csr, actor=e.who.actor,
                           renews=e.who.renews) for _, e in group]
        # The manifest is the factory's production list: it gates first enrollment only.
        options = SignOptions(manifest=None if renew else self._manifest, renew=renew)
        queued = len(self._events)

        def write_events(tx: Transaction) -> None:
            self._write_events(tx, self._events[:queued])

        try:
            results = self._issuer.sign(inputs, options, in_transaction=write_events)
            del self._events[:queued]
        except ProvisioningError as exc:
            log.warning("enrollment batch failed: %s", exc)
            return [(fut, _text(503, "the CA registry is unavailable; try again later",
                                actor=e.who.actor, result="error", reason=str(exc)))
                    for fut, e in group]
        self._signed += sum(1 for r in results if r.status == "issued")
        return [(fut, _enrollment_reply(result, e.who))
                for (fut, e), result in zip(group, results, strict=True)]

    # -- revocation status ---------------------------------------------------------------

    def _status_of(self, serial: str) -> tuple[str, str | None, str | None] | None:
        row = self._conn.execute("SELECT status, revoked_at, reason FROM certificates WHERE "
                                 "serial = ?", (serial,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def _crl_snapshot(self) -> CRLSnapshot:
        """crl.pem as DER, re-read only when the file changed (any writer replaces it)."""
        path = self.authority.paths.crl
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._crl is None or key != self._crl_key:
            crl = x509.load_pem_x509_crl(path.read_bytes())
            der = crl.public_bytes(serialization.Encoding.DER)
            etag = '"' + hashlib.sha256(der).hexdigest()[:32] + '"'
            self._crl = CRLSnapshot(der, etag, crl.last_update_utc, crl.next_update_utc)
            self._crl_key = key
        return self._crl

    def _housekeeping(self) -> None:
        """Re-sign the CRL once half its lifetime has passed, so /crl never serves a stale one."""
        self._last_housekeeping = time.monotonic()
        try:
            snapshot = self._crl_snapshot()
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
                self._write_events(tx, events)
        except ProvisioningError as exc:
            log.warning("audit events not written yet (%d kept for the next try): %s",
                      len(events), exc)
            self._events[:0] = events


    @staticmethod
    def _write_events(tx: Transaction, events: list[AuditEvent]) -> None:
        for e in events:
            tx.audit(e.time, e.action, e.device_id, e.serial, e.detail, actor=e.actor)


def unauthorized(reason: str) -> Reply:
    """401 with the challenge RFC 7235 requires; the reason is audited, not shown."""
    return _text(401, "authentication failed: unknown token or wrong secret",
                 result="unauthorized", reason=reason,
                 headers=(("WWW-Authenticate", 'Basic realm="fleet-est", charset="UTF-8"'),))


def _forbidden(message: str, *, actor: str = ANONYMOUS, device_id: str | None = None,
               serial: str | None = None) -> Reply:
    return _text(403, message, actor=actor, result="forbidden", device_id=device_id,
                 serial=serial)


def decode_base64(body: bytes) -> bytes | None:
    """Strict base64 that tolerates line breaks and blanks anywhere (RFC 8951 section 3.1)."""
    compact = body.translate(None, b" \t\r\n")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _csr_der(body: bytes, who: _Principal) -> bytes | Reply:
    der = decode_base64(body)
    if der is None:
        return _text(400, "malformed base64: want the base64 of a DER PKCS#10 request",
                     actor=who.actor, result="refused", reason="malformed base64")
    if not der:
        return _text(400, "empty body: want the base64 of a DER PKCS#10 request",
                     actor=who.actor, result="refused", reason="empty body")
    return der


def _enrollment_reply(result: SignResult, who: _Principal) -> Reply:
    if result.status != "rejected" and result.pem is not None:
        cert = x509.load_pem_x509_certificate(result.pem.encode("ascii"))
        return Reply(200, certs_only([cert]), CERTS_ONLY,
                     (("Content-Transfer-Encoding", "base64"),), who.actor, result.device_id,
                     result.serial, result.status)
    reason = result.reason or "rejected"
    # A renewal refused because the presented certificate is revoked or held is a 403.
    status = 403 if reason.startswith(("renew-revoked", "renew-on-hold")) else 400
    return _text(status, reason, actor=who.actor, result="rejected",
                 device_id=result.device_id)

