"""The hub's connection handler: keep-alive from the housekeeping pass, the end recorded."""

from __future__ import annotations

import asyncio
import sys

import pytest
from amqtt.adapters import StreamReaderAdapter

from hub.broker.connect import read_connect
from hub.broker.handler import HubHandler
from hub.broker.session import HubSession
from hub.errors import MalformedPacketError
from hub.wire import PacketTooLargeError


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


def test_a_housekeeping_pass_right_after_start_does_not_expire_the_connection() -> None:
    """The pass may run between creating the reader task and its first step (a storm of
    connects): the deadline must already count from now, not from zero.

    The pass is queued before ``start``; the reader task's first step is queued after it,
    so the pass runs in between, as in a storm."""
    async def main() -> None:
        handler, stream = _handler(keep_alive=60)
        loop = asyncio.get_running_loop()
        passed: list[bool] = []

        def housekeeping() -> None:
            assert handler._reader_task is not None
            assert not handler._reader_ready.is_set()  # the reader has not run yet
            handler.check_idle(loop.time())
            passed.append(True)

        loop.call_soon(housekeeping)
        async with asyncio.timeout(5):  # not wait_for: a task of its own starts after the pass
            await handler.start()
        assert passed == [True]
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


class _Peer(_Writer):
    def get_peer_info(self) -> tuple[str, int]:
        return ("127.0.0.1", 4242)


def _connect_bytes(client_id: bytes) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


def test_connect_is_read_within_its_length_and_the_next_packet_stays_unread() -> None:
    """What follows a CONNECT is the next packet's, not the CONNECT's (defect 17)."""
    async def main() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(_connect_bytes(b"dev-1") + b"\xc0\x00")
        session = await read_connect(StreamReaderAdapter(stream), _Peer(), peer_der=b"DER")
        assert (session.client_id, session.clean_session, session.keep_alive) == ("dev-1", True,
                                                                                   60)
        assert session.ssl_object.getpeercert(binary_form=True) == b"DER"
        assert (session.remote_address, session.remote_port) == ("127.0.0.1", 4242)
        assert await stream.readexactly(2) == b"\xc0\x00"

    asyncio.run(main())


def test_an_oversized_connect_is_refused_on_its_header() -> None:
    """The body is neither read nor waited for: only the fixed header was sent."""
    async def main() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(b"\x10\xff\xff\x03")
        with pytest.raises(PacketTooLargeError, match="CONNECT of 65535 bytes, limit 1024"):
            await asyncio.wait_for(read_connect(
                StreamReaderAdapter(stream), _Peer(), max_bytes=1024), 1)

    asyncio.run(main())


@pytest.mark.parametrize(("data", "why"), [
    (b"\x30\x03\x00\x01a", r"first packet is PUBLISH, not CONNECT \[MQTT-3.1.0-1\]"),
    (b"\x10\x80\x80\x80\x80\x01", r"longer than four bytes"),
])
def test_anything_but_a_connect_first_is_a_violation(data: bytes, why: str) -> None:
    async def main() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        with pytest.raises(MalformedPacketError, match=why):
            await read_connect(StreamReaderAdapter(stream), _Peer())

    asyncio.run(main())


@pytest.mark.parametrize(("packet", "why"), [
    (_connect_bytes(b"dev-1"), r"second CONNECT on a connection \[MQTT-3.1.0-2\]"),
    (b"\x82\x06\x00\x01\x00\x01a\x03", r"\[MQTT-3-8.3-4\]"),
    (b"\xa0\x05\x00\x01\x00\x01a", r"\[MQTT-3.10.1-1\]"),
    (b"\x60\x02\x00\x01", r"\[MQTT-3.6.1-1\]"),
    (b"\x38\x04\x00\x01ax", r"DUP at QoS 0 \[MQTT-3.3.1-2\]"),
    (b"\x20\x02\x00\x00", r"CONNACK, a packet only a server sends"),
])
def test_other_packets_are_checked_to_the_letter(packet: bytes, why: str) -> None:
    """Each violation raises; the reader audits it and closes [MQTT-4.8.0-1]."""
    async def main() -> None:
        handler, _stream = _handler(keep_alive=0)
        with pytest.raises(MalformedPacketError, match=why):
            await handler._other(packet)

    asyncio.run(main())


def test_a_qos2_publish_is_held_until_pubrel_and_delivered_once() -> None:
    """PUBREC for the PUBLISH and for its DUP; one delivery on PUBREL, then PUBCOMP."""
    async def main() -> None:
        handler, _stream = _handler(keep_alive=0)
        writer = handler.writer
        publish = b"\x34\x06\x00\x01a\x00\x09x"
        assert await handler._other(publish)
        assert await handler._other(b"\x3c" + publish[1:])  # DUP
        assert handler.session.delivered_message_queue.empty()
        assert await handler._other(b"\x62\x02\x00\x09")
        assert await handler._other(b"\x62\x02\x00\x09")  # again: PUBCOMP, no delivery
        delivered = handler.session.delivered_message_queue
        assert delivered.qsize() == 1
        assert delivered.get_nowait().data == b"x"
        assert bytes(writer.data) == (b"\x50\x02\x00\x09" * 2) + (b"\x70\x02\x00\x09" * 2)

    asyncio.run(main())


def test_a_handler_dict_stays_key_shared() -> None:
    """Memory per device: the hub's own handler fields are slots, so the instance dict holds
    amqtt's attributes only and keeps CPython's shared keys (at most 30), not a full table."""

    async def make() -> HubHandler:
        handler = HubHandler(None)
        handler.keepalive_timeout = None  # what start() sets
        handler._disconnect_waiter = None
        return handler

    handler = asyncio.run(make())
    assert len(vars(handler)) <= 30
    assert sys.getsizeof(vars(handler)) < 512
