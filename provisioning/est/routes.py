"""HTTP side: the request handlers of the EST routes, ``/crl`` and ``/ocsp``.

``GET /crl`` answers DER of the current issuing CA's CRL; with ``Accept:
application/x-pem-file``, every live issuing CA's CRL as concatenated PEM (session 6's
contract C1: the hub asks for that, so an ``issuing-ca rotate`` overlap reaches it whole).

Each handler reads the request, says in its :class:`Note` what the audit record is to hold,
and hands anything that needs SQLite or the CA key to the CA worker process through the
:class:`~provisioning.est.channel.EngineChannel`; scrypt for a new token secret runs in a
thread. :class:`~provisioning.est.service.EnrollmentService` mounts them.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass, field
from email.utils import format_datetime
from typing import Any, cast

from aiohttp import BasicAuth, web

from provisioning import ocsp
from provisioning.est.channel import EngineChannel
from provisioning.est.messages import (
    ANONYMOUS,
    CERTS_ONLY,
    CertAuth,
    CRLJob,
    CRLSnapshot,
    EnrollJob,
    NeedsVerification,
    OCSPJob,
    Reply,
    TokenAuth,
    decode_base64,
    unauthorized,
)
from provisioning.identity import verify_password
from provisioning.timefmt import utcnow
from provisioning.tlspeer import peer_certificate

MAX_BODY = 64 * 1024
PKCS10 = "application/pkcs10"
OCSP_REQUEST = "application/ocsp-request"
PEM_FILE = "application/x-pem-file"  # /crl: every live issuer's CRL, concatenated PEM
CRL_MAX_AGE = 60  # seconds a cache may keep /crl: short, so a revocation spreads quickly
SCRYPT_SLOTS = 2  # concurrent scrypt checks: bad secrets cannot eat every core


@dataclass
class Note:
    """What the middleware writes to the audit log for one request."""

    action: str = "http.request"
    actor: str = ANONYMOUS
    device_id: str | None = None
    serial: str | None = None
    result: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    record: bool = True  # False: the handler decided this request leaves no record (/feed)

    def take(self, reply: Reply) -> None:
        self.actor, self.device_id, self.serial = reply.actor, reply.device_id, reply.serial
        self.result, self.reason = reply.result, reply.reason


def text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


def _reply(reply: Reply) -> web.Response:
    headers = dict(reply.headers)
    headers["Content-Type"] = reply.content_type
    return web.Response(status=reply.status, body=reply.body, headers=headers)



class Routes:
    """The handlers, bound to a started :class:`EngineChannel`."""

    def __init__(self, channel: EngineChannel, cacerts: bytes, csrattrs: bytes) -> None:
        self.channel = channel
        self.cacerts_body = cacerts  # replaced when the issuing CAs change (service.py)
        self._csrattrs = csrattrs
        self._scrypt_slots = asyncio.Semaphore(SCRYPT_SLOTS)
        self._verifying: dict[tuple[bytes, str], asyncio.Future[bool]] = {}

    # -- EST ---------------------------------------------------------------------------------

    async def cacerts(self, request: web.Request) -> web.StreamResponse:
        request["audit"].action = "est.cacerts"
        request["audit"].result = "ok"
        return web.Response(body=self.cacerts_body, headers={
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
        note: Note = request["audit"]
        note.action = "est.reenroll" if renew else "est.enroll"
        if request.content_type != PKCS10:
            note.result = "refused"
            return text(415, f"want Content-Type {PKCS10}, got {request.content_type!r}")
        auth = self._credentials(request, note, renew=renew)
        if isinstance(auth, web.Response):
            return auth
        body = await _body(request, note)
        if isinstance(body, web.Response):
            return body
        # The worker checks who is asking first, then decodes: a refusal names the caller.
        reply = await self._enroll_job(EnrollJob(body, auth, renew, request.remote or "-"))
        note.take(reply)
        return _reply(reply)

    def _credentials(self, request: web.Request, note: Note, *,
                     renew: bool) -> TokenAuth | CertAuth | web.Response:
        peer = peer_certificate(request)
        if renew:
            if peer is None:
                note.result, note.reason = "forbidden", "no client certificate"
                return text(403, "simplereenroll needs mutual TLS with the device's current "
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
                             self.channel.tokens.mac(creds.login, creds.password))
        if peer is not None:
            return CertAuth(peer)
        note.result, note.reason = "unauthorized", "no credentials"
        return _reply(unauthorized("no credentials"))

    async def _enroll_job(self, job: EnrollJob) -> Reply:
        result = await self.channel.submit(job)
        if isinstance(result, NeedsVerification):
            auth = job.auth
            assert isinstance(auth, TokenAuth)  # noqa: S101
            if not await self._verify(auth, result.stored_hash):
                return unauthorized(f"wrong secret for token {auth.name!r}")
            self.channel.tokens.remember(auth.name, result.stored_hash, auth.mac)
            result = await self.channel.submit(job)
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
        async with self._scrypt_slots:
            return await asyncio.to_thread(verify_password, secret, stored_hash)

    # -- CRL and OCSP ----------------------------------------------------------------------

    async def crl(self, request: web.Request) -> web.StreamResponse:
        """The current issuing CA's CRL in DER (RFC 5280 4.2.1.13 ``application/pkix-crl``),
        or, for ``Accept: application/x-pem-file``, every live issuing CA's CRL as
        concatenated PEM (during an ``issuing-ca rotate`` overlap: both)."""
        note: Note = request["audit"]
        note.action = "crl.fetch"
        snapshot: CRLSnapshot = await self.channel.submit(CRLJob())
        pem = _wants_pem(request)
        etag = snapshot.pem_etag if pem else snapshot.etag
        headers = {"ETag": etag,
                   "Last-Modified": format_datetime(snapshot.this_update, usegmt=True),
                   "Cache-Control": f"public, max-age={_max_age(snapshot)}",
                   "Vary": "Accept"}
        if snapshot.next_update is not None:
            headers["Expires"] = format_datetime(snapshot.next_update, usegmt=True)
        if _not_modified(request, snapshot, etag):
            note.result = "not-modified"
            return web.Response(status=304, headers=headers)
        note.result = "ok"
        if pem:
            note.extra["format"] = "pem"
            headers["Content-Type"] = PEM_FILE
            return web.Response(body=snapshot.pem, headers=headers)
        headers["Content-Type"] = "application/pkix-crl"
        return web.Response(body=snapshot.der, headers=headers)

    async def ocsp_post(self, request: web.Request) -> web.StreamResponse:
        note: Note = request["audit"]
        note.action = "ocsp.query"
        if request.content_type != OCSP_REQUEST:
            note.result = "refused"
            return text(415, f"want Content-Type {OCSP_REQUEST}, got {request.content_type!r}")
        body = await _body(request, note)
        if isinstance(body, web.Response):
            return body
        return await self._ocsp(body, note, cacheable=False)

    async def ocsp_get(self, request: web.Request) -> web.StreamResponse:
        note: Note = request["audit"]
        note.action = "ocsp.query"
        # RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}.
        # The raw path keeps '/' and '+' of the base64 apart from their %-escapes.
        tail = request.raw_path.split("?", 1)[0][len("/ocsp/"):]
        request_der = decode_base64(urllib.parse.unquote(tail).encode("latin-1", "replace"))
        if request_der is None or len(request_der) > MAX_BODY:
            note.result, note.reason = "malformed", "malformed base64 in the GET path"
            return _ocsp_response(ocsp.malformed().der)
        return await self._ocsp(request_der, note, cacheable=True)

    async def _ocsp(self, request_der: bytes, note: Note, *,
                    cacheable: bool) -> web.StreamResponse:
        answer: ocsp.Answer = await self.channel.submit(OCSPJob(request_der))
        note.result, note.serial = answer.result, answer.serial
        if answer.result == "malformed":
            note.reason = "not a DER OCSP request for one certificate"
        # A GET answer without a nonce is the same for everyone for a while (RFC 5019 6).
        max_age = 60 if cacheable and not answer.nonce else 0
        return _ocsp_response(answer.der, max_age)


async def _body(request: web.Request, note: Note) -> bytes | web.Response:
    too_big = f"request body over {MAX_BODY} bytes"
    if request.content_length is not None and request.content_length > MAX_BODY:
        note.result, note.reason = "refused", too_big
        return text(413, too_big)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        note.result, note.reason = "refused", too_big
        return text(413, too_big)


def _ocsp_response(body: bytes, max_age: int = 0) -> web.Response:
    cache = f"public, max-age={max_age}, no-transform" if max_age else "no-store"
    return web.Response(body=body, headers={"Content-Type": ocsp.CONTENT_TYPE,
                                            "Cache-Control": cache})


def _max_age(snapshot: CRLSnapshot) -> int:
    if snapshot.next_update is None:
        return CRL_MAX_AGE
    left = int((snapshot.next_update - utcnow()).total_seconds())
    return max(0, min(CRL_MAX_AGE, left))


def _wants_pem(request: web.Request) -> bool:
    """Whether the client asked for ``application/x-pem-file`` (contract C1: the hub does)."""
    accept = request.headers.get("Accept", "")
    return any(part.split(";", 1)[0].strip().lower() == PEM_FILE for part in accept.split(","))


def _not_modified(request: web.Request, snapshot: CRLSnapshot, etag: str) -> bool:
    """RFC 9110 13.1.2: If-None-Match wins; otherwise If-Modified-Since."""
    match = request.headers.get("If-None-Match")
    if match is not None:
        tags = {t.strip().removeprefix("W/") for t in match.split(",")}
        return "*" in tags or etag in tags
    since = request.if_modified_since
    return since is not None and snapshot.this_update.replace(microsecond=0) <= since
