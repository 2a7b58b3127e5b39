"""The enrollment service's worker process: the only code that touches SQLite or the CA key.

The event loop never blocks and never signs: a handler sends its job to the worker process
over a pipe and awaits a future. The worker runs in its own interpreter, so the HTTP loop and
the signing use two cores instead of sharing one GIL. It takes whatever arrived while it was
busy as one batch: every enrollment of the batch goes through one ``Issuer.sign`` call (one
transaction, the same policy, manifest and idempotency as ``fleet-provision sign``), and the
audit events sent meanwhile are written in that same transaction. Events with no enrollment
to ride along with wait for the next one, at most ``EVENT_DELAY_SECONDS`` of idleness or
``CHUNK`` events, then get a commit of their own. The answers of a batch come back as one
message, settled on the loop with one wake-up; the PKCS#7 reply is built there. An idle
service answers each request alone, so batching adds no latency; a busy one amortises the
commits (and their fsync) over the batch.

Token secrets are checked in the worker against the registry's rows, re-read whenever another
connection committed (``PRAGMA data_version``), so ``token revoke`` takes effect for every
request the worker picks up after it. A secret not seen before comes back as
:class:`NeedsVerification`: the HTTP process runs scrypt in a thread, tells the worker the
secret is good (``tokens.remember``) and asks again. The HMAC key of that cache is made by the
HTTP process and handed to the worker at start, with the CA key's passphrase (over the pipe,
never on a command line).

A clean stop writes every audit event sent before it. If the worker process dies, every
waiting and later request fails with :class:`WorkerGone` (503) instead of hanging, and the
events it could no longer take are written by the HTTP process when the service stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning import der
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
# Request events wait this long for the next signing transaction to ride along with, rather
# than paying a commit (an fsync) of their own; an idle worker then writes them on their own.
EVENT_DELAY_SECONDS = 0.05
LOG_FORMAT = "fleet-provision serve: %(message)s"
START_SECONDS = 60.0  # the worker imports, opens the registry and loads the CA key
STOP_SECONDS = 30.0  # to write the last audit events before it is terminated


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


def b64_body(data: bytes) -> bytes:
    """Base64 in 64-character lines: what ``openssl base64 -d`` and RFC 2045 readers take."""
    b2a = binascii.b2a_base64  # 48 octets make one 64-character line, "\n" included
    return b"".join([b2a(data[i:i + 48]) for i in range(0, len(data), 48)]) or b"\n"


def certs_only(certs: Iterable[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData (RFC 7030 4.1.3, 4.2.3), base64 for the wire."""
    return b64_body(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


_SIGNED_DATA = der.oid("1.2.840.113549.1.7.2")
_DATA = der.oid("1.2.840.113549.1.7.1")


def certs_only_der(certificate: bytes) -> bytes:
    """``pkcs7.serialize_certificates([cert], DER)`` for one certificate's DER, without
    parsing it (every enrollment answers with one; tests/provisioning/test_est.py compares):
    ContentInfo { signedData, [0] SignedData { version 1, digestAlgorithms {},
    encapContentInfo { data }, certificates [0] { cert }, signerInfos {} } }."""
    signed = der.sequence(der.integer(1), der.tlv(der.SET, b""), der.sequence(_DATA),
                          der.tlv(0xA0, certificate), der.tlv(der.SET, b""))
    return der.sequence(_SIGNED_DATA, der.explicit(0, signed))


def pem_der(pem: str) -> bytes:
    """The DER inside one PEM block (the text between the BEGIN and END lines)."""
    return binascii.a2b_base64(pem.split("-----")[2].encode("ascii"))


def _text(status: int, message: str, *, actor: str = ANONYMOUS, result: str,
          reason: str | None = None, device_id: str | None = None,
          serial: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, message.encode() + b"\n", "text/plain", headers, actor, device_id,
                 serial, result, reason or message)


class WorkerGone(Exception):  # noqa: N818  (a state, not a failed call)
    """The worker process is gone: requests get 503 until the service is restarted."""


class WorkerError(Exception):
    """A job failed in the worker process (a bug there): that request gets 500."""


@dataclass(frozen=True)
class _Failed:
    """A job's exception, as text: exceptions need not survive pickling."""

    message: str


@dataclass(frozen=True)
class _Issued:
    """A certificate for the HTTP process to wrap: the PKCS#7 reply is built there, so the
    worker, the busier of the two, spends its time on signing."""

    pem: str = field(repr=False)
    actor: str
    device_id: str | None
    serial: str | None
    result: str

    def reply(self) -> Reply:
        return Reply(200, b64_body(certs_only_der(pem_der(self.pem))), CERTS_ONLY,
                     (("Content-Transfer-Encoding", "base64"),), self.actor, self.device_id,
                     self.serial, self.result)


@dataclass(frozen=True)
class _Setup:
    """What the worker process needs to open the same PKI as the HTTP process."""

    root: Path
    passphrase: bytes | None = field(repr=False)
    actor: str
    manifest: frozenset[str] | None
    token_key: bytes = field(repr=False)
    log_level: int


# Messages from the HTTP process, sent as lists (everything queued in one loop iteration):
#   ("job", id, job)  ("audit", event)  ("remember", name, stored_hash, mac)  ("stop",)
# and from the worker, one at a time:
#   ("ready",)  ("failed", message)  ("done", [(id, answer), ...], statistics)
#   ("stopped", statistics)


class RemoteTokens:
    """The HTTP process's side of the worker's :class:`TokenBook`: the same HMAC key."""

    def __init__(self, key: bytes, post: Callable[[tuple[Any, ...]], None]) -> None:
        self._book = TokenBook(key)
        self._post = post

    def mac(self, name: str, secret: str) -> bytes:
        return self._book.mac(name, secret)

    def remember(self, name: str, stored_hash: str, mac: bytes) -> None:
        """Tell the worker a secret passed scrypt; it arrives before any later job."""
        self._post(("remember", name, stored_hash, mac))


class Worker:
    """The loop's handle on the worker process that owns the :class:`Authority`.

    Every method runs on the event loop's thread.
    """

    def __init__(self, authority: Authority, manifest: frozenset[str] | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.authority = authority
        self._loop = loop
        key = os.urandom(32)
        self.tokens = RemoteTokens(key, self._post)
        self._setup = _Setup(authority.paths.root, authority.passphrase, authority.actor,
                             manifest, key, logging.getLogger().getEffectiveLevel())
        parent_end, self._child_end = socket.socketpair()
        self._conn = Connection(parent_end.detach())
        self._process: subprocess.Popen[bytes] | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._outbox: list[tuple[Any, ...]] = []
        self._flush_pending = False
        self._gone: str | None = None  # why the worker no longer takes messages
        self._stopped: asyncio.Future[None] | None = None
        self._orphans: list[AuditEvent] = []  # events the worker could no longer take
        self._statistics = Statistics(0, 0, 0, 0)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker process and wait until it has opened the PKI and the CA key."""
        # A new interpreter (never a fork of one running an event loop with a SQLite
        # connection), importing only this module: not the caller's __main__ as
        # multiprocessing's spawn would.
        fd = self._child_end.fileno()
        package_root = str(Path(__file__).resolve().parent.parent)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, package_root, str(fd)], pass_fds=(fd,),
                stdin=subprocess.DEVNULL)
        finally:
            self._child_end.close()  # the worker's end: its exit then reads as EOF here
        try:
            trouble = self._handshake()
        except BaseException:
            self._abandon("it did not start")
            raise
        if trouble is not None:
            self._abandon(trouble)
            raise ProvisioningError(trouble)
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        # libuv makes a watched descriptor non-blocking; a Connection then fails with EAGAIN
        # in the middle of a large message. Readiness still comes from the loop.
        os.set_blocking(self._conn.fileno(), True)

    def _abandon(self, why: str) -> None:
        self._gone = why
        self._conn.close()
        self._end_process()

    def _handshake(self) -> str | None:
        """Hand the worker its set-up: None once it is ready, else why it is not."""
        try:
            self._conn.send(self._setup)
            if not self._conn.poll(START_SECONDS):
                return f"the CA worker did not start within {START_SECONDS:.0f} s"
            message = self._conn.recv()
        except (EOFError, OSError):
            return f"the CA worker exited at start (code {self._exit_code(1)})"
        return None if message[0] == "ready" else f"the CA worker cannot start: {message[1]}"

    async def stop(self) -> None:
        """Let the worker finish what it was sent, write the last audit events and exit."""
        if self._process is None:  # never started
            self._child_end.close()
            self._conn.close()
            return
        if self._gone is None:
            self._stopped = self._loop.create_future()
            self._post(("stop",))
            self._flush()
            try:
                await asyncio.wait_for(asyncio.shield(self._stopped), STOP_SECONDS)
            except TimeoutError:
                self._lost(f"it did not stop within {STOP_SECONDS:.0f} s")
        self._conn.close()  # a worker still running reads EOF: it writes its events and exits
        await asyncio.to_thread(self._end_process)
        if self._orphans:
            await asyncio.to_thread(self._write_orphans)

    def _end_process(self) -> None:
        if self._process is None:
            return
        if self._exit_code(5) is None:  # it ignores SIGTERM: it stops when told, or on EOF
            log.error("killing the CA worker (pid %s): it did not exit", self._process.pid)
            self._process.kill()
            self._process.wait()

    def _exit_code(self, timeout: float) -> int | None:
        """The worker's exit code once it has exited within *timeout* seconds, else None."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _write_orphans(self) -> None:
        events, self._orphans = self._orphans, []
        problem = None
        try:
            with self.authority.registry.write(SERVICE_ACTOR) as tx:
                _write_events(tx, events)
        except ProvisioningError as exc:
            problem = exc
        if problem is not None:
            log.error("%d audit events lost: %s", len(events), problem)

    # -- requests ----------------------------------------------------------------------------

    def submit(self, job: EnrollJob | OCSPJob | CRLJob) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._gone is not None:
            fut.set_exception(WorkerGone(f"the CA worker is gone: {self._gone}"))
            return fut
        job_id = next(self._ids)
        self._futures[job_id] = fut
        self._post(("job", job_id, job))
        return fut

    def audit(self, event: AuditEvent) -> None:
        """Send an event; it is written with the next batch (or on stop)."""
        if self._gone is not None:
            self._orphans.append(event)
        else:
            self._post(("audit", event))

    def statistics(self) -> Statistics:
        """The worker's counters as it last reported them (final after :meth:`stop`)."""
        return self._statistics

    # -- the pipe ----------------------------------------------------------------------------

    def _post(self, message: tuple[Any, ...]) -> None:
        """Queue a message; everything queued in one loop iteration goes in one write."""
        self._outbox.append(message)
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        messages, self._outbox = self._outbox, []
        if not messages:
            return
        if self._gone is not None:
            self._orphans.extend(m[1] for m in messages if m[0] == "audit")
            return
        try:
            # The worker reads its pipe on a thread of its own, so this never waits long.
            self._conn.send(messages)
        except OSError as exc:
            self._orphans.extend(m[1] for m in messages if m[0] == "audit")
            self._lost(f"cannot write to it: {exc}")

    def _on_readable(self) -> None:
        try:
            while self._gone is None and self._conn.poll():
                self._receive(self._conn.recv())
        except (EOFError, OSError):
            self._lost("it exited")
        except Exception as exc:  # a message that cannot be read: never leave requests hanging
            log.exception("unreadable message from the CA worker")
            self._lost(f"unreadable message: {exc}")

    def _receive(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            _, answers, self._statistics = message
            for job_id, answer in answers:
                fut = self._futures.pop(job_id, None)
                if fut is None or fut.done():  # the client went away, the handler is gone
                    continue
                if isinstance(answer, _Failed):
                    fut.set_exception(WorkerError(answer.message))
                elif isinstance(answer, _Issued):
                    try:
                        fut.set_result(answer.reply())
                    except ValueError as exc:  # a bug: fail this request only
                        fut.set_exception(WorkerError(f"cannot wrap the certificate: {exc}"))
                else:
                    fut.set_result(answer)
        elif kind == "stopped":
            self._statistics = message[1]
            self._lost("stopped", failure=False)

    def _lost(self, why: str, *, failure: bool = True) -> None:
        """No more messages either way: fail what is waiting, keep later events for stop."""
        if self._gone is not None:
            return
        self._gone = why
        self._loop.remove_reader(self._conn.fileno())
        if failure:
            code = self._exit_code(0.1)
            log.error("the CA worker is gone (%s%s): requests get 503 until serve is "
                      "restarted", why, "" if code is None else f", exit code {code}")
        error = WorkerGone(f"the CA worker is gone: {why}")
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(error)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)


# -- the worker process ----------------------------------------------------------------------

_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from provisioning.est_worker import worker_main; worker_main(int(sys.argv[2]))")


def worker_main(fd: int) -> None:
    """The worker process: open the PKI as the HTTP process did, then serve its jobs."""
    conn = Connection(fd)
    # The HTTP process decides when to stop (Ctrl-C reaches the whole process group), and
    # it tells the worker, which then writes the last audit events.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        setup: _Setup = conn.recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=setup.log_level, stream=sys.stderr, format=LOG_FORMAT)
    try:
        authority = Authority(setup.root, setup.passphrase, actor=setup.actor)
        try:
            _ = authority.ca
            engine = _Engine(authority, setup.manifest, TokenBook(setup.token_key), conn)
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


class _Engine:
    """The worker process's batches: the registry connection and the CA key live here."""

    def __init__(self, authority: Authority, manifest: frozenset[str] | None,
                 tokens: TokenBook, conn: Connection) -> None:
        self.authority = authority
        self.tokens = tokens
        self._issuer = authority.issuer()
        self._conn = authority.registry.conn
        self._pipe = conn
        self._manifest = manifest
        self._stations = frozenset(authority.config.station_groups)
        self._responder = Responder(authority.ca, self._status_of)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._events: list[AuditEvent] = []
        self._crl: CRLSnapshot | None = None
        self._crl_key: tuple[int, int, int] | None = None
        self._last_housekeeping = 0.0
        self._batches = self._jobs = self._largest = self._signed = 0
        self._parent_gone = False
        self.tokens.refresh(self._conn)

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
                    timeout=EVENT_DELAY_SECONDS if self._events else HOUSEKEEPING_SECONDS)
            except queue.Empty:
                self._flush_events()
                if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_SECONDS:
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
                    failed = _Failed(f"{type(exc).__name__}: {exc}")
                    self._reply(("done", [(job_id, failed) for _, job_id in batch
                                          if job_id is not None], self.statistics()))
            if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_SECONDS:
                self._housekeeping()
        self._flush_events()
        self._reply(("stopped", self.statistics()))

    def _handle(self, batch: list[_Item]) -> None:
        self._batches += 1
        self._jobs += len(batch)
        self._largest = max(self._largest, len(batch))
        settled: list[tuple[int, Any]] = []
        signing: dict[bool, list[tuple[int, _ToSign]]] = {False: [], True: []}
        try:
            self.tokens.refresh(self._conn)
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
                answer = _Failed(f"{type(exc).__name__}: {exc}")
            if isinstance(answer, _ToSign):
                signing[answer.job.renew].append((job_id, answer))
            else:
                settled.append((job_id, answer))
        for renew, group in signing.items():
            if group:
                settled.extend(self._sign(renew, group))
        if settled:
            self._reply(("done", settled, self.statistics()))
        if len(self._events) >= CHUNK:  # else they wait for a transaction or an idle moment
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

    def _sign(self, renew: bool, group: list[tuple[int, _ToSign]],
              ) -> list[tuple[int, Any]]:
        operation = "simplereenroll" if renew else "simpleenroll"
        inputs = [CSRInput(f"est:{operation}:{e.job.peer}", e.csr, actor=e.who.actor,
                           renews=e.who.renews) for _, e in group]
        # The manifest is the factory's production list: it gates first enrollment only.
        options = SignOptions(manifest=None if renew else self._manifest, renew=renew)
        queued = len(self._events)

        def write_events(tx: Transaction) -> None:
            _write_events(tx, self._events[:queued])

        try:
            results = self._issuer.sign(inputs, options, in_transaction=write_events)
            del self._events[:queued]
        except ProvisioningError as exc:
            log.warning("enrollment batch failed: %s", exc)
            return [(job_id, _text(503, "the CA registry is unavailable; try again later",
                                   actor=e.who.actor, result="error", reason=str(exc)))
                    for job_id, e in group]
        self._signed += sum(1 for r in results if r.status == "issued")
        return [(job_id, _enrollment_reply(result, e.who))
                for (job_id, e), result in zip(group, results, strict=True)]

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
                _write_events(tx, events)
        except ProvisioningError as exc:
            log.warning("audit events not written yet (%d kept for the next try): %s",
                      len(events), exc)
            self._events[:0] = events


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


def _enrollment_reply(result: SignResult, who: _Principal) -> _Issued | Reply:
    if result.status != "rejected" and result.pem is not None:
        return _Issued(result.pem, who.actor, result.device_id, result.serial, result.status)
    reason = result.reason or "rejected"
    # A renewal refused because the presented certificate is revoked or held is a 403.
    status = 403 if reason.startswith(("renew-revoked", "renew-on-hold")) else 400
    return _text(status, reason, actor=who.actor, result="rejected",
                 device_id=result.device_id)

