"""A load generator for the hub benchmarks: many mutual-TLS MQTT 3.1.1 clients on one uvloop loop.

Each device has its own certificate and key; its ``ssl.SSLContext`` is built only when its turn
to connect comes (and kept only as long as its connection lives). CONNECT is hand-encoded
(client id = device id, clean session, keep-alive 60) and CONNACK parsed by a bare
``asyncio.Protocol``: no paho, no threads. Per connect three phases are timed: TCP connect, TLS
handshake, CONNECT -> CONNACK. At most ``concurrency`` connects are in flight. Connections stay
open after CONNACK (a PINGREQ every 30 s keeps them inside the keep-alive) and each one records,
with ``time.monotonic()`` (CLOCK_MONOTONIC: comparable across processes on one host), when the
server closed it.

For the scale benchmark a connect may also SUBSCRIBE (QoS 0) and wait for SUBACK, connected
devices may publish QoS 0 telemetry as fast as their transports take it (whole batches of
packets per TLS write, paused by the transport's flow control), every client parses what it
receives as an MQTT stream (packets may span TLS records) and counts PUBLISH packets (the
publishers can be held to a window of messages sent and not yet received), and all
connections can be dropped at once without DISCONNECT (TCP close, as a rebooting gateway
looks to the broker).

The load runs in its own process (:class:`LoadProcess`, a ``spawn`` child driven over a pipe) so
the broker under test and the load use different cores; :class:`LoadGenerator` is the in-loop
engine. The module also holds the /proc readers the benchmarks use for a broker's CPU and RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device_sim.report import percentile as nearest_rank
from device_sim.worker import raise_nofile

KEEPALIVE_S = 60
PING_EVERY_S = 30.0
CONNACK_ACCEPTED = 0

# -- MQTT 3.1.1 on the wire -------------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = KEEPALIVE_S) -> bytes:
    """CONNECT, protocol level 4, clean session, no will, no username or password."""
    cid = client_id.encode("utf-8")
    body = (b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
            + len(cid).to_bytes(2, "big") + cid)
    return b"\x10" + _remaining_length(len(body)) + body


def subscribe_packet(topic_filter: str, packet_id: int = 1, qos: int = 0) -> bytes:
    """SUBSCRIBE with one filter."""
    encoded = topic_filter.encode("utf-8")
    body = (packet_id.to_bytes(2, "big") + len(encoded).to_bytes(2, "big") + encoded
            + bytes([qos]))
    return b"\x82" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """PUBLISH, QoS 0, no retain."""
    encoded = topic.encode("utf-8")
    body = len(encoded).to_bytes(2, "big") + encoded + payload
    return b"\x30" + _remaining_length(len(body)) + body


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(remaining length, index after it) at *pos*; (-1, -1) while incomplete."""
    length = 0
    shift = 0
    n = len(buf)
    while pos < n:
        byte = buf[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length, pos
        shift += 7
        if shift > 21:
            raise ConnectionError("remaining length longer than four bytes")
    return -1, -1


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
PUBLISH, CONNACK, SUBACK = 3, 2, 9
SUBACK_FAILURE = 0x80
STALL_S = 0.5  # a publisher window with nothing received for this long is presumed lost


# -- one client -------------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """A connection's protocol: CONNACK and SUBACK for the connect, then PUBLISH counting, write
    flow control, and noticing the server closing it."""

    __slots__ = ("_buf", "_owner", "_writable", "connack", "device_id", "dropped", "eof_at",
                 "paused", "received", "suback", "transport", "waiter")

    def __init__(self, owner: LoadGenerator, device_id: str) -> None:
        self._owner = owner
        self.device_id = device_id
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None  # CONNACK, then SUBACK
        self._buf = b""
        self.connack: int | None = None
        self.suback: int | None = None
        self.eof_at: float | None = None
        self.received = 0
        self.paused = False
        self._writable: asyncio.Future[None] | None = None
        self.dropped = False  # we closed it (abort_all): its end is not the server's doing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        i = 0
        publishes = 0
        try:
            while n - i >= 2:
                length = buf[i + 1]
                if length < 0x80:
                    start = i + 2
                else:
                    length, start = _varint(buf, i + 1)
                    if length < 0:
                        break
                end = start + length
                if end > n:
                    break
                kind = buf[i] >> 4
                if kind == PUBLISH:
                    publishes += 1
                else:
                    self._control(kind, buf[start:end])
                i = end
        except ConnectionError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        self._buf = buf[i:] if i < n else b""
        if publishes:
            self.received += publishes
            self._owner.got(publishes)

    def _control(self, kind: int, body: bytes) -> None:
        if self.connack is None:
            if kind != CONNACK or len(body) != 2:
                raise ConnectionError(f"not a CONNACK: packet type {kind}, {body[:4].hex()}")
            self.connack = body[1]
            self._resolve(self.connack)
        elif kind == SUBACK and self.suback is None and len(body) >= 3:
            self.suback = body[2]
            self._resolve(self.suback)
        # PINGRESP, or anything else: not measured

    def _resolve(self, value: int) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(value)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def writable(self) -> None:
        """Return once the transport takes writes again (or the connection is gone)."""
        if self.paused and self.eof_at is None:
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    def eof_received(self) -> bool:
        self._closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        self._fail(exc or ConnectionResetError("closed by the server before CONNACK"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _closed(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.eof_at is None:
            self.eof_at = time.monotonic()
            self._owner.closed(self)


@dataclass(slots=True)
class ConnectResult:
    """One device's connect; times are ``time.monotonic()`` seconds, phases in seconds."""

    device_id: str
    ok: bool
    error: str | None
    started: float
    finished: float
    tcp: float | None = None
    tls: float | None = None
    connack: float | None = None
    suback: float | None = None  # CONNACK -> SUBACK, when the connect subscribed

    @property
    def total(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True, slots=True)
class DeviceCreds:
    device_id: str
    cert: str  # PEM: certificate, then the chain
    key: str  # PEM private key


class LoadGenerator:
    """The in-loop engine: connect many devices, keep them, see who the server throws out."""

    def __init__(self, ca: str, server_hostname: str = "localhost", *,
                 verify_server: bool = True) -> None:
        self.ca = ca
        self.server_hostname = server_hostname
        self.verify_server = verify_server
        self.clients: dict[str, _Client] = {}
        self.eof: dict[str, float] = {}
        self._eof_event = asyncio.Event()
        self._pinger: asyncio.Task[None] | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.received = 0  # PUBLISH packets received by every client so far
        self.sent = 0  # PUBLISH packets handed to the transports by the publishers so far
        self._publishers: list[asyncio.Task[None]] = []
        self._stop_publishing = False
        # The publishers' window: at most max_in_flight PUBLISH sent and not yet received
        # (0: no limit). Without it the sockets' kernel buffers (megabytes each on loopback)
        # queue minutes of work for a slow broker, still being digested in the next phase.
        self.max_in_flight = 0
        self.written_off = 0  # in flight when nothing arrived for STALL_S: presumed lost
        self._room = asyncio.Event()
        self._waiting_room = False

    def _context(self, creds: DeviceCreds, reuse: bool = False) -> ssl.SSLContext:
        """The device's TLS context; with *reuse*, kept for its next connect (as a device keeps
        its loaded key and trust store across reconnects)."""
        if reuse:
            context = self._contexts.get(creds.device_id)
            if context is None:
                context = self._contexts[creds.device_id] = self._new_context(creds)
            return context
        return self._new_context(creds)

    def _new_context(self, creds: DeviceCreds) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.verify_server:
            context.load_verify_locations(cafile=self.ca)
            # The device trusts the fleet's CAs as anchors: the server certificate is checked
            # against the issuing CA without re-verifying the issuing CA under the root (a
            # P-384 verify that would double the load's CPU per connect, not the broker's).
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(creds.cert, creds.key)
        return context

    def closed(self, client: _Client) -> None:
        if client.connack == CONNACK_ACCEPTED and client.eof_at is not None \
                and not client.dropped:
            self.eof[client.device_id] = client.eof_at
            self._eof_event.set()

    async def connect_all(self, host: str, port: int, devices: Sequence[DeviceCreds], *,
                          concurrency: int = 32, timeout: float = 30.0,
                          subscribe: str | None = None,
                          reuse_contexts: bool = False) -> list[ConnectResult]:
        """Connect every device, *concurrency* in flight. With *subscribe* (a filter, ``{id}``
        standing for the device id) each connect also subscribes at QoS 0 and waits for SUBACK;
        ``finished`` stays the CONNACK's time, ``suback`` is CONNACK -> SUBACK."""
        queue = list(reversed(devices))
        results: list[ConnectResult] = []
        if self._pinger is None:  # from the first CONNACK on: the hub enforces keep-alive
            self._pinger = asyncio.create_task(self._ping_loop())

        async def worker() -> None:
            while queue:
                results.append(await self._connect_one(host, port, queue.pop(), timeout,
                                                       subscribe, reuse_contexts))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(devices)))))
        return results

    async def _connect_one(self, host: str, port: int, creds: DeviceCreds, timeout: float,
                           subscribe: str | None = None,
                           reuse_context: bool = False) -> ConnectResult:
        loop = asyncio.get_running_loop()
        try:
            context = self._context(creds, reuse_context)  # lazily: one at a time
        except (OSError, ssl.SSLError) as exc:
            now = time.monotonic()
            return ConnectResult(creds.device_id, False, f"context: {exc}", now, now)
        client = _Client(self, creds.device_id)
        started = time.monotonic()
        result = ConnectResult(creds.device_id, False, None, started, started)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        stage = "tcp"
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
                t_tcp = time.monotonic()
                result.tcp = t_tcp - started
                stage = "tls"
                await loop.create_connection(lambda: client, sock=sock, ssl=context,
                                             server_hostname=self.server_hostname,
                                             ssl_handshake_timeout=timeout)
                t_tls = time.monotonic()
                result.tls = t_tls - t_tcp
                stage = "connack"
                client.waiter = loop.create_future()
                assert client.transport is not None
                client.transport.write(connect_packet(creds.device_id))
                code = await client.waiter
                done = time.monotonic()
                result.connack = done - t_tls
                result.finished = done
                if subscribe is not None and code == CONNACK_ACCEPTED:
                    stage = "suback"
                    client.waiter = loop.create_future()
                    client.transport.write(subscribe_packet(subscribe.format(id=creds.device_id)))
                    granted = await client.waiter
                    result.suback = time.monotonic() - done
                    if granted == SUBACK_FAILURE:
                        client.transport.abort()
                        result.error = "suback: refused (0x80)"
                        return result
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            if stage != "suback":
                result.finished = time.monotonic()
            result.error = f"{stage}: {type(exc).__name__}: {exc}"[:200]
            if client.transport is not None:
                client.transport.abort()
            else:
                sock.close()
            return result
        if code != CONNACK_ACCEPTED:
            result.error = f"connack: return code {code}"
            if client.transport is not None:
                client.transport.abort()
            return result
        result.ok = True
        self.clients[creds.device_id] = client
        if client.eof_at is not None:  # closed between CONNACK and here
            self.closed(client)
        return result

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_EVERY_S)
            for client in list(self.clients.values()):
                if client.eof_at is None and client.transport is not None:
                    client.transport.write(PINGREQ)

    def got(self, publishes: int) -> None:
        """A client received *publishes* PUBLISH packets."""
        self.received += publishes
        if self._waiting_room and (self.sent - self.received - self.written_off
                                   <= self.max_in_flight * 3 // 4):
            self._waiting_room = False
            self._room.set()

    def publish_start(self, device_ids: Sequence[str], payload_size: int = 64,
                      per_write: int = 32, buffer_high: int = 256 * 1024,
                      max_in_flight: int = 0) -> int:
        """Each device publishes QoS 0 to ``devices/{id}/telemetry`` until :meth:`publish_stop`,
        *per_write* packets per TLS write, paused while its transport holds *buffer_high*
        bytes or while *max_in_flight* (0: no limit) sent were not received yet."""
        self._stop_publishing = False
        self.max_in_flight = max_in_flight
        payload = bytes(payload_size)
        started = 0
        for device_id in device_ids:
            client = self.clients.get(device_id)
            if client is None or client.transport is None or client.eof_at is not None:
                continue
            client.transport.set_write_buffer_limits(high=buffer_high)
            chunk = publish_packet(f"devices/{device_id}/telemetry", payload) * per_write
            self._publishers.append(asyncio.create_task(self._publish(client, chunk, per_write)))
            started += 1
        return started

    async def _publish(self, client: _Client, chunk: bytes, per_write: int) -> None:
        transport = client.transport
        assert transport is not None
        writes = 0
        cap = self.max_in_flight
        while not self._stop_publishing and client.eof_at is None:
            if client.paused:
                await client.writable()
                continue
            if cap and self.sent - self.received - self.written_off >= cap:
                await self._wait_room()
                continue
            transport.write(chunk)
            self.sent += per_write
            writes += 1
            if writes & 3 == 0:
                await asyncio.sleep(0)  # let the loop read and the other publishers write

    async def _wait_room(self) -> None:
        before = self.received
        self._room.clear()
        self._waiting_room = True
        try:
            await asyncio.wait_for(self._room.wait(), STALL_S)
        except TimeoutError:
            if self.received == before and self._waiting_room:
                self.written_off = self.sent - self.received
                self._waiting_room = False
                self._room.set()

    async def publish_stop(self) -> None:
        self._room.set()
        self._stop_publishing = True
        await asyncio.gather(*self._publishers, return_exceptions=True)
        self._publishers.clear()

    def counters(self) -> dict[str, float]:
        """Now (monotonic), PUBLISH packets sent, received and written off so far, CPU s."""
        return {"t": time.monotonic(), "sent": self.sent, "received": self.received,
                "written_off": self.written_off, "cpu": time.process_time()}

    def abort_all(self) -> int:
        """Drop every connection at once: no DISCONNECT, no TLS close_notify, a TCP close."""
        clients, self.clients = self.clients, {}
        for client in clients.values():
            client.dropped = True
            if client.transport is not None and not client.transport.is_closing():
                client.transport.abort()
        self.eof.clear()
        return len(clients)

    def open_count(self) -> int:
        return sum(1 for c in self.clients.values() if c.eof_at is None)

    async def wait_eofs(self, device_ids: Iterable[str], timeout: float) -> dict[str, float]:
        """Wait until each of *device_ids* was closed by the server, or *timeout* passes."""
        wanted = set(device_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not wanted <= self.eof.keys() and loop.time() < deadline:
            self._eof_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._eof_event.wait(), deadline - loop.time())
        return {d: self.eof[d] for d in wanted if d in self.eof}

    async def close_all(self) -> None:
        await self.publish_stop()
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        for client in self.clients.values():
            transport = client.transport
            if transport is not None and not transport.is_closing():
                with contextlib.suppress(Exception):
                    transport.write(DISCONNECT)
                transport.close()
        await asyncio.sleep(0.5)
        for client in self.clients.values():
            if client.transport is not None and not client.transport.is_closing():
                client.transport.abort()
        self.clients.clear()
        self.eof.clear()


# -- the load in its own process --------------------------------------------------------------


def _worker(conn: Any, ca: str, server_hostname: str, verify_server: bool) -> None:
    raise_nofile()
    import uvloop  # noqa: PLC0415

    uvloop.run(_serve(conn, ca, server_hostname, verify_server))


async def _serve(conn: Any, ca: str, server_hostname: str, verify_server: bool) -> None:
    loop = asyncio.get_running_loop()
    load = LoadGenerator(ca, server_hostname, verify_server=verify_server)
    while True:
        command, args = await loop.run_in_executor(None, conn.recv)
        try:
            reply = await _handle(load, command, args)
        except Exception as exc:  # noqa: BLE001 - the orchestrator reports it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", reply))
        if command == "exit":
            return


async def _handle(load: LoadGenerator, command: str, args: dict[str, Any]) -> Any:
    if command == "connect":
        cpu0 = time.process_time()
        results = await load.connect_all(args["host"], args["port"], args["devices"],
                                         concurrency=args["concurrency"],
                                         timeout=args["timeout"],
                                         subscribe=args.get("subscribe"),
                                         reuse_contexts=args.get("reuse_contexts", False))
        return {"results": [asdict(r) for r in results],
                "load_cpu_s": time.process_time() - cpu0}
    if command == "status":
        return {"open": load.open_count(), "eof": dict(load.eof)}
    if command == "wait_eofs":
        return await load.wait_eofs(args["ids"], args["wait"])
    if command == "close":
        await load.close_all()
        return None
    if command == "abort_all":
        return load.abort_all()
    if command == "publish_start":
        return load.publish_start(args["ids"], args["payload_size"], args["per_write"],
                                  max_in_flight=args.get("max_in_flight", 0))
    if command == "publish_stop":
        await load.publish_stop()
        return load.counters()
    if command == "counters":
        return load.counters()
    if command == "rss":
        return rss_kib(os.getpid())
    if command == "exit":
        await load.close_all()
        return None
    raise ValueError(f"unknown command {command!r}")


class LoadProcess:
    """The load generator in a ``spawn`` child process, driven synchronously over a pipe."""

    def __init__(self, ca: Path, server_hostname: str = "localhost", *,
                 verify_server: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, str(ca), server_hostname,
                                                       verify_server), daemon=True)
        self._proc.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def _call(self, command: str, answer_within: float = 300.0, **args: Any) -> Any:
        if not self._proc.is_alive():
            raise RuntimeError(f"load process exited ({self._proc.exitcode})")
        self._conn.send((command, args))
        deadline = time.monotonic() + answer_within
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                raise RuntimeError(f"load process exited ({self._proc.exitcode}) on {command!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"load process: no answer to {command!r} in {answer_within} s")
        status, reply = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"load process failed on {command!r}: {reply}")
        return reply

    def connect(self, host: str, port: int, devices: Sequence[DeviceCreds], *,
                concurrency: int = 32, timeout: float = 30.0, subscribe: str | None = None,
                reuse_contexts: bool = False) -> tuple[list[ConnectResult], float]:
        """Connect every device; returns the results and the load process's CPU seconds."""
        reply = self._call("connect", answer_within=max(300.0, 2 * timeout * len(devices)
                                                        / max(1, concurrency)),
                           host=host, port=port, devices=list(devices),
                           concurrency=concurrency, timeout=timeout, subscribe=subscribe,
                           reuse_contexts=reuse_contexts)
        return [ConnectResult(**r) for r in reply["results"]], float(reply["load_cpu_s"])

    def status(self) -> tuple[int, dict[str, float]]:
        """How many connections are open, and when the server closed each closed one."""
        reply = self._call("status")
        return int(reply["open"]), dict(reply["eof"])

    def wait_eofs(self, device_ids: Iterable[str], timeout: float) -> dict[str, float]:
        return dict(self._call("wait_eofs", answer_within=timeout + 30, ids=list(device_ids),
                               wait=timeout))

    def close_all(self) -> None:
        self._call("close")

    def abort_all(self) -> int:
        """Drop every connection without DISCONNECT; how many there were."""
        return int(self._call("abort_all"))

    def publish_start(self, device_ids: Sequence[str], *, payload_size: int = 64,
                      per_write: int = 32, max_in_flight: int = 0) -> int:
        """Start QoS 0 publishers on these connected devices; how many started."""
        return int(self._call("publish_start", ids=list(device_ids),
                              payload_size=payload_size, per_write=per_write,
                              max_in_flight=max_in_flight))

    def publish_stop(self) -> dict[str, float]:
        return dict(self._call("publish_stop"))

    def counters(self) -> dict[str, float]:
        """``t`` (monotonic), ``sent``, ``received`` PUBLISH packets so far, ``cpu`` seconds."""
        return dict(self._call("counters"))

    def rss_kib(self) -> int:
        return int(self._call("rss"))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call("exit", answer_within=15)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- figures ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile, *pct* in 0..100; None for no values (the simulator's)."""
    return nearest_rank(values, pct / 100)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarize(results: Sequence[ConnectResult]) -> dict[str, Any]:
    """connects/s over the wall time of the whole run, latency percentiles in ms, failures."""
    ok = [r for r in results if r.ok]
    failures = [r for r in results if not r.ok]
    wall = (max(r.finished for r in results) - min(r.started for r in results)) if results \
        else 0.0
    out: dict[str, Any] = {
        "devices": len(results), "connected": len(ok), "failures": len(failures),
        "wall_s": round(wall, 3),
        "connects_per_s": round(len(ok) / wall, 1) if wall > 0 else 0.0,
    }
    phases = {"total": [r.total for r in ok], "tcp": [r.tcp or 0.0 for r in ok],
              "tls": [r.tls or 0.0 for r in ok], "connack": [r.connack or 0.0 for r in ok]}
    for name, values in phases.items():
        out[f"{name}_p50_ms"] = _ms(percentile(values, 50))
        out[f"{name}_p99_ms"] = _ms(percentile(values, 99))
    kinds: dict[str, int] = {}
    for r in failures:
        kind = (r.error or "?").split(":")[0] + ":" + (r.error or "?").split(":")[1][:40] \
            if ":" in (r.error or "") else (r.error or "?")
        kinds[kind] = kinds.get(kind, 0) + 1
    out["failure_kinds"] = kinds
    return out


# -- a process seen through /proc -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of *pid* so far (/proc/PID/stat fields 14 and 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kib(pid: int) -> int:
    """VmRSS of *pid* in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def server_connections(port: int) -> int:
    """Accepted IPv4 TCP connections on local *port* the server has not closed yet
    (ESTABLISHED or CLOSE_WAIT in /proc/net/tcp): zero once a broker has seen its clients go."""
    suffix = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:  # noqa: PTH123 - streamed, it can be long
        next(table)
        for line in table:
            fields = line.split(None, 4)
            if fields[1].endswith(suffix) and fields[3] in ("01", "08"):
                count += 1
    return count


def settled_rss_kib(pid: int, *, at_least: float = 1.0, at_most: float = 10.0,
                    tolerance_kib: int = 64) -> int:
    """RSS once it stops moving: two reads 0.5 s apart within *tolerance_kib*."""
    time.sleep(at_least)
    deadline = time.monotonic() + at_most
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) <= tolerance_kib:
            return now
        last = now
    return last
