"""HTTP side: the enrollment service's web application, its listeners and audit middleware.

    GET  /.well-known/est/cacerts         the CA chain as base64 certs-only CMS (RFC 7030 4.1)
    POST /.well-known/est/simpleenroll    base64 PKCS#10 in, base64 certs-only out (4.2.1);
                                          HTTP Basic enrollment token or a station certificate
    POST /.well-known/est/simplereenroll  renewal over mutual TLS with the current cert (4.2.2)
    GET  /.well-known/est/csrattrs        the key type and signature this CA wants (4.5)
    GET  /crl                             the current CRL in DER, with ETag / 304
    POST /ocsp, GET /ocsp/<base64>        the OCSP responder (RFC 6960 appendix A.1)
    GET  /feed?since=V&wait=S             the signed fleet-state feed for gateways (DESIGN 9;
                                          :mod:`provisioning.feed`), HTTPS only

TLS always; a client certificate is requested but optional, verified against ca-chain.pem.
``--http-bind`` adds a plain-HTTP listener with only ``/crl`` and ``/ocsp``: both answers are
signed, and relying parties fetch them without trusting a TLS server first (RFC 5280 4.2.1.13
and RFC 6960 appendix A use http URLs for that reason).

Handlers (:mod:`provisioning.est.routes`) never block: everything that touches SQLite or the
CA key runs in the CA worker process, reached through :mod:`provisioning.est.channel`, so
HTTP and signing use two cores; the feed's follower reads the registry read-only (a FleetView
in a worker thread). Every request is audited in the registry's hash chain by the middleware,
who/what/result, unless its handler says it is not worth a record (``Note.record``: the feed
records state changes and refusals only, :mod:`provisioning.feed.auditing`). If the worker
process dies, requests get 503, not a hang.

An ``issuing-ca rotate`` or ``retire`` run beside the service is taken without a restart: the
worker re-reads the issuing CAs when ``ca-chain.pem`` changed (one ``stat`` per batch), and
this side, told by the feed's follower, answers ``cacerts`` with the new chain and adds a new
issuing CA to the TLS listener's trust for client certificates.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography import x509

from provisioning import der
from provisioning.authority import Authority
from provisioning.errors import UsageError, WorkerGone
from provisioning.est.channel import EngineChannel
from provisioning.est.messages import AuditEvent, Statistics, b64_body, certs_only
from provisioning.est.routes import MAX_BODY, Note, Routes, text
from provisioning.feed import jws
from provisioning.feed.follower import Follower
from provisioning.feed.issuers import ChainIssuers
from provisioning.feed.route import FeedRoute
from provisioning.registry.view import FleetView
from provisioning.timefmt import iso, utcnow

log = logging.getLogger("provisioning.est")

EST_PATH = "/.well-known/est"


class EnrollmentService:
    """The HTTP side: routes, the audit middleware, and the hand-off to the worker."""

    def __init__(self, authority: Authority, tls: ssl.SSLContext,
                 manifest: frozenset[str] | None = None) -> None:
        self.authority = authority
        self.tls = tls
        self.manifest = manifest
        self._root = x509.load_pem_x509_certificate(authority.paths.root_cert.read_bytes())
        chain = x509.load_pem_x509_certificates(authority.paths.chain.read_bytes())
        self._cacerts = certs_only(chain)
        self._csrattrs = b64_body(der.csr_attributes())
        self._channel: EngineChannel | None = None
        self._routes: Routes | None = None
        self._follower: Follower | None = None
        self._feed: FeedRoute | None = None
        self._runner: web.AppRunner | None = None
        self._plain_runner: web.AppRunner | None = None

    @property
    def channel(self) -> EngineChannel:
        if self._channel is None:
            raise RuntimeError("the service is not started")
        return self._channel

    def statistics(self) -> Statistics:
        return self.channel.statistics()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str, port: int,
                    http: tuple[str, int] | None = None) -> list[str]:
        """Listen; returns the base URLs actually bound (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._channel = EngineChannel(self.authority, self.manifest, loop)
        self._routes = Routes(self._channel, self._cacerts, self._csrattrs)
        await self._channel.start()
        urls: list[str] = []
        try:
            self._feed = await self._start_feed(self._channel)
            self._runner = await self._listen(self._app(est=True), host, port, self.tls)
            urls += [_url("https", a) for a in self._runner.addresses]
            if http is not None:
                self._plain_runner = await self._listen(self._app(est=False), *http, None)
                urls += [_url("http", a) for a in self._plain_runner.addresses]
        except BaseException:
            await self.close()
            raise
        return urls

    async def _start_feed(self, channel: EngineChannel) -> FeedRoute:
        """Follow the registry (read-only) for /feed; the worker signs its documents."""
        view = FleetView(self.authority.paths.registry)
        try:
            trust_domain = (await asyncio.to_thread(view.trust_domain)
                            or self.authority.config.trust_domain)
            self._follower = Follower(
                view, trust_domain,
                issuers=ChainIssuers(self.authority.paths.chain, self.authority.paths.root_cert),
                on_issuers=self._issuers_changed)
        except BaseException:
            view.close()
            raise
        await self._follower.start()
        header = jws.header(self.authority.pki.issuing_cert)
        return FeedRoute(self._follower, header, channel.sign_feed)

    def _issuers_changed(self, issuers: tuple[bytes, ...]) -> None:
        """An ``issuing-ca rotate`` or ``retire`` (seen by the follower, on the loop): EST
        ``cacerts`` answers the new chain, and the TLS listener also trusts a new issuing CA
        for client certificates (OpenSSL adds to a context's store, never removes: a
        retired CA stays trusted by this listener until a restart, and the worker refuses
        what the registry does not hold as in service anyway)."""
        certs = [x509.load_der_x509_certificate(der) for der in issuers]
        if self._routes is not None:
            self._routes.cacerts_body = certs_only([*certs, self._root])
        self.tls.load_verify_locations(cadata=b"".join(issuers))
        log.info("issuing CAs now: %s", ", ".join(c.subject.rfc4514_string() for c in certs))

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
        if self._follower is not None:  # long-polls answer now instead of holding the stop
            self._follower.stop_waiting()
        for runner in (self._runner, self._plain_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._plain_runner = None
        if self._follower is not None:
            await self._follower.close()
            self._follower = None
        if self._channel is not None:
            await self._channel.stop()

    def _app(self, *, est: bool) -> web.Application:
        routes = self._routes
        assert routes is not None  # noqa: S101  (made in start)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._audited])
        if est:
            app.router.add_get(f"{EST_PATH}/cacerts", routes.cacerts)
            app.router.add_post(f"{EST_PATH}/simpleenroll", routes.simpleenroll)
            app.router.add_post(f"{EST_PATH}/simplereenroll", routes.simplereenroll)
            app.router.add_get(f"{EST_PATH}/csrattrs", routes.csrattrs)
            if self._feed is not None:
                app.router.add_get("/feed", self._feed)
        app.router.add_get("/crl", routes.crl)
        app.router.add_post("/ocsp", routes.ocsp_post)
        app.router.add_get("/ocsp/{request:.+}", routes.ocsp_get)
        return app

    # -- the audit middleware --------------------------------------------------------------

    @web.middleware
    async def _audited(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
        note = Note()
        request["audit"] = note
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # 404, 405 and the like, raised by aiohttp
            response = text(exc.status, exc.reason, {k: v for k, v in exc.headers.items()
                                                     if k.lower() == "allow"})
            note.result = note.result or "refused"
        except WorkerGone as exc:  # logged once, when the worker process went away
            response = text(503, "the CA worker is gone; try again later")
            note.result, note.reason = "error", str(exc)
        except asyncio.CancelledError:
            note.result, note.reason = "cancelled", "the client went away"
            self._record(request, note, 499)
            raise
        except Exception:  # a bug must cost one request, never the service
            log.exception("request failed: %s %s", request.method, request.path)
            response = text(500, "internal error")
            note.result, note.record = "error", True
        self._record(request, note, response.status)
        return response

    def _record(self, request: web.Request, note: Note, status: int) -> None:
        if not note.record:
            return
        path = request.path if len(request.path) <= 120 else request.path[:117] + "..."
        detail: dict[str, Any] = {"method": request.method, "path": path, "status": status,
                                  "peer": request.remote, **note.extra}
        if note.result:
            detail["result"] = note.result
        if note.reason:
            detail["reason"] = note.reason
        self.channel.audit(AuditEvent(iso(utcnow()), note.actor, note.action, note.device_id,
                                      note.serial, detail))


def _url(scheme: str, address: Any) -> str:
    host, port = address[0], address[1]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"
