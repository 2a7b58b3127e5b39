"""Helpers for the feed tests: real signed documents and a real mutual-TLS feed on loopback.

Documents are :mod:`provisioning.registry.feeddoc`'s, signed as the CA service signs them
(:mod:`provisioning.feed.jws`) with a key loaded from the PKI folder: the issuing CA's, or
any other the test chooses (another CA's, a device's). :class:`FeedServer` plays the CA's
``/feed``: mutual TLS with the PKI's server certificate (``localhost``, 127.0.0.1), a state
the test moves, snapshots, deltas from the versions it remembers, long-polls woken by a
change and heartbeats after ``wait``; ``forced`` answers go out first, as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from provisioning.feed.jws import header, raw_signature
from provisioning.pki import PKI
from provisioning.registry.feeddoc import (
    CONTENT_TYPE,
    Changes,
    Device,
    FeedState,
    changes,
    document,
    encode_jws,
)
from provisioning.registry.view import Revocation
from tests.integration.fleet import TRUST_DOMAIN, Fleet

_T = TypeVar("_T")
GATEWAY = "localhost"  # the gateway name of device_sim.lab.make_pki's server certificate


@dataclass(frozen=True)
class Signer:
    """A key and the certificate that goes in ``x5c``."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def issuing(cls, fleet: Fleet) -> Signer:
        """The issuing CA, its key loaded from the PKI folder."""
        ca = PKI(fleet.pki).load_issuing_ca(None)
        return cls(ca.key, ca.cert)

    def sign(self, doc: Mapping[str, Any], *, alg: str | None = None) -> bytes:
        """The JWS envelope of *doc* (``alg`` overrides the header's: a lie for tests)."""
        head = header(self.cert)
        if alg is not None:
            head["alg"] = alg
        payload = json.dumps(doc).encode()
        signing_input, _ = encode_jws(head, payload)
        _, body = encode_jws(head, payload, raw_signature(self.key, signing_input))
        return body


class Issued:
    """``issued`` times as the CA writes them (milliseconds, UTC), strictly increasing."""

    def __init__(self, offset: dt.timedelta = dt.timedelta(0)) -> None:
        self.offset = offset  # a CA whose clock is behind (negative) or ahead
        self._last = dt.datetime.now(dt.UTC) + offset - dt.timedelta(seconds=1)

    def next(self) -> str:
        now = max(dt.datetime.now(dt.UTC) + self.offset,
                  self._last + dt.timedelta(milliseconds=1))
        self._last = now
        return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def revoked(device_id: str, status: str = "revoked") -> Revocation:
    return Revocation(status, "keyCompromise" if status == "revoked" else "certificateHold",
                      "2026-12-03T12:00:00Z", device_id)


def state(version: int, devices: Mapping[str, Device] | None = None,
          refused: Mapping[int, Revocation] | None = None,
          trust_domain: str = TRUST_DOMAIN,
          issuers: tuple[x509.Certificate, ...] = ()) -> FeedState:
    """A state of the CA; *issuers*: the live issuing CAs it names (contract C1), none by
    default (an older CA)."""
    return FeedState(version, trust_domain, MappingProxyType(dict(devices or {})),
                     MappingProxyType(dict(refused or {})),
                     tuple(c.public_bytes(Encoding.DER) for c in issuers))


def snapshot(at: FeedState, issued: str, gateway: str = GATEWAY) -> dict[str, Any]:
    return document(at, base=0, moved=None, issued=issued, gateway=gateway)


def delta(old: FeedState, new: FeedState, issued: str,
          gateway: str = GATEWAY) -> dict[str, Any]:
    return document(new, base=old.version, moved=changes(old, new), issued=issued,
                    gateway=gateway)


def heartbeat(at: FeedState, issued: str, gateway: str = GATEWAY) -> dict[str, Any]:
    return document(at, base=at.version, moved=Changes(), issued=issued, gateway=gateway)


