"""Running the hub: uvloop where available, signals, a ready line, orderly shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from hub.broker import HubBroker
from hub.config import HubConfig
from hub.runtime import HubRuntime
from hub.tls import server_context

log = logging.getLogger("hub")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt logs three INFO lines per connection and transitions one per state change.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def serve_hub(config: HubConfig, *, ready: Callable[[HubBroker], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or *stop*); the runtime starts first and stops last."""
    runtime = HubRuntime(config)
    await runtime.start()
    try:
        broker = HubBroker(runtime)
        await broker.start()
        try:
            stop = stop or asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, _reload_tls, broker, config)
            # Start-up objects (config, CA bundle, amqtt) never die: keep the collector off
            # them, and collect young objects less often; a connect makes many.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
            if ready is not None:
                ready(broker)
            await stop.wait()
        finally:
            await broker.shutdown()
    finally:
        await runtime.stop()


def _reload_tls(broker: HubBroker, config: HubConfig) -> None:
    """SIGHUP: re-read server.pem/server.key for new connections (rotation), feed_cert/feed_key
    for the feed's next request, and look at client_ca now (hub.cabundle checks it, as it does
    every second; a bad bundle is refused there, the one in force used here)."""
    runtime = broker.hub_runtime
    runtime.client_ca.check_soon()
    feed = runtime.feed
    if feed is not None:
        feed.reload_tls()
    try:
        broker.listener.replace_context(server_context(config.listener,
                                                       runtime.client_ca.bundle.pem))
    except (OSError, ssl.SSLError) as exc:
        log.error("TLS reload failed, keeping the old certificate: %s", exc)  # noqa: TRY400
        return
    log.warning("TLS context reloaded from %s", config.listener.server_cert)


def run(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed: the TLS and socket work of a gateway is its whole load."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
        return
    uvloop.run(main)
