"""Connect latency of 500 mutual-TLS devices with and without 1,000 handshake squatters open.

A squatter opens TCP, sends one byte (``\\x16``, the first byte of a TLS handshake record) and
then nothing; when the hub drops it (handshake_timeout) it reconnects at once, as an attacker
would (issue 11 defect 1). The squatters come from many loopback addresses (127.0.0.2 up, 8
per address, under the hub's max_pending_tls of 16, so the per-address cap is not what saves
the devices) plus 8 from the devices' own 127.0.0.1.

One fleet (a PKI, each device its own P-256 key and certificate, made up front and not
timed), one ``fleet-hub serve --config hub.toml`` (every check on, see _brokers.hub_config).
The devices connect ``--concurrency`` at a time from 127.0.0.1 (an asyncio TLS client per
device: TCP connect, handshake, CONNECT, CONNACK; time from the TCP connect to the CONNACK),
then disconnect; first without squatters, then with all squatters open. The hub's descriptors
and RSS are read from /proc before and with the squatters (what one squatter costs). Last,
``--flood`` connections from one more address, which the per-address cap resets.

    .venv/bin/python bench/handshake_squatters.py [--devices 500] [--squatters 1000]

The last line printed is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from _brokers import BrokerProcess, build_fleet, hub_config
from _mqtt_load import (
    CONNACK_ACCEPTED,
    DeviceCreds,
    connect_packet,
    percentile,
    raise_nofile,
    settled_rss_kib,
)

PER_ADDRESS = 8  # squatters per loopback address: under the hub's max_pending_tls (16)
DISCONNECT = b"\xe0\x00"


def _contexts(ca: Path, devices: list[DeviceCreds]) -> list[ssl.SSLContext]:
    """Each device's TLS context, made before anything is timed."""
    out = []
    for creds in devices:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.load_cert_chain(creds.cert, creds.key)
        out.append(context)
    return out


async def _connect(port: int, creds: DeviceCreds, context: ssl.SSLContext,
                   timeout: float) -> tuple[float | None, str | None,
                                            asyncio.StreamWriter | None]:
    """(seconds from TCP connect to CONNACK, error, writer to close later)."""
    started = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost",
                local_addr=("127.0.0.1", 0), ssl_handshake_timeout=timeout)
            writer.write(connect_packet(creds.device_id))
            connack = await reader.readexactly(4)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        if writer is not None:
            writer.transport.abort()
        return None, f"{type(exc).__name__}: {exc}"[:80], None
    if connack[0] != 0x20 or connack[3] != CONNACK_ACCEPTED:
        writer.transport.abort()
        return None, f"CONNACK {connack.hex()}", None
    return time.monotonic() - started, None, writer


