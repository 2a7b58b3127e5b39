"""The hub's connection handler: keep-alive from the housekeeping pass, the end recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from amqtt.adapters import StreamReaderAdapter

from hub import handler as handler_module
from hub.handler import HubHandler
from hub.session import HubSession


class _Writer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return

    async def close(self) -> None:
        return


def _handler(keep_alive: int) -> tuple[HubHandler, asyncio.StreamReader]:
    session = HubSession()
    session.client_id = "dev-1"
    session.keep_alive = keep_alive
    stream = asyncio.StreamReader()
    handler = HubHandler(None)
    handler.attach(session, StreamReaderAdapter(stream), _Writer())
    return handler, stream


def test_a_housekeeping_pass_right_after_start_does_not_expire_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass may run between creating the reader task and its first step (a storm of
    connects): the deadline must already count from now, not from zero."""
    async def main() -> None:
        handler, stream = _handler(keep_alive=60)
        real = asyncio.create_task

        def create_task_then_sweep(coro: Any) -> asyncio.Task[Any]:
            async def late() -> Any:  # the reader's first step comes after the pass
                await asyncio.sleep(0.05)
                return await coro

            loop = asyncio.get_running_loop()
            loop.call_later(0.01, lambda: handler.check_idle(loop.time()))
            return real(late())

        monkeypatch.setattr(handler_module.asyncio, "create_task", create_task_then_sweep)
        await asyncio.wait_for(handler.start(), 5)
        monkeypatch.setattr(handler_module.asyncio, "create_task", real)
        assert handler._reader_task is not None
        assert not handler._reader_task.done()
        stream.feed_eof()
        await asyncio.wait_for(handler._reader_stopped.wait(), 5)
        assert handler.ended  # the end is recorded for the broker's message loop

    asyncio.run(main())


def test_silence_past_keep_alive_ends_the_reader() -> None:
    async def main() -> None:
        handler, _stream = _handler(keep_alive=2)
        await handler.start()
        loop = asyncio.get_running_loop()
        handler.check_idle(loop.time() + 1.9)
        await asyncio.sleep(0)
        assert handler._reader_task is not None
        assert not handler._reader_task.done()
        handler.check_idle(loop.time() + 2.1)
        await asyncio.wait_for(handler._reader_stopped.wait(), 5)
        assert handler.ended
        assert handler.end_packet is None  # not a DISCONNECT: the will is due

    asyncio.run(main())
