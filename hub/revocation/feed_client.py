"""The feed's HTTP side: ``GET /feed?since=V&wait=S`` over mutual TLS, one answer's bytes.

The hub presents its gateway certificate (``feed_cert``/``feed_key``, by default the
listener's server certificate, which ``fleet-provision server-cert`` makes usable as a client
too) and trusts the system's CAs plus ``client_ca`` for the CA service's certificate, as the
CRL URL source does. The request waits up to ``wait`` seconds at the CA (the long-poll), so
its timeout is ``wait + 10`` s. Every failure is one :class:`~hub.errors.SourceError` line;
what the body says is :mod:`~hub.revocation.feed_verify`'s business.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Final

import aiohttp

from hub.errors import SourceError
from hub.revocation.http import read_body

__all__ = ["MAX_FEED_BYTES", "REQUEST_SLACK_S", "FeedClient"]

REQUEST_SLACK_S: Final = 10.0  # beyond the long-poll's wait: connect, TLS, the answer itself
MAX_FEED_BYTES: Final = 256 * 1024 * 1024  # far above a million devices' snapshot
_REASON_BYTES: Final = 200  # of a refusal's text body, for the log


def _tls_context(cadata: str, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system's trust store, hostname checks
    if cadata:
        context.load_verify_locations(cadata=cadata)  # plus the fleet's own CAs
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"cannot load the gateway certificate {cert} and key {key}: "
                          f"{exc}") from exc
    return context


class FeedClient:
    """One keep-alive HTTPS session to the feed; :meth:`fetch` is one long-poll."""

    def __init__(self, url: str, cert: Path, key: Path, cadata: str) -> None:
        self.url = url
        self._cert, self._key, self._cadata = cert, key, cadata
        self._session: aiohttp.ClientSession | None = None
        self._reload = False

    def reload(self, cadata: str | None = None) -> None:
        """The next request reads the certificate, key and trust again (a request in flight
        finishes on its connection); *cadata*: the client_ca bundle now in force."""
        if cadata is not None:
            self._cadata = cadata
        self._reload = True

    async def fetch(self, since: int, wait: float) -> bytes:
        """The body of a 200 answer to ``since``/``wait``; SourceError for anything else."""
        if self._reload:
            self._reload = False
            await self.close()
        if self._session is None:
            context = await asyncio.to_thread(_tls_context, self._cadata, self._cert,
                                              self._key)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        timeout = aiohttp.ClientTimeout(total=wait + REQUEST_SLACK_S)
        params = {"since": str(since), "wait": f"{wait:g}"}
        try:
            async with self._session.get(self.url, params=params, timeout=timeout) as answer:
                if answer.status != 200:
                    text = (await answer.content.read(_REASON_BYTES)).decode("utf-8", "replace")
                    why = " ".join(text.split()) or answer.reason or ""
                    raise SourceError(f"the CA answered HTTP {answer.status}: {why}")
                return await read_body(answer, MAX_FEED_BYTES, "feed answer", 256 * 1024)
        except TimeoutError:
            raise SourceError(f"no answer within {wait + REQUEST_SLACK_S:g} s") from None
        except aiohttp.ClientError as exc:
            raise SourceError(f"cannot reach the CA: {exc}") from exc

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

