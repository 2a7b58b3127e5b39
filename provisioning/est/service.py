"""``fleet-provision serve``: enrollment (EST, RFC 7030), the CRL and OCSP (RFC 6960) over HTTPS.

    GET  /.well-known/est/cacerts         the CA chain as base64 certs-only CMS (RFC 7030 4.1)
    POST /.well-known/est/simpleenroll    base64 PKCS#10 in, base64 certs-only out (4.2.1);
                                          HTTP Basic enrollment token or a station certificate
    POST /.well-known/est/simplereenroll  renewal over mutual TLS with the current cert (4.2.2)
    GET  /.well-known/est/csrattrs        the key type and signature this CA wants (4.5)
    GET  /crl                             the current CRL in DER, with ETag / 304
    POST /ocsp, GET /ocsp/<base64>        the OCSP responder (RFC 6960 appendix A.1)

TLS always; a client certificate is requested but optional, verified against ca-chain.pem.
``--http-bind`` adds a plain-HTTP listener with only ``/crl`` and ``/ocsp``: both answers are
signed, and relying parties fetch them without trusting a TLS server first (RFC 5280 4.2.1.13
and RFC 6960 appendix A use http URLs for that reason).

Handlers never block: everything that touches SQLite or the CA key runs in the worker process
(:mod:`provisioning.est.channel`), so HTTP and signing use two cores; scrypt for a new token
secret runs in a thread. Every request is audited in the registry's hash chain by the
middleware, who/what/result. If the worker process dies, requests get 503, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import signal
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Any, cast

from aiohttp import BasicAuth, web
from cryptography import x509

from provisioning import der, ocsp
from provisioning.authority import Authority
from provisioning.errors import UsageError, WorkerGone
from provisioning.est.channel import EngineChannel
from provisioning.est.messages import (
    ANONYMOUS,
    CERTS_ONLY,
    LOG_FORMAT,
    SERVICE_ACTOR,
    AuditEvent,
    CertAuth,
    CRLJob,
    CRLSnapshot,
    EnrollJob,
    NeedsVerification,
    OCSPJob,
    Reply,
    Statistics,
    TokenAuth,
    b64_body,
    certs_only,
    decode_base64,
    unauthorized,
)
from provisioning.identity import host_name_problem, normalise_host_name, verify_password
from provisioning.timefmt import iso, utcnow

log = logging.getLogger("provisioning.est")

EST_PATH = "/.well-known/est"
MAX_BODY = 64 * 1024
PKCS10 = "application/pkcs10"
OCSP_REQUEST = "application/ocsp-request"
CRL_MAX_AGE = 60  # seconds a cache may keep /crl: short, so a revocation spreads quickly
SERVER_CERT_MIN_DAYS = 30  # est-server.pem is re-issued when it has less left than this
SCRYPT_SLOTS = 2  # concurrent scrypt checks: bad secrets cannot eat every core
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not exported by the ssl module): the service checks
# the client certificate's validity itself, so an expired device hears a 403 with the
# reason instead of a bare TLS alert. The chain is still verified in full.
_NO_CHECK_TIME = 0x200000


@dataclass
class _Note:
    """What the middleware writes to the audit log for one request."""

    action: str = "http.request"
    actor: str = ANONYMOUS
    device_id: str | None = None
    serial: str | None = None
    result: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def take(self, reply: Reply) -> None:
        self.actor, self.device_id, self.serial = reply.actor, reply.device_id, reply.serial
        self.result, self.reason = reply.result, reply.reason


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


def _reply(reply: Reply) -> web.Response:
    headers = dict(reply.headers)
    headers["Content-Type"] = reply.content_type
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def _peer_certificate(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    return cast("bytes | None", ssl_object.getpeercert(binary_form=True))


class EnrollmentService:
    """The HTTP side: routes, the audit middleware, and the hand-off to the worker."""

    def __init__(self, authority: Authority, tls: ssl.SSLContext,
                 manifest: frozenset[str] | None = None) -> None:
        self.authority = authority
        self.tls = tls
        self.manifest = manifest
        chain = x509.load_pem_x509_certificates(authority.paths.chain.read_bytes())
        self._cacerts = certs_only(chain)
        self._csrattrs = b64_body(der.csr_attributes())
        self._worker: EngineChannel | None = None
        self._runner: web.AppRunner | None = None
        self._plain_runner: web.AppRunner | None = None
        self._scrypt_slots: asyncio.Semaphore | None = None
        self._verifying: dict[tuple[bytes, str], asyncio.Future[bool]] = {}

    @property
    def worker(self) -> EngineChannel:
        if self._worker is None:
            raise RuntimeError("the service is not started")
        return self._worker

    def statistics(self) -> Statistics:
        return self.worker.statistics()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str, port: int,
                    http: tuple[str, int] | None = None) -> list[str]:
        """Listen; returns the base URLs actually bound (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._scrypt_slots = asyncio.Semaphore(SCRYPT_SLOTS)
        self._worker = EngineChannel(self.authority, self.manifest, loop)
        await self._worker.start()
        urls: list[str] = []
        try:
            self._runner = await self._listen(self._app(est=True), host, port, self.tls)
            urls += [_url("https", a) for a in self._runner.addresses]
            if http is not None:
                self._plain_runner = await self._listen(self._app(est=False), *http, None)
                urls += [_url("http", a) for a in self._plain_runner.addresses]
        except BaseException:
            await self.close()
            raise
        return urls

    @staticmethod
    async def _listen(app: web.Application, host: str, port: int,
                      tls: ssl.SSLContext | None) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024).start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             "--bind" if tls else "--http-bind") from exc
        return runner

    async def close(self) -> None:
        """Stop listening, let running requests finish, write the last audit events."""
        for runner in (self._runner, self._plain_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._plain_runner = None
        if self._worker is not None:
            await self._worker.stop()

    def _app(self, *, est: bool) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._audited])
        if est:
            app.router.add_get(f"{EST_PATH}/cacerts", self.cacerts)
            app.router.add_post(f"{EST_PATH}/simpleenroll", self.simpleenroll)
            app.router.add_post(f"{EST_PATH}/simplereenroll", self.simplereenroll)
            app.router.add_get(f"{EST_PATH}/csrattrs", self.csrattrs)
        app.router.add_get("/crl", self.crl)
        app.router.add_post("/ocsp", self.ocsp_post)
        app.router.add_get("/ocsp/{request:.+}", self.ocsp_get)
        return app

    # -- the audit middleware --------------------------------------------------------------

    @web.middleware
    async def _audited(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
        note = _Note()
        request["audit"] = note
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # 404, 405 and the like, raised by aiohttp
            response = _text(exc.status, exc.reason, {k: v for k, v in exc.headers.items()
                                                      if k.lower() == "allow"})
            note.result = note.result or "refused"
        except WorkerGone as exc:  # logged once, when the worker process went away
            response = _text(503, "the CA worker is gone; try again later")
            note.result, note.reason = "error", str(exc)
        except asyncio.CancelledError:
            note.result, note.reason = "cancelled", "the client went away"
            self._record(request, note, 499)
            raise
        except Exception:  # a bug must cost one request, never the service
            log.exception("request failed: %s %s", request.method, request.path)
            response = _text(500, "internal error")
            note.result = "error"
        self._record(request, note, response.status)
        return response

    def _record(self, request: web.Request, note: _Note, status: int) -> None:
        path = request.path if len(request.path) <= 120 else request.path[:117] + "..."
        detail: dict[str, Any] = {"method": request.method, "path": path, "status": status,
                                  "peer": request.remote, **note.extra}
        if note.result:
            detail["result"] = note.result
        if note.reason:
            detail["reason"] = note.reason
        self.worker.audit(AuditEvent(iso(utcnow()), note.actor, note.action, note.device_id,
                                     note.serial, detail))

    # -- EST ---------------------------------------------------------------------------------

    async def cacerts(self, request: web.Request) -> web.StreamResponse:
        request["audit"].action = "est.cacerts"
        request["audit"].result = "ok"
        return web.Response(body=self._cacerts, headers={
            "Content-Type": CERTS_ONLY, "Content-Transfer-Encoding": "base64"})

    async def csrattrs(self, request: web.Request) -> web.StreamResponse:
        request["audit"].action = "est.csrattrs"
        request["audit"].result = "ok"
        return web.Response(body=self._csrattrs, headers={
            "Content-Type": "application/csrattrs", "Content-Transfer-Encoding": "base64"})

    async def simpleenroll(self, request: web.Request) -> web.StreamResponse:
        return await self._enroll(request, renew=False)

    async def simplereenroll(self, request: web.Request) -> web.StreamResponse:
        return await self._enroll(request, renew=True)

    async def _enroll(self, request: web.Request, *, renew: bool) -> web.StreamResponse:
        note: _Note = request["audit"]
        note.action = "est.reenroll" if renew else "est.enroll"
        if request.content_type != PKCS10:
            note.result = "refused"
            return _text(415, f"want Content-Type {PKCS10}, got {request.content_type!r}")
        auth = self._credentials(request, note, renew=renew)
        if isinstance(auth, web.Response):
            return auth
        body = await self._body(request, note)
        if isinstance(body, web.Response):
            return body
        # The worker checks who is asking first, then decodes: a refusal names the caller.
        reply = await self._enroll_job(EnrollJob(body, auth, renew, request.remote or "-"))
        note.take(reply)
        return _reply(reply)

    def _credentials(self, request: web.Request, note: _Note, *,
                     renew: bool) -> TokenAuth | CertAuth | web.Response:
        peer = _peer_certificate(request)
        if renew:
            if peer is None:
                note.result, note.reason = "forbidden", "no client certificate"
                return _text(403, "simplereenroll needs mutual TLS with the device's current "
                             "certificate")
            return CertAuth(peer)
        header = request.headers.get("Authorization")
        if header is not None:
            try:
                creds = BasicAuth.decode(header)
            except ValueError:
                note.result, note.reason = "unauthorized", "malformed Authorization header"
                return _reply(unauthorized("malformed Authorization header"))
            note.extra["token"] = creds.login[:64]
            return TokenAuth(creds.login, creds.password,
                             self.worker.tokens.mac(creds.login, creds.password))
        if peer is not None:
            return CertAuth(peer)
        note.result, note.reason = "unauthorized", "no credentials"
        return _reply(unauthorized("no credentials"))

    async def _body(self, request: web.Request, note: _Note) -> bytes | web.Response:
        too_big = f"request body over {MAX_BODY} bytes"
        if request.content_length is not None and request.content_length > MAX_BODY:
            note.result, note.reason = "refused", too_big
            return _text(413, too_big)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            note.result, note.reason = "refused", too_big
            return _text(413, too_big)

    async def _enroll_job(self, job: EnrollJob) -> Reply:
        result = await self.worker.submit(job)
        if isinstance(result, NeedsVerification):
            auth = job.auth
            assert isinstance(auth, TokenAuth)  # noqa: S101
            if not await self._verify(auth, result.stored_hash):
                return unauthorized(f"wrong secret for token {auth.name!r}")
            self.worker.tokens.remember(auth.name, result.stored_hash, auth.mac)
            result = await self.worker.submit(job)
            if isinstance(result, NeedsVerification):  # the token changed meanwhile
                return unauthorized(f"token {auth.name!r} changed during verification")
        return cast("Reply", result)

    async def _verify(self, auth: TokenAuth, stored_hash: str) -> bool:
        """scrypt off the loop, at most SCRYPT_SLOTS at once, one run per distinct secret."""
        key = (auth.mac, stored_hash)
        running = self._verifying.get(key)
        if running is None:
            running = asyncio.ensure_future(self._scrypt(auth.secret, stored_hash))
            self._verifying[key] = running
            running.add_done_callback(lambda _: self._verifying.pop(key, None))
        return await asyncio.shield(running)

    async def _scrypt(self, secret: str, stored_hash: str) -> bool:
        assert self._scrypt_slots is not None  # noqa: S101
        async with self._scrypt_slots:
            return await asyncio.to_thread(verify_password, secret, stored_hash)

    # -- CRL and OCSP ----------------------------------------------------------------------

    async def crl(self, request: web.Request) -> web.StreamResponse:
        note: _Note = request["audit"]
        note.action = "crl.fetch"
        snapshot: CRLSnapshot = await self.worker.submit(CRLJob())
        headers = {"ETag": snapshot.etag,
                   "Last-Modified": format_datetime(snapshot.this_update, usegmt=True),
                   "Cache-Control": f"public, max-age={_max_age(snapshot)}"}
        if snapshot.next_update is not None:
            headers["Expires"] = format_datetime(snapshot.next_update, usegmt=True)
        if _not_modified(request, snapshot):
            note.result = "not-modified"
            return web.Response(status=304, headers=headers)
        note.result = "ok"
        headers["Content-Type"] = "application/pkix-crl"
        return web.Response(body=snapshot.der, headers=headers)

    async def ocsp_post(self, request: web.Request) -> web.StreamResponse:
        note: _Note = request["audit"]
        note.action = "ocsp.query"
        if request.content_type != OCSP_REQUEST:
            note.result = "refused"
            return _text(415, f"want Content-Type {OCSP_REQUEST}, got {request.content_type!r}")
        body = await self._body(request, note)
        if isinstance(body, web.Response):
            return body
        return await self._ocsp(body, note, cacheable=False)

    async def ocsp_get(self, request: web.Request) -> web.StreamResponse:
        note: _Note = request["audit"]
        note.action = "ocsp.query"
        # RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}.
        # The raw path keeps '/' and '+' of the base64 apart from their %-escapes.
        tail = request.raw_path.split("?", 1)[0][len("/ocsp/"):]
        request_der = decode_base64(urllib.parse.unquote(tail).encode("latin-1", "replace"))
        if request_der is None or len(request_der) > MAX_BODY:
            note.result, note.reason = "malformed", "malformed base64 in the GET path"
            return _ocsp_response(ocsp.malformed().der)
        return await self._ocsp(request_der, note, cacheable=True)

    async def _ocsp(self, request_der: bytes, note: _Note, *,
                    cacheable: bool) -> web.StreamResponse:
        answer: ocsp.Answer = await self.worker.submit(OCSPJob(request_der))
        note.result, note.serial = answer.result, answer.serial
        if answer.result == "malformed":
            note.reason = "not a DER OCSP request for one certificate"
        # A GET answer without a nonce is the same for everyone for a while (RFC 5019 6).
        max_age = 60 if cacheable and not answer.nonce else 0
        return _ocsp_response(answer.der, max_age)


def _ocsp_response(body: bytes, max_age: int = 0) -> web.Response:
    cache = f"public, max-age={max_age}, no-transform" if max_age else "no-store"
    return web.Response(body=body, headers={"Content-Type": ocsp.CONTENT_TYPE,
                                            "Cache-Control": cache})


def _max_age(snapshot: CRLSnapshot) -> int:
    if snapshot.next_update is None:
        return CRL_MAX_AGE
    left = int((snapshot.next_update - utcnow()).total_seconds())
    return max(0, min(CRL_MAX_AGE, left))


def _not_modified(request: web.Request, snapshot: CRLSnapshot) -> bool:
    """RFC 9110 13.1.2: If-None-Match wins; otherwise If-Modified-Since."""
    match = request.headers.get("If-None-Match")
    if match is not None:
        tags = {t.strip().removeprefix("W/") for t in match.split(",")}
        return "*" in tags or snapshot.etag in tags
    since = request.if_modified_since
    return since is not None and snapshot.this_update.replace(microsecond=0) <= since


def _url(scheme: str, address: Any) -> str:
    host, port = address[0], address[1]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


# -- set-up helpers for the CLI ------------------------------------------------------------

def parse_bind(text: str, option: str = "--bind") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"{text!r} is not HOST:PORT", option)
    return host, int(port_text)


