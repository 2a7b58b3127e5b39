"""``GET /feed?since=V&wait=S``: the signed fleet-state document for one gateway (DESIGN
section 9; mounted by :mod:`provisioning.est.service` on its HTTPS listener only).

    403  the client certificate is no gateway certificate of this CA (one text line: why)
    400  ``since`` is not a whole number >= 0, or ``wait`` not a number of seconds
    200  a JWS (``application/jose+json``) whose payload is the document:
         since == the current version: wait up to ``wait`` seconds (clamped to [0, 60])
             for a change; then the delta, else a heartbeat (version == base, nothing listed)
         since < current, and its change sets still held: the delta at once
         since 0, too old, or unknown (after current, or from before a restart): a snapshot
    503  the CA worker process (which signs) is gone, or the registry could not be read for
         a few seconds (the service no longer vouches for its last state)

The document is built here and its signing input signed by the CA worker process, the only
holder of the issuing key. The JWS header's ``x5c`` names the first of the state's
``issuers`` (the current issuing CA; after an ``issuing-ca rotate`` the new one, as soon as
the follower sees it), and the worker is asked for that CA's signature by the SHA-256 of its
DER, so header and signature agree whichever of the two learns of a rotation first.

A snapshot of a large fleet is megabytes of JSON (10,000 devices:
2.5 MB, 30 ms to build): it is built once per version, with marks where ``issued`` and
``gateway`` go, and each answer replaces the marks (their first occurrences: both keys come
before any device). What gets audited is :mod:`provisioning.feed.auditing`'s choice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web
from cryptography import x509

from provisioning.feed import jws
from provisioning.feed.auditing import FeedAudit
from provisioning.feed.follower import Follower
from provisioning.feed.gateway import Gateway, Refusal, identify, issued_by_ca
from provisioning.registry.feeddoc import (
    CONTENT_TYPE,
    Changes,
    FeedState,
    b64url,
    document,
    encode_jws,
)
from provisioning.registry.view import FleetViewError
from provisioning.tlspeer import peer_certificate

__all__ = ["MAX_WAIT_SECONDS", "AuditNote", "FeedRoute"]

MAX_WAIT_SECONDS: Final = 60.0
ACTION: Final = "feed.fetch"
_MARK: Final = "\x00"  # never in a device id, group, host name or time: JSON "\u0000"


class AuditNote(Protocol):
    """What the service's audit middleware records for a request (est/routes.Note)."""

    action: str
    actor: str
    serial: str | None
    result: str | None
    reason: str | None
    extra: dict[str, Any]
    record: bool


