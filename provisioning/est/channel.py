"""HTTP side: the HTTP process's channel to the enrollment service's CA worker process.

The event loop never blocks and never signs: a handler sends its job to the CA worker
process (:mod:`provisioning.est.engine`, the only code that writes SQLite or holds the CA key)
over a pipe and awaits a future. The worker runs in its own interpreter, so the HTTP loop
and the signing use two cores instead of sharing one GIL. Everything queued in one loop
iteration (jobs, audit events, verified token secrets) goes in one write; the answers of a
batch come back as one message, settled on the loop with one wake-up, and the PKCS#7 reply
is built here, off the busier worker.

Token secrets are checked in the worker. A secret not seen before comes back as
``NeedsVerification``: the HTTP process runs scrypt in a thread, tells the worker the secret
is good (``tokens.remember``) and asks again. The HMAC key of that cache is made here and
handed to the worker at start, with the CA key's passphrase (over the pipe, never on a
command line).

A clean stop writes every audit event sent before it. If the worker process dies, every
waiting and later request fails with ``WorkerGone`` (503) instead of hanging, and the events
it could no longer take are written by the HTTP process when the service stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from provisioning.authority import Authority
from provisioning.errors import ProvisioningError, WorkerError, WorkerGone
from provisioning.est.messages import (
    SERVICE_ACTOR,
    AuditEvent,
    CRLJob,
    EnrollJob,
    Failed,
    FeedSignJob,
    Issued,
    OCSPJob,
    Setup,
    Statistics,
    write_audit_events,
)
from provisioning.tokens import TokenBook

log = logging.getLogger("provisioning.est")

START_SECONDS = 60.0  # the worker imports, opens the registry and loads the CA key
STOP_SECONDS = 30.0  # to write the last audit events before it is terminated


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


class EngineChannel:
    """The loop's handle on the CA worker process (:class:`provisioning.est.engine.Engine`)
    that owns the :class:`Authority`.

    Every method runs on the event loop's thread.
    """

    def __init__(self, authority: Authority, manifest: frozenset[str] | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.authority = authority
        self._loop = loop
        key = os.urandom(32)
        self.tokens = RemoteTokens(key, self._post)
        self._setup = Setup(authority.paths.root, authority.passphrase, authority.actor,
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

    async def start(self) -> None:
        """Start the worker process and wait (off the loop) until it has opened the PKI and
        the CA key."""
        # A new interpreter (never a fork of one running an event loop with a SQLite
        # connection), importing only the engine's modules: not the caller's __main__ as
        # multiprocessing's spawn would, nor the HTTP side (provisioning.est loads it lazily).
        fd = self._child_end.fileno()
        package_root = str(Path(__file__).resolve().parents[2])  # holds provisioning/
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, package_root, str(fd)], pass_fds=(fd,),
                stdin=subprocess.DEVNULL)
        finally:
            self._child_end.close()  # the worker's end: its exit then reads as EOF here
        try:
            trouble = await asyncio.to_thread(self._handshake)
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
                write_audit_events(tx, events)
        except ProvisioningError as exc:
            problem = exc
        if problem is not None:
            log.error("%d audit events lost: %s", len(events), problem)

    # -- requests ----------------------------------------------------------------------------

    def submit(self, job: EnrollJob | OCSPJob | CRLJob | FeedSignJob) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._gone is not None:
            fut.set_exception(WorkerGone(f"the CA worker is gone: {self._gone}"))
            return fut
        job_id = next(self._ids)
        self._futures[job_id] = fut
        self._post(("job", job_id, job))
        return fut

    async def sign_feed(self, signing_input: bytes, signer: bytes | None = None) -> bytes:
        """The raw ``r || s`` signature of a feed document's JWS signing input, by the
        issuing key in the worker (*signer*: the SHA-256 of the DER of the issuing CA whose
        key signs; raises WorkerGone when it is gone)."""
        signature: bytes = await self.submit(FeedSignJob(signing_input, signer))
        return signature

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
                if isinstance(answer, Failed):
                    fut.set_exception(WorkerError(answer.message))
                elif isinstance(answer, Issued):
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


_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from provisioning.est.engine import engine_main; engine_main(int(sys.argv[2]))")

