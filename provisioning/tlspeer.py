"""The client certificate of an aiohttp request over TLS: EST renewals and the feed read it."""

from __future__ import annotations

from typing import cast

from aiohttp import web

__all__ = ["peer_certificate"]


def peer_certificate(request: web.Request) -> bytes | None:
    """The peer's certificate (DER) as the TLS handshake verified it; None without one."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    return cast("bytes | None", ssl_object.getpeercert(binary_form=True))