def iso_ms(when: dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds: a document's ``issued``."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FeedRoute:
    """The handler; *sign* turns a JWS signing input into the raw signature (CA worker)."""

    def __init__(self, follower: Follower, header: dict[str, Any],
                 sign: Callable[[bytes, bytes | None], Awaitable[bytes]],
                 audit: FeedAudit | None = None) -> None:
        self.follower = follower
        # RFC 7515 5.1: the signing input is "<protected>.<payload>"; the first part is fixed
        # for one signer.
        self._prefix, _ = encode_jws(header, b"")
        self._signer: bytes | None = None  # the DER the prefix names, once from the state
        self._signer_id: bytes | None = None  # its SHA-256, for the worker
        self._sign = sign
        self._audit = audit or FeedAudit()
        self._issued: dict[str, dt.datetime] = {}  # per gateway: the last ``issued``
        self._snapshot: tuple[int, bytes] | None = None  # (version, payload with marks)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        note: AuditNote = request["audit"]
        note.action, note.record = ACTION, False  # recorded only when worth it (auditing.py)
        gateway = await self._gateway(request)
        if isinstance(gateway, Refusal):
            note.serial = gateway.serial
            return self._refuse(request, note, 403, gateway.reason)
        note.actor, note.serial = f"gateway:{gateway.name}", gateway.serial_text
        query = _query(request)
        if isinstance(query, str):
            return self._refuse(request, note, 400, query)
        since, wait = query
        follower = self.follower
        trouble = follower.trouble()
        if trouble is not None:
            return self._refuse(request, note, 503, "the CA cannot read its registry, so it "
                                f"does not vouch for the feed's last state now: {trouble}")
        if since == follower.state.version:
            await follower.wait_change(since, wait)
        state = follower.state
        moved: Changes | None
        if since == state.version:
            kind, moved = "heartbeat", Changes()
        else:
            moved = follower.since(since) if 0 < since < state.version else None
            kind = "snapshot" if moved is None else "delta"
        self._take_signer(state.issuers)
        issued = self._issued_now(gateway.name)
        if moved is None:
            payload = self._snapshot_payload(state, issued, gateway.name)
        else:
            payload = _json(document(state, base=since, moved=moved, issued=issued,
                                     gateway=gateway.name))
        body = await self._envelope(payload)
        if kind != "heartbeat" and self._audit.served(gateway.name, state.version):
            note.record, note.result = True, "ok"
            note.extra.update(gateway=gateway.name, since=since, version=state.version,
                              kind=kind)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE,
                                                "Cache-Control": "no-store"})

    async def _gateway(self, request: web.Request) -> Gateway | Refusal:
        follower = self.follower
        found = identify(peer_certificate(request), follower.trust_domain,
                         dt.datetime.now(dt.UTC))
        if isinstance(found, Refusal):
            return found
        if found.serial not in follower.gateways:  # issued a moment ago? read once more
            with contextlib.suppress(FleetViewError):  # logged by the follower's own reads
                await follower.refresh_gateways()
        return issued_by_ca(found, follower.gateways) or found

    def _issued_now(self, gateway: str) -> str:
        """Now, to the millisecond, but strictly after the last ``issued`` this gateway got:
        a hub refuses a document not later than the last one it took (a replay), and two
        answers can fall within one millisecond."""
        now = dt.datetime.now(dt.UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        last = self._issued.get(gateway)
        if last is not None and now <= last:
            now = last + dt.timedelta(milliseconds=1)
        self._issued[gateway] = now
        return iso_ms(now)

    def _snapshot_payload(self, state: FeedState, issued: str, gateway: str) -> bytes:
        cached = self._snapshot
        if cached is None or cached[0] != state.version:
            cached = (state.version, _json(document(state, base=0, moved=None, issued=_MARK,
                                                    gateway=_MARK)))
            self._snapshot = cached
        marked = _json(_MARK)
        return (cached[1]
                .replace(b'"issued":' + marked, b'"issued":' + _json(issued), 1)
                .replace(b'"gateway":' + marked, b'"gateway":' + _json(gateway), 1))

    def _take_signer(self, issuers: tuple[bytes, ...]) -> None:
        """The header names the current issuing CA, the first of *issuers*."""
        if not issuers or issuers[0] == self._signer:
            return
        self._prefix, _ = encode_jws(jws.header(x509.load_der_x509_certificate(issuers[0])),
                                     b"")
        self._signer, self._signer_id = issuers[0], hashlib.sha256(issuers[0]).digest()

    async def _envelope(self, payload: bytes) -> bytes:
        signing_input = self._prefix + b64url(payload).encode("ascii")
        return jws.envelope(signing_input, await self._sign(signing_input, self._signer_id))

    def _refuse(self, request: web.Request, note: AuditNote, status: int,
                reason: str) -> web.Response:
        if self._audit.refused(request.remote or "-", reason, time.monotonic()):
            note.record = True
            note.result = {403: "forbidden", 400: "refused"}.get(status, "error")
            note.reason = reason
        return web.Response(status=status, text=reason + "\n")


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _query(request: web.Request) -> tuple[int, float] | str:
    """(since, wait) or why the query is bad."""
    since_text = request.query.get("since", "0")
    if not since_text.isascii() or not since_text.isdigit() or len(since_text) > 20:
        return f"since: want a whole number >= 0 (a version), got {since_text[:40]!r}"
    wait_text = request.query.get("wait", "0")
    try:
        wait = float(wait_text)
    except ValueError:
        wait = math.nan
    if math.isnan(wait) or len(wait_text) > 20:
        return f"wait: want a number of seconds, got {wait_text[:40]!r}"
    return int(since_text), min(max(wait, 0.0), MAX_WAIT_SECONDS)

