"""The hub's lean session pieces behave like the asyncio/transitions objects they replace."""

from __future__ import annotations

import asyncio

import pytest
from transitions.core import MachineError

from hub.session import HubSession, SlimQueue


def test_states_follow_amqtts_rules() -> None:
    """connect from new or disconnected, never from connected; disconnect from anywhere."""
    session = HubSession()
    states = session.transitions
    assert states.state == "new"
    states.connect()
    assert states.is_connected()
    assert session.last_connect_time is not None
    with pytest.raises(MachineError):
        states.connect()
    states.disconnect()
    states.disconnect()
    assert states.state == "disconnected"
    assert session.last_disconnect_time is not None
    states.connect()
    assert states.is_connected()


def test_slim_queue_is_fifo_and_wakes_its_consumer() -> None:
    """put wakes a waiting get; items come out in order; empty/qsize/get_nowait agree."""

    async def scenario() -> list[object]:
        queue = SlimQueue()
        assert queue.empty()
        assert queue.qsize() == 0
        with pytest.raises(asyncio.QueueEmpty):
            queue.get_nowait()
        waiting = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        await queue.put("a")
        queue.put_nowait("b")
        first = await asyncio.wait_for(waiting, 1)
        assert queue.qsize() == 1
        return [first, queue.get_nowait()]

    assert asyncio.run(scenario()) == ["a", "b"]


def test_cancelled_get_loses_no_item() -> None:
    """A get cancelled after being woken passes the item on to the next consumer."""

    async def scenario() -> object:
        queue = SlimQueue()
        first = asyncio.ensure_future(queue.get())
        second = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait("only")
        first.cancel()
        return await asyncio.wait_for(second, 1)

    assert asyncio.run(scenario()) == "only"