async def connect_devices(port: int, devices: list[DeviceCreds],
                          contexts: list[ssl.SSLContext], concurrency: int,
                          timeout: float = 30.0) -> dict[str, Any]:
    """Connect every device (*concurrency* in flight), then disconnect them all."""
    queue = list(range(len(devices)))[::-1]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    writers: list[asyncio.StreamWriter] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            seconds, error, writer = await _connect(port, devices[i], contexts[i], timeout)
            if seconds is None:
                key = (error or "?").split(":")[0]
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(seconds)
                assert writer is not None
                writers.append(writer)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - began
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.write(DISCONNECT)
            writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)
    return {
        "devices": len(devices), "connected": len(latencies),
        "failures": sum(errors.values()), "failure_kinds": errors,
        "wall_s": round(wall, 2),
        "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies) if latencies else None),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


class Squatters:
    """*count* clients that send ``\\x16`` and wait; each reconnects when the hub drops it."""

    def __init__(self, port: int, count: int, own_address: int) -> None:
        self.port = port
        self.sources = ["127.0.0.1"] * own_address + [
            f"127.0.{2 + n // PER_ADDRESS // 250}.{2 + n // PER_ADDRESS % 250}"
            for n in range(count - own_address)]
        self.open = 0
        self.reconnects = 0
        self.failures = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._all_open = asyncio.Event()

    async def start(self, timeout: float = 60.0) -> None:
        self._tasks = [asyncio.create_task(self._squat(source)) for source in self.sources]
        await asyncio.wait_for(self._all_open.wait(), timeout)

    async def _squat(self, source: str) -> None:
        loop = asyncio.get_running_loop()
        first = True
        while True:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((source, 0))
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
                await loop.sock_sendall(sock, b"\x16")
                self.open += 1
                if first:
                    first = False
                    if self.open == len(self.sources):
                        self._all_open.set()
                try:
                    await loop.sock_recv(sock, 1)  # the hub's close (EOF or reset)
                finally:
                    self.open -= 1
                self.reconnects += 1
            except OSError:
                self.failures += 1
                await asyncio.sleep(0.05)
            finally:
                sock.close()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def flood(port: int, count: int, source: str = "127.0.0.254") -> dict[str, Any]:
    """*count* one-byte connections from one address, all kept: how many the hub resets,
    and how fast (connect to reset)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    reset_after: list[float] = []

    async def one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        socks.append(sock)
        started = time.monotonic()
        try:
            sock.bind((source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"\x16")
            async with asyncio.timeout(3):
                await loop.sock_recv(sock, 1)
        except TimeoutError:
            return  # held: one of the address's max_pending_tls
        except OSError:
            pass
        reset_after.append(time.monotonic() - started)

    await asyncio.gather(*(one() for _ in range(count)))
    for sock in socks:
        sock.close()
    return {"connections": count, "reset": len(reset_after), "held": count - len(reset_after),
            "reset_p50_ms": _ms(percentile(reset_after, 50)),
            "reset_p99_ms": _ms(percentile(reset_after, 99))}


def hub_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def run(broker: BrokerProcess, devices: list[DeviceCreds], contexts: list[ssl.SSLContext],
              args: argparse.Namespace) -> dict[str, Any]:
    port = broker.port
    await asyncio.to_thread(settled_rss_kib, broker.pid, at_least=1.0)
    quiet = await connect_devices(port, devices, contexts, args.concurrency)
    report("without squatters", quiet)
    # After the first round: what the squatters add, not what 500 connects left behind.
    rss0 = await asyncio.to_thread(settled_rss_kib, broker.pid, at_least=1.0)
    fds0 = hub_fds(broker.pid)
    squatters = Squatters(port, args.squatters, args.own_address)
    t0 = time.monotonic()
    await squatters.start()
    opened_s = time.monotonic() - t0
    await asyncio.sleep(1.0)  # let the hub accept the last of them before /proc is read
    fds1 = hub_fds(broker.pid)
    rss1 = await asyncio.to_thread(settled_rss_kib, broker.pid, at_least=0.5)
    held = fds1 - fds0
    print(f"\n{args.squatters} squatters open in {opened_s:.1f} s from "
          f"{len(set(squatters.sources))} addresses; hub: +{held} descriptors, "
          f"+{rss1 - rss0} KiB RSS ({(rss1 - rss0) / max(1, held):.1f} KiB per squatter)")
    loud = await connect_devices(port, devices, contexts, args.concurrency)
    report(f"with {args.squatters} squatters open", loud)
    still_open = squatters.open
    flooded = await flood(port, args.flood)
    print(f"\nflood: {flooded['connections']} from one address: {flooded['reset']} reset "
          f"(p50 {flooded['reset_p50_ms']} ms, p99 {flooded['reset_p99_ms']} ms after the "
          f"connect), {flooded['held']} held")
    stats = {"open_during_connects": still_open, "reconnects": squatters.reconnects,
             "failures": squatters.failures, "hub_fds_added": held,
             "hub_rss_added_kib": rss1 - rss0,
             "hub_kib_per_squatter": round((rss1 - rss0) / max(1, held), 2)}
    await squatters.stop()
    return {"without": quiet, "with": loud, "squatters": stats, "flood": flooded}


def report(name: str, f: dict[str, Any]) -> None:
    print(f"\n== {name}: {f['connected']}/{f['devices']} connected, {f['failures']} failures "
          f"{f['failure_kinds'] or ''}")
    print(f"   TCP connect -> CONNACK p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, "
          f"max {f['max_ms']} ms (wall {f['wall_s']} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--squatters", type=int, default=1000)
    parser.add_argument("--own-address", type=int, default=8,
                        help="squatters from the devices' own 127.0.0.1")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="device connects in flight (from 127.0.0.1, with the squatters "
                             "there: keep the sum under max_pending_tls)")
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder parent")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)

    nofile = raise_nofile()  # the hub, started from here, inherits it
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-squatters-", dir=args.dir))
    try:
        t0 = time.monotonic()
        pki, devices = build_fleet(root, args.devices)
        contexts = _contexts(pki / "ca-chain.pem", devices)
        setup = time.monotonic() - t0
        print(f"fleet: {len(devices)} devices enrolled in {setup:.1f} s (not timed); "
              f"RLIMIT_NOFILE {nofile}")
        broker = BrokerProcess.hub(hub_config(root, max_pending_tls=16))  # DESIGN's default
        try:
            figures = uvloop.run(run(broker, devices, contexts, args))
            alive = broker.process.poll() is None
        finally:
            broker.stop()
        tracebacks = sum("Traceback" in line for line in broker.lines)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    quiet, loud = figures["without"], figures["with"]
    ratio = loud["p99_ms"] / quiet["p99_ms"] if quiet["p99_ms"] and loud["p99_ms"] else None
    print(f"\nconnect p99 with/without squatters: {loud['p99_ms']} / {quiet['p99_ms']} ms"
          f" = {ratio:.2f}x" if ratio is not None else "\nconnect p99: no figure")
    print(f"hub survived: {alive}; tracebacks in its log: {tracebacks}")
    total = time.monotonic() - began
    print(f"total runtime {total:.0f} s")
    print(json.dumps({
        "bench": "handshake_squatters", "devices": args.devices, "squatters": args.squatters,
        "own_address_squatters": args.own_address, "concurrency": args.concurrency,
        **figures, "p99_ratio": None if ratio is None else round(ratio, 3),
        "hub_survived": alive, "hub_tracebacks": tracebacks,
        "setup_s": round(setup, 1), "runtime_s": round(total, 1),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
