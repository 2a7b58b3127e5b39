"""The hub's lean session pieces behave like the asyncio/transitions objects they replace."""

from __future__ import annotations

import asyncio
import sys

import pytest
from transitions.core import MachineError

from hub.broker.session import HubSession, Outbox, SlimQueue, outbox_of
from hub.wire import next_packet, parse_publish


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


class _Wire:
    """What an outbox wrote, cut back into packets."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> list[tuple[int, int, bytes]]:
        """(first byte, packet id, payload) per packet written since the last take."""
        out, pos = [], 0
        while (frame := next_packet(self.data, pos)) is not None:
            first, start, end = frame
            if first >> 4 == 3:
                message = parse_publish(first, self.data, start, end)
                out.append((first, message.packet_id or 0, message.payload))
            else:
                out.append((first, int.from_bytes(self.data[start:end], "big"), b""))
            pos = end
        del self.data[:pos]
        return out


def test_an_outbox_keeps_a_bounded_window_and_a_bounded_queue() -> None:
    """Two in flight, three queued, the next dropped and counted; an ack moves the queue."""
    wire = _Wire()
    box = Outbox(window=2, limit=3)
    box.attach(wire)
    assert [box.offer(b"t", b"%d" % n, 1) for n in range(6)] == [True] * 5 + [False]
    assert (box.in_flight, box.queued, box.dropped) == (2, 3, 1)
    assert wire.take() == [(0x32, 1, b"0"), (0x32, 2, b"1")]
    assert box.puback(1)
    assert not box.puback(1)  # not in flight any more
    assert wire.take() == [(0x32, 3, b"2")]


def test_a_reattached_outbox_resends_with_dup_then_moves_on() -> None:
    """[MQTT-4.4.0-1]: PUBLISH again with DUP and its id, PUBREL for a QoS 2 already
    received; offline messages wait in order behind them."""
    first = _Wire()
    box = Outbox(window=2)
    box.attach(first)
    box.offer(b"t", b"a", 1)
    box.offer(b"t", b"b", 2, retain=True)
    assert box.pubrec(2)
    assert first.take()[-1] == (0x62, 2, b"")  # PUBREL
    box.detach(first)
    box.offer(b"t", b"c", 1)  # away: queued
    assert first.take() == []
    again = _Wire()
    box.attach(again)
    assert again.take() == [(0x3A, 1, b"a"), (0x62, 2, b"")]
    assert box.pubcomp(2)
    assert again.take() == [(0x32, 3, b"c")]
    assert not box.pubcomp(1)  # QoS 1 is not completed by PUBCOMP


def test_packet_ids_skip_those_in_flight_and_wrap() -> None:
    wire = _Wire()
    box = Outbox(window=3)
    box.attach(wire)
    box._next_id = 65534
    for n in range(3):
        box.offer(b"t", b"%d" % n, 1)
    assert [pid for _, pid, _ in wire.take()] == [65535, 1, 2]
    assert box.puback(1)
    box._next_id = 0
    box.offer(b"t", b"x", 1)
    assert [pid for _, pid, _ in wire.take()] == [1]
    assert box.puback(65535)
    box.offer(b"t", b"y", 1)
    assert [pid for _, pid, _ in wire.take()] == [3]


def test_outbox_of_makes_one_lazily_attached_to_the_live_connection() -> None:
    session = HubSession()
    assert session.outbox is None
    wire = _Wire()
    box = outbox_of(session, wire)
    assert outbox_of(session) is box
    box.offer(b"t", b"now", 1)
    assert wire.take() == [(0x32, 1, b"now")]


def test_a_session_dict_stays_key_shared() -> None:
    """Memory per device: the hub's own session fields are slots, so the instance dict keeps
    CPython's shared keys (at most 30) instead of becoming a full table per session."""
    session = HubSession()
    session.client_id, session.parent, session.ssl_object = "d1", 0, None
    session.connection = None
    assert len(vars(session)) <= 30
    assert sys.getsizeof(vars(session)) < 512