def server_tls(fleet: Fleet) -> ssl.SSLContext:
    """The CA service's side: its certificate, and a client certificate from the CA required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=fleet.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(fleet.pki / "server.pem", fleet.pki / "server.key")
    return context


class FeedServer:
    """``GET /feed`` on 127.0.0.1 over mutual TLS, answering from :attr:`state`."""

    def __init__(self, fleet: Fleet, signer: Signer, first: FeedState) -> None:
        self.signer = signer
        self.issued = Issued()
        self.state = first
        self.history: dict[int, FeedState] = {first.version: first}
        self.forced: list[bytes | int] = []  # sent before the model answers: a body, or a status
        self.requests: list[tuple[int, str]] = []  # (since, wait) as the hub asked
        self.peers: list[str | None] = []  # each request's client certificate's SPIFFE URI
        self.serials: list[str | None] = []  # and its serial number (hex, as ssl gives it)
        self._changed = asyncio.Event()
        self._asked = asyncio.Condition()
        self._tls = server_tls(fleet)
        app = web.Application()
        app.router.add_get("/feed", self._feed)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.url = ""

    def publish(self, new: FeedState) -> None:
        """The CA's state moves to *new*: waiting long-polls answer at once."""
        self.state = new
        self.history[new.version] = new
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        """Until the hub has asked *count* times in all."""
        async with self._asked:
            await asyncio.wait_for(self._asked.wait_for(lambda: len(self.requests) >= count),
                                   timeout)

    async def _feed(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        wait = float(request.query.get("wait", "0"))
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        self.peers.append(next((value for kind, value in (peer or {}).get("subjectAltName", ())
                                if kind == "URI"), None))
        self.serials.append((peer or {}).get("serialNumber"))
        async with self._asked:
            self.requests.append((since, request.query.get("wait", "")))
            self._asked.notify_all()
        if self.forced:
            answer = self.forced.pop(0)
            if isinstance(answer, int):
                return web.Response(status=answer, text="forced refusal\n")
            return self._body(answer)
        if since == self.state.version:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except TimeoutError:
                return self._body(self.signer.sign(heartbeat(self.state, self.issued.next())))
        old = self.history.get(since)
        if since and old is not None and since < self.state.version:
            return self._body(self.signer.sign(delta(old, self.state, self.issued.next())))
        return self._body(self.signer.sign(snapshot(self.state, self.issued.next())))

    @staticmethod
    def _body(body: bytes) -> web.Response:
        return web.Response(body=body, content_type=CONTENT_TYPE)

    async def start(self, port: int = 0) -> FeedServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self._tls,
                           reuse_address=True)
        await site.start()
        host, bound = self._runner.addresses[0][:2]
        self.url = f"https://{host}:{bound}/feed"
        return self

    async def stop(self) -> None:
        self._changed.set()  # let waiting long-polls go
        await self._runner.cleanup()


def signed_by_device(fleet: Fleet, device_id: str) -> Signer:
    """A device's own key and certificate: it chains to the CA, yet may never sign the feed."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    device = fleet.device(device_id)
    key = load_pem_private_key(device.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(device.cert.read_bytes())
    return Signer(key, cert)


def cache_path(root: Path) -> Path:
    return root / "fleet-state.json"


class ThreadedFeed:
    """A :class:`FeedServer` on its own event loop in a thread, for a hub in another process."""

    def __init__(self, fleet: Fleet, signer: Signer, first: FeedState) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="feed server",
                                        daemon=True)
        self._thread.start()
        self.server = self.run(_make(fleet, signer, first))
        self.url = self.server.url
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def publish(self, new: FeedState) -> None:
        self.loop.call_soon_threadsafe(self.server.publish, new)

    def stop_server(self) -> None:
        self.run(self.server.stop())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_server()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _make(fleet: Fleet, signer: Signer, first: FeedState) -> FeedServer:
    return await FeedServer(fleet, signer, first).start()
