"""Handshake squatters: TCP connections that send one byte of a TLS record and go silent.

They are opened just before the fleet's ramp and stay open through it. A broker that gives
a connection a handshake slot (or a place in its per-address budget) before its ClientHello
is complete lets a few hundred of them hold the fleet's connects until its handshake timeout;
DESIGN section 5: only a complete ClientHello takes a slot, a silent or partial client costs
a descriptor and a timer. So the fleet must connect as it does without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sim.scenarios import ScenarioResult
from device_sim.worker import on_loopback

SQUATTERS = 200
PER_SOURCE = 8  # squatters per source address: within a per-address budget of 16
FD_RESERVE = 256  # descriptors the parent keeps for itself (pipes, the attack devices)
OPEN_TIMEOUT = 5.0  # for all of them to connect
FIRST_BYTE = b"\x16"  # a TLS handshake record's content type, and nothing after it
# A device that waited for a squatter's timeout (fleet-hub drops a silent client after its
# 10 s handshake timeout) takes seconds; the fleet's own p99 on loopback is well under 2 s.
CONNECT_BOUND_S = 5.0


@dataclass(frozen=True)
class SquatFacts:
    """What the squatters did, for the report (the fleet's side comes from its records)."""

    asked: int
    opened: int
    sources: int
    open_at_ramp_end: int
    failure: str | None  # why one could not connect (the first such reason)


def fd_budget(asked: int) -> int:
    """*asked*, bounded by the descriptors this process may still open (RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        used = 64
    if soft == resource.RLIM_INFINITY:
        return asked
    return max(0, min(asked, soft - used - FD_RESERVE))


def source_addresses(host: str, count: int) -> list[str | None]:
    """127.0.0.2 and up, PER_SOURCE squatters each, for a broker on 127/8 only (elsewhere
    the kernel picks: binding to an address that cannot reach *host* would fail).

    Not the fleet's addresses (127.1/16 and up) nor the attack devices' (127.0.0.1): a
    broker may budget connections per address (max_pending_tls), and then squatters on the
    fleet's address would be refusing the fleet by that budget, which is a different test.
    """
    if not on_loopback(host):
        return [None]
    return [f"127.0.0.{i}" for i in range(2, 2 + min(253, -(-count // PER_SOURCE)))]


class Squatters:
    """Up to *count* one-byte connections to the broker on the running loop."""

    def __init__(self, host: str, port: int, count: int = SQUATTERS) -> None:
        self.host, self.port = host, port
        self.asked = count
        self.sources = source_addresses(host, count)
        self._loop = asyncio.get_running_loop()
        self._open: dict[int, socket.socket] = {}
        self._opened = 0
        self._failure: str | None = None

    @property
    def opened(self) -> int:
        return self._opened

    async def open(self) -> None:
        """Connect them all (at most OPEN_TIMEOUT s), each sending FIRST_BYTE only."""
        count = fd_budget(self.asked)
        if count < self.asked:
            self._failure = f"only {count} descriptors to spare (RLIMIT_NOFILE)"
        tasks = [asyncio.ensure_future(self._one(self.sources[i % len(self.sources)]))
                 for i in range(count)]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=OPEN_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, source: str | None) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source is not None:
                sock.bind((source, 0))
            await self._loop.sock_connect(sock, (self.host, self.port))
            sock.send(FIRST_BYTE)
        except OSError as exc:
            sock.close()
            self._failure = self._failure or (exc.strerror or str(exc))
            return
        except BaseException:
            sock.close()
            raise
        fd = sock.fileno()
        self._open[fd] = sock
        self._opened += 1
        self._loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> None:
        """The broker wrote or closed: an alert is read and ignored, a close counted."""
        sock = self._open.get(fd)
        if sock is None:
            return
        try:
            if sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        sock = self._open.pop(fd)
        self._loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self) -> SquatFacts:
        """Close every squatter still open; what they did."""
        still = len(self._open)
        for fd in list(self._open):
            self._drop(fd)
        return SquatFacts(self.asked, self._opened, len(self.sources), still, self._failure)


def scenario(facts: SquatFacts, devices: int, connect: dict[str, Any]) -> ScenarioResult:
    """``handshake-squatters``: the fleet connected as usual while they were open."""
    bound_ms = CONNECT_BOUND_S * 1000
    expected = (f"all {devices} devices connect, p99 under {CONNECT_BOUND_S:g} s, while "
                f"{facts.asked} one-byte TLS squatters are open")
    p99 = connect.get("p99_ms")
    observed = (f"{facts.opened} squatters from {facts.sources} source address"
                f"{'es' if facts.sources > 1 else ''}, {facts.open_at_ramp_end} still open "
                f"when the ramp ended; fleet: {connect['count']} connected, "
                f"{connect['failed']} failed, p99 "
                + ("-" if p99 is None else f"{p99:,.0f} ms"))
    if facts.failure:
        observed += f" ({facts.failure})"
    passed = (facts.opened > 0 and connect["failed"] == 0 and connect["count"] == devices
              and p99 is not None and p99 <= bound_ms)
    return ScenarioResult("handshake-squatters", expected, observed, passed)
