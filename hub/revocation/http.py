"""What the hub's HTTP sources (a CRL URL, the fleet-state feed) share: a bounded body read."""

from __future__ import annotations

import aiohttp

from hub.errors import SourceError

__all__ = ["read_body"]


async def read_body(response: aiohttp.ClientResponse, limit: int, what: str,
                    chunk: int = 64 * 1024) -> bytes:
    """The body, refused past *limit* bytes before it is all buffered (a hostile server)."""
    body = bytearray()
    async for part in response.content.iter_chunked(chunk):
        body += part
        if len(body) > limit:
            raise SourceError(f"{what} larger than {limit} bytes")
    return bytes(body)
