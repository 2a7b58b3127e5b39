"""The CRL sources: ``crl-file``, re-read when it changes, and ``crl-url``, fetched over http(s).

Both verify in a worker thread (:class:`~hub.revocation.crl.CrlVerifier`) and keep, per
issuer, their last good CRL and a newer stale one (:class:`~hub.revocation.crl.CrlSet`): the
file and the URL may carry one CRL (DER or PEM) or several PEM CRLs concatenated, one per
issuing CA (contract C1). The file is re-read when its inode, mtime or size changes; the URL
is fetched every refresh with a conditional GET asking for ``application/x-pem-file`` (the
CA service then answers every live issuer's CRL; DER of one CRL is taken too), and a slow
fetch carries on across refresh cycles instead of holding them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import aiohttp
from cryptography import x509

from hub.errors import SourceError
from hub.revocation.crl import CrlSet, CrlVerifier
from hub.revocation.http import read_body
from hub.revocation.model import SourceData
from hub.revocation.sources import Outcome, PolledSource, Still

__all__ = ["HTTP_TIMEOUT_S", "MAX_CRL_BYTES", "PEM_CRLS", "CrlFileSource", "CrlUrlSource"]

PEM_CRLS: Final = "application/x-pem-file"  # every live issuer's CRL, as PEM (contract C1)
HTTP_TIMEOUT_S: Final = 10.0  # one CRL fetch, connect to last byte
MAX_CRL_BYTES: Final = 64 * 1024 * 1024  # far above any fleet's CRL; bounds a hostile server


class _CrlSource(PolledSource):
    """A source of CRLs: keeps, per issuer, the last good CRL and a newer one that arrived
    stale."""

    def __init__(self, where: str, verifier: CrlVerifier) -> None:
        super().__init__(where)
        self._verifier = verifier
        self.lists = CrlSet()

    def _take(self, blob: bytes, lists: CrlSet) -> CrlSet:
        """Verify *blob* and fold it into *lists*; runs in a worker thread."""
        verifier = self._verifier
        return lists.take(verifier.check(blob), time.time(), verifier.issuers())

    def replace_ca_certs(self, ca_certs: Sequence[x509.Certificate], cadata: str) -> None:
        """A reloaded client_ca: later CRLs are checked against its CAs (and the source's
        CRLs taken again: one of them may be of a CA left out so far)."""
        del cadata  # a file needs no TLS
        self._verifier.replace(ca_certs)
        self._again()

    def _again(self) -> None:
        """Take the source's CRLs again at the next look, even if unchanged."""

    def _accept(self, lists: CrlSet) -> SourceData:
        """On the event loop: the new lists are the source's, their union its data."""
        self.lists = lists
        assert lists.data is not None  # noqa: S101 - take() always leaves one list
        return lists.data

    def warning(self, now: float) -> str | None:
        return self.lists.warning(now) if self.stale(now) else None


class CrlFileSource(_CrlSource):
    name = "crl-file"
    local = True

    def __init__(self, path: Path, verifier: CrlVerifier) -> None:
        super().__init__(str(path), verifier)
        self._path = path
        self._key: tuple[int, int, int, int] | None = None  # the file last accepted

    def _again(self) -> None:
        self._key = None

    async def _attempt(self, budget: float | None) -> Outcome:
        outcome = await asyncio.to_thread(self._read, self.lists)
        return outcome if isinstance(outcome, Still) else self._accept(outcome)

    def _read(self, lists: CrlSet) -> CrlSet | Still:
        try:
            stat = self._path.stat()
            key = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if key == self._key:
                return Still.UNCHANGED
            blob = self._path.read_bytes()
        except FileNotFoundError:
            raise SourceError("no such file") from None
        except OSError as exc:
            raise SourceError(f"cannot read the CRL: {exc.strerror}") from exc
        self._key = None  # until this content is accepted, look again every time
        taken = self._take(blob, lists)
        self._key = key
        return taken


def _tls_context(cadata: str) -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system's trust store, hostname checks
    if cadata:
        context.load_verify_locations(cadata=cadata)  # plus the fleet's own CAs
    return context


class CrlUrlSource(_CrlSource):
    """A CRL over http(s). A slow fetch carries on across refresh cycles, never blocking them."""

    name = "crl-url"

    def __init__(self, url: str, verifier: CrlVerifier, cadata: str) -> None:
        super().__init__(url, verifier)
        self._url = url
        self._cadata = cadata
        self._session: aiohttp.ClientSession | None = None
        self._validators: dict[str, str] = {}  # conditional-GET headers of the accepted CRL
        self._inflight: asyncio.Task[CrlSet | Still] | None = None
        self._reload = False

    def replace_ca_certs(self, ca_certs: Sequence[x509.Certificate], cadata: str) -> None:
        """A reloaded client_ca: later CRLs are checked against its CAs, and the next fetch
        trusts them for the CRL server's certificate."""
        super().replace_ca_certs(ca_certs, cadata)
        self._cadata, self._reload = cadata, True

    def _again(self) -> None:
        self._validators = {}  # no 304: the whole answer again

    async def _attempt(self, budget: float | None) -> Outcome:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name=f"fetch {self._url}")
        done, _ = await asyncio.wait({self._inflight}, timeout=budget)
        if not done:
            return Still.PENDING
        task, self._inflight = self._inflight, None
        outcome = task.result()
        return outcome if isinstance(outcome, Still) else self._accept(outcome)

    async def _fetch(self) -> CrlSet | Still:
        if self._reload:
            self._reload = False  # one fetch at a time: no other request uses the session
            session, self._session = self._session, None
            if session is not None:
                await session.close()
        if self._session is None:
            context = await asyncio.to_thread(_tls_context, self._cadata)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
            )
        headers = {"Accept": PEM_CRLS,
                   **(self._validators if self.data is not None else {})}
        try:
            async with self._session.get(self._url, headers=headers) as response:
                if response.status == 304 and self.data is not None:
                    return Still.UNCHANGED
                if response.status != 200:
                    raise SourceError(f"HTTP {response.status} {response.reason or ''}")
                body = await read_body(response, MAX_CRL_BYTES, "CRL")
                validators = {
                    request: response.headers[reply]
                    for request, reply in (("If-None-Match", "ETag"),
                                           ("If-Modified-Since", "Last-Modified"))
                    if reply in response.headers
                }
        except TimeoutError:
            raise SourceError(f"no answer within {HTTP_TIMEOUT_S:g} s") from None
        except aiohttp.ClientError as exc:
            raise SourceError(f"cannot fetch the CRL: {exc}") from exc
        taken = await asyncio.to_thread(self._take, body, self.lists)
        self._validators = validators
        return taken

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

