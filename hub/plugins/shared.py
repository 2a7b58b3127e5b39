"""Finding the hub runtime a plugin works for: the broker's own, or one built from hub.toml."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hub.config import load_config
from hub.runtime import HubRuntime

# Stock amqtt mode: both plugins of one broker share one runtime, keyed by broker identity.
_STANDALONE: dict[tuple[int, str], HubRuntime] = {}
_STARTING: dict[int, asyncio.Lock] = {}


def runtime_for(context: Any, config_path: str) -> tuple[HubRuntime, bool]:
    """The runtime and whether this plugin owns it (True only under a stock amqtt)."""
    broker = getattr(context, "_broker_instance", None)
    provided = getattr(broker, "hub_runtime", None)
    if isinstance(provided, HubRuntime):
        return provided, False
    key = (id(broker), str(Path(config_path).resolve()))
    runtime = _STANDALONE.get(key)
    if runtime is None:
        runtime = HubRuntime(load_config(config_path))
        _STANDALONE[key] = runtime
    return runtime, True


async def ensure_started(runtime: HubRuntime) -> None:
    lock = _STARTING.setdefault(id(runtime), asyncio.Lock())
    async with lock:
        if not runtime.started:
            await runtime.start()


async def release(context: Any, runtime: HubRuntime) -> None:
    broker = getattr(context, "_broker_instance", None)
    for key, value in list(_STANDALONE.items()):
        if value is runtime and key[0] == id(broker):
            del _STANDALONE[key]
            await runtime.stop()