def tls_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+, a client certificate requested, optional, verified against *client_ca*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate and key: {exc}", str(cert)) from exc
    ctx.load_verify_locations(cafile=client_ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= _NO_CHECK_TIME
    return ctx


def server_names(host: str) -> tuple[str, list[str]]:
    """(DNS name, IP addresses) for the default certificate of a bind host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return normalise_host_name(host), []
    if address.is_unspecified:
        # The machine's name when it is a valid host name (container names may not be).
        name = normalise_host_name(socket.gethostname())
        return name if host_name_problem(name) is None else "localhost", ["127.0.0.1", "::1"]
    return "localhost", [str(address)]


def ensure_server_cert(authority: Authority, host: str) -> tuple[Path, Path]:
    """``est-server.pem``/``.key`` in the PKI folder: reused while they fit, else re-issued."""
    root = authority.paths.root
    cert_path, key_path = root / "est-server.pem", root / "est-server.key"
    name, ips = server_names(host)
    if not _still_fits(cert_path, key_path, authority, name, ips):
        authority.server_cert(name, ips, root, basename="est-server")
    return cert_path, key_path


def _still_fits(cert_path: Path, key_path: Path, authority: Authority, name: str,
                ips: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        cert.verify_directly_issued_by(authority.ca.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, IndexError):
        return False
    if not key_path.is_file():
        return False
    if cert.not_valid_after_utc - utcnow() < dt.timedelta(days=SERVER_CERT_MIN_DAYS):
        return False
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return name in san.get_values_for_type(x509.DNSName) and set(ips) <= have_ips


def quiet_tls_errors(loop: asyncio.AbstractEventLoop) -> None:
    """A failed handshake (no chain, a rogue CA) is the client's problem: log it quietly."""
    def handler(the_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            log.debug("TLS/connection error: %s", exc)
            return
        the_loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def serve_until(service: EnrollmentService, host: str, port: int,
                      http: tuple[str, int] | None, stop: asyncio.Event,
                      ready: Callable[[list[str]], None]) -> None:
    """Run until *stop* is set, then shut down cleanly."""
    quiet_tls_errors(asyncio.get_running_loop())
    urls = await service.start(host, port, http)
    try:
        ready(urls)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await service.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Windows
        return None
    return uvloop.new_event_loop


def run(service: EnrollmentService, host: str, port: int,
        http: tuple[str, int] | None) -> None:
    """The CLI's foreground service: runs until SIGINT or SIGTERM, then shuts down cleanly.

    The ready signal is one line on stderr, ``... listening on URL [URL]``: tests and
    supervisors wait for it instead of sleeping.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=LOG_FORMAT)

    def announce(urls: list[str]) -> None:
        sys.stderr.write(f"fleet-provision serve: listening on {' '.join(urls)}\n")
        sys.stderr.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(service, host, port, http, stop, announce)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


__all__ = ["SERVICE_ACTOR", "EnrollmentService", "ensure_server_cert", "parse_bind", "run",
           "serve_until", "tls_context"]
