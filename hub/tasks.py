"""Stopping the hub's background tasks: one way, so every stop() waits the same way."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel *task* (None: nothing) and wait until it has ended: a stop() that returns
    before its task has unwound would let the task touch what the caller closes next."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
