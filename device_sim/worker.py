"""A worker process: its share of the fleet on one event loop, reporting to the parent.

Messages on the pipe (tuples). Parent to worker: ``("go", t0)`` start the ramp at
``time.monotonic() == t0`` (CLOCK_MONOTONIC is one clock for every process on the host);
``("pick", n)`` choose n of its connected devices, evenly spread, for revocation and answer
``("picked", ids)``; ``("deadline",)`` the revocation window is over: try the revoked devices
that are still connected a second time; ``("stop",)`` wind down. Worker to parent:
``("ready",)``, ``("progress", Counters)``, ``("ramp_done", cpu_s)``, ``("picked", ids)``,
``("result", WorkerResult)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from device_sim.brokers import apportion, assign, label
from device_sim.device import SUBACK_FAILURE, Device, Outcome
from device_sim.enroll import DeviceFiles
from device_sim.rotation import RotationPlan, Rotator
from device_sim.transport import ClientTLS, Credentials, client_context

PROGRESS_EVERY = 0.25
TICK_EVERY = 1.0  # loop_misc: PINGREQ as soon as keep-alive is due
DRAIN_TIMEOUT = 10.0  # after stop: how long to wait for telemetry echoes still in flight
RECONNECT_TIMEOUT = 10.0
MAX_IN_FLIGHT = 128  # connects under way per worker: a slow broker queues them here
DEVICES_PER_SOURCE = 8  # fleet devices per loopback source address (see source_address)


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    devices: list[tuple[int, DeviceFiles]]  # (ordinal in the whole fleet, files)
    host: str
    port: int
    ca_pem: str
    rate: float  # connects per second for the whole fleet
    publish_interval: float
    connect_timeout: float
    check_hostname: bool = True
    keepalive: int = 60
    spread_sources: bool = False
    # Several brokers: device *ordinal* connects to brokers[ordinal % n] (device_sim.brokers);
    # empty: host and port above, for every device.
    brokers: tuple[tuple[str, int], ...] = ()
    rotation: RotationPlan | None = None  # --rotate: each device renews (device_sim.rotation)

    def endpoint(self, ordinal: int) -> tuple[str, int]:
        """Where fleet device *ordinal* connects."""
        return assign(ordinal, self.brokers) if self.brokers else (self.host, self.port)


@dataclass
class Counters:
    attempted: int = 0
    connected: int = 0  # right now
    failed: int = 0
    sent: int = 0
    received: int = 0
    unexpected: int = 0
    revoked_gone: int = 0
    reconnects: int = 0
    reconnects_refused: int = 0
    peak: int = 0
    rounds_done: int = 0  # --rotate: renewing devices that completed their rounds
    expired_kicked: int = 0  # --rotate: devices told not to renew, closed at not-after


@dataclass
class DeviceRecord:
    """One fleet device's story, sent back to the parent."""

    device_id: str
    outcome: str = "pending"  # Outcome.stage, or 'subscribe'
    detail: str = ""
    tcp_s: float | None = None
    tls_s: float | None = None
    mqtt_s: float | None = None
    connected_at: float | None = None
    disconnected_at: float | None = None
    lost_at: float | None = None  # the broker closed it (not us)
    unexpected: bool = False
    sent: int = 0
    acked: int = 0  # PUBACKs: the broker took the message
    received: int = 0
    revoked: bool = False
    survived: bool = False  # still connected when the revocation window closed
    reconnect: str | None = None
    reconnect_refused: bool | None = None
    broker: str = ""  # HOST:PORT it connects to
    # --rotate (device_sim.rotation): renewals completed, attempts failed, the serials the
    # renewals replaced, sequence numbers never received, told not to renew, closed by the
    # broker at its certificate's not-after.
    renewed: int = 0
    renewed_at: list[float] = field(default_factory=list)
    renew_failed: int = 0
    renew_error: str | None = None
    superseded: list[str] = field(default_factory=list)
    lost: int | None = None
    no_renew: bool = False
    expired_kick: bool = False


@dataclass
class WorkerResult:
    index: int
    records: list[DeviceRecord]
    cpu_total_s: float
    cpu_ramp_s: float
    ramp_start: float
    ramp_end: float
    errors: list[str] = field(default_factory=list)
    boot_s: float = 0.0  # CPU for the devices' TLS contexts, before the ramp


def on_loopback(host: str) -> bool:
    """Whether *host* is an IPv4 loopback address, so any of 127/8 can be our source."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address in ipaddress.ip_network("127.0.0.0/8")


def source_address(ordinal: int) -> str:
    """127.1.b.c and up for fleet device *ordinal*: one source address per 8 devices.

    A real fleet connects from many addresses; a broker that budgets connections per source
    address (fleet-hub's max_pending_tls: 16 not yet past the TLS handshake) would refuse a
    fleet played from one, and Linux gives each (source, destination) pair only ~28,000
    ephemeral ports. 127.0.0.x is left to the parent's attack devices and squatters.
    """
    block = ordinal // DEVICES_PER_SOURCE
    net, host = divmod(block, 254)
    return f"127.{1 + (net >> 8)}.{net & 255}.{host + 1}"


def watch_pipe(loop: asyncio.AbstractEventLoop, conn: Connection,
               callback: Callable[[], None]) -> None:
    """Call *callback* when *conn* is readable, keeping the pipe blocking.

    libuv (uvloop) makes a watched descriptor non-blocking; a multiprocessing Connection
    then fails with EAGAIN in the middle of a message larger than the pipe buffer (a
    worker's records), so blocking mode is restored: readiness still comes from the loop.
    """
    loop.add_reader(conn.fileno(), callback)
    os.set_blocking(conn.fileno(), True)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Worker:
    def __init__(self, plan: WorkerPlan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.counters = Counters()
        self.records: dict[str, DeviceRecord] = {}
        self.live: dict[str, Device] = {}
        self.contexts: dict[str, ClientTLS] = {}
        self.booted: dict[str, Device] = {}  # made at boot, not yet connecting
        self.ordinals = {files.device_id: ordinal for ordinal, files in plan.devices}
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.go: asyncio.Future[float] = self.loop.create_future()
        self.stop = asyncio.Event()
        self.revoking: set[str] = set()
        self.reconnects: list[asyncio.Task[None]] = []
        self.errors: list[str] = []
        self.ramp_end = 0.0
        self.files = {files.device_id: files for _, files in plan.devices}
        self.rotator = (Rotator(plan.rotation, self.new_context) if plan.rotation is not None
                        else None)
        if self.rotator is not None:
            self.rotator.on_round = self.round_done

    def new_context(self, device_id: str) -> ClientTLS:
        """The device's TLS context from its files (again, after a renewal replaced them)."""
        files = self.files[device_id]
        context = client_context(self.plan.ca_pem, Credentials(files.cert, files.key),
                                 check_hostname=self.plan.check_hostname)
        self.contexts[device_id] = context
        return context

    def round_done(self, _device_id: str) -> None:
        self.counters.rounds_done += 1

    def on_message(self) -> None:
        try:
            while self.conn.poll():
                self.handle(self.conn.recv())
        except (EOFError, OSError):  # the parent is gone: wind down
            self.loop.remove_reader(self.conn.fileno())
            self.stop.set()

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "go" and not self.go.done():
            self.go.set_result(float(message[1]))
        elif kind == "pick":
            self.conn.send(("picked", self.pick(int(message[1]))))
        elif kind == "deadline":
            for device_id in sorted(self.revoking):
                record = self.records[device_id]
                if record.reconnect is None and device_id in self.live:
                    # Still connected: does the broker let the revoked certificate in
                    # again? (A broker may then close the old session: not a kick.)
                    record.survived = True
                    self.try_again(device_id)
        elif kind == "stop":
            self.stop.set()

    def pick(self, want: int) -> list[str]:
        """*want* connected devices: each broker's share in proportion to its connected
        devices, evenly spread over its devices in fleet order."""
        groups: dict[str, list[str]] = {}
        for device_id in sorted((d for d, dev in self.live.items() if dev.connected),
                                key=lambda d: self.ordinals[d]):
            groups.setdefault(self.records[device_id].broker, []).append(device_id)
        chosen: list[str] = []
        for ids, share in zip(groups.values(), apportion(want, [len(g) for g in
                                                                groups.values()]),
                              strict=True):
            chosen += [ids[int(i * len(ids) / share)] for i in range(share)]
        for device_id in chosen:
            if self.rotator is not None:
                self.rotator.forget(device_id)
            self.revoking.add(device_id)
            self.records[device_id].revoked = True
        return chosen

    async def run(self) -> WorkerResult:
        watch_pipe(self.loop, self.conn, self.on_message)
        # The devices boot before the ramp, as real ones are powered on before they connect:
        # their TLS contexts (trust bundle, own key and certificate) and paho clients are
        # made now, so that work does not compete with the broker during the ramp.
        boot_start = cpu_seconds()
        if self.rotator is not None:
            await self.rotator.open()
        for ordinal, files in self.plan.devices:
            self.records[files.device_id] = DeviceRecord(
                files.device_id, broker=label(self.plan.endpoint(ordinal)))
            self.new_context(files.device_id)
            if self.rotator is not None:
                self.rotator.track(files.device_id, files.cert)
                self.records[files.device_id].no_renew = (
                    files.device_id in self.rotator.plan.no_renew)
            self.booted[files.device_id] = self.device(files.device_id, ordinal)
            await asyncio.sleep(0)  # stay responsive to the parent
        boot_s = cpu_seconds() - boot_start
        self.conn.send(("ready",))
        t0 = await self.go
        cpu_start = cpu_seconds()
        reporter = asyncio.create_task(self.report_progress())
        ticker = asyncio.create_task(self.tick())
        lives = []
        for ordinal, files in self.plan.devices:
            delay = t0 + ordinal / self.plan.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop.is_set():
                break
            lives.append(asyncio.create_task(self.life(ordinal, files.device_id)))
        ramp: asyncio.Future[list[Any]] = asyncio.gather(*lives, return_exceptions=True)
        stopped: asyncio.Future[bool] = asyncio.ensure_future(self.stop.wait())
        either: list[asyncio.Future[Any]] = [ramp, stopped]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        self.ramp_end = time.monotonic()
        cpu_ramp = cpu_seconds() - cpu_start
        self.send_progress()
        self.conn.send(("ramp_done", cpu_ramp))
        await self.stop.wait()
        for failure in await ramp:
            if isinstance(failure, BaseException):
                self.note(f"device task failed: {failure!r}")
        await self.teardown()
        reporter.cancel()
        ticker.cancel()
        self.send_progress()
        return WorkerResult(self.plan.index, list(self.records.values()),
                            cpu_seconds() - cpu_start, cpu_ramp, t0, self.ramp_end,
                            self.errors, boot_s)

    def device(self, device_id: str, ordinal: int) -> Device:
        plan = self.plan
        host, port = plan.endpoint(ordinal)
        source = source_address(ordinal) if plan.spread_sources and on_loopback(host) else None
        rotator = self.rotator
        if rotator is None:
            return Device(device_id, self.contexts[device_id], host, port,
                          keepalive=plan.keepalive, source=source)
        # Rotating: a persistent session, so nothing is lost across a certificate switch,
        # and every telemetry sequence number that comes back is noted.
        return Device(device_id, self.contexts[device_id], host, port,
                      keepalive=plan.keepalive, source=source, clean_session=False,
                      on_message=lambda _topic, payload: rotator.received(device_id, payload))

    async def life(self, ordinal: int, device_id: str) -> None:
        """Connect, subscribe; publishing is driven by :meth:`publisher` until stop."""
        record = self.records[device_id]
        device = self.booted.pop(device_id, None) or self.device(device_id, ordinal)
        async with self.in_flight:
            try:
                outcome = await device.connect(self.plan.connect_timeout)
            except Exception as exc:  # noqa: BLE001  (a simulator bug: one device, reported)
                outcome = Outcome("error", f"simulator error: {exc!r}")
                self.note(f"{device_id}: connect raised {exc!r}")
            self.counters.attempted += 1
            return await self.settle(device, record, outcome)

    def note(self, error: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(error)

    async def settle(self, device: Device, record: DeviceRecord, outcome: Outcome) -> None:
        device_id = device.client_id
        record.outcome, record.detail = outcome.stage, outcome.describe()
        record.tcp_s, record.tls_s, record.mqtt_s = outcome.tcp_s, outcome.tls_s, outcome.mqtt_s
        if not outcome.accepted:
            self.counters.failed += 1
            return
        codes = await device.subscribe([f"devices/{device_id}/cmd",
                                        f"devices/{device_id}/telemetry"])
        if codes is None or SUBACK_FAILURE in codes:
            record.outcome = "subscribe"
            record.detail = ("no SUBACK" if codes is None else
                             f"SUBACK {', '.join(hex(c) for c in codes)}")
            self.counters.failed += 1
            await device.disconnect()
            return
        record.connected_at = device.connected_at
        self.live[device_id] = device
        device.when_gone(self.gone)
        self.counters.connected += 1
        self.counters.peak = max(self.counters.peak, self.counters.connected)
        asyncio.create_task(self.publisher(device))  # noqa: RUF006  (ends with the device)
        if self.rotator is not None:
            files = self.files[device_id]
            self.rotator.start(device, files.cert, files.key)

    async def publisher(self, device: Device) -> None:
        interval = self.plan.publish_interval
        topic = f"devices/{device.client_id}/telemetry"
        # Spread the fleet's publishes over the interval instead of in lockstep.
        await asyncio.sleep(random.uniform(0, interval))  # noqa: S311
        while device.connected and not self.stop.is_set():
            # seq counts the messages taken: a gap at the receiver is a lost message.
            device.publish(topic, b'{"seq":%d,"t":%.3f}' % (device.sent + 1, time.time()))
            await asyncio.sleep(interval)

    def gone(self, device: Device) -> None:
        self.counters.connected -= 1
        record = self.records[device.client_id]
        record.disconnected_at = device.disconnected_at
        if device.closing or record.survived:
            return
        record.lost_at = device.disconnected_at
        if self.rotator is not None:
            self.rotator.forget(device.client_id)
        if self.rotator is not None and self.rotator.expiry_kick(device.client_id, time.time()):
            record.expired_kick = True
            self.counters.expired_kicked += 1
            # As its firmware would, it tries again: the expired certificate must be refused.
            record.reconnect = "pending"
            self.reconnects.append(asyncio.create_task(self.reconnect(device.client_id,
                                                                      revoked=False)))
        elif device.client_id in self.revoking:
            self.counters.revoked_gone += 1
            self.try_again(device.client_id)
        else:
            record.unexpected = True
            self.counters.unexpected += 1

    def try_again(self, device_id: str) -> None:
        """A revoked device reconnects once (as its firmware would): it must be refused."""
        self.records[device_id].reconnect = "pending"
        self.reconnects.append(asyncio.create_task(self.reconnect(device_id)))

    async def reconnect(self, device_id: str, *, revoked: bool = True) -> None:
        """One more connect with the same certificate (revoked, or expired with --rotate)."""
        record = self.records[device_id]
        device = self.device(device_id, self.ordinals[device_id])
        outcome: Outcome = await device.connect(RECONNECT_TIMEOUT)
        record.reconnect = outcome.describe()
        record.reconnect_refused = outcome.refused
        if revoked:  # the revocation's figures
            self.counters.reconnects += 1
            self.counters.reconnects_refused += int(outcome.refused)
        if outcome.accepted:
            await device.disconnect()

    def missing(self, device: Device) -> bool:
        """Whether telemetry of *device* has not all come back yet."""
        if self.rotator is not None:
            return self.rotator.lost(device.client_id, device.sent) > 0
        return device.received < device.sent

    async def teardown(self) -> None:
        """Stop the renewal agents, wait (briefly) for telemetry still in flight, then
        DISCONNECT every device."""
        if self.rotator is not None:
            await self.rotator.close()
        live = [d for d in self.live.values() if d.connected]
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and any(
                self.missing(d) for d in live if d.connected):
            await asyncio.sleep(0.05)
        for device in self.live.values():
            record = self.records[device.client_id]
            record.sent, record.received = device.sent, device.received
            record.acked = device.acked
            if self.rotator is not None:
                stats = self.rotator.stats(device.client_id)
                record.renewed, record.renew_failed = stats.renewed, stats.failed
                record.renewed_at = stats.renewed_at
                record.renew_error, record.superseded = stats.last_error, stats.superseded
                record.lost = self.rotator.lost(device.client_id, device.sent)
        results = await asyncio.gather(*(d.disconnect() for d in live if d.connected),
                                       return_exceptions=True)
        for failure in results:
            if isinstance(failure, BaseException):
                self.note(f"disconnect failed: {failure!r}")
        if self.reconnects:
            await asyncio.wait(self.reconnects, timeout=RECONNECT_TIMEOUT + 1)

    def send_progress(self) -> None:
        counters = self.counters
        counters.sent = sum(d.sent for d in self.live.values())
        counters.received = sum(d.received for d in self.live.values())
        with contextlib.suppress(OSError):
            self.conn.send(("progress", counters))

    async def report_progress(self) -> None:
        while True:
            self.send_progress()
            await asyncio.sleep(PROGRESS_EVERY)

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_EVERY)
            for device in list(self.live.values()):
                if device.connected:
                    device.tick()


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the hub uses it too), else asyncio's default loop."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _run_worker(plan: WorkerPlan, conn: Connection) -> WorkerResult:
    return await _Worker(plan, conn).run()


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Entry point of a worker process (multiprocessing target)."""
    raise_nofile()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        try:
            result = runner.run(_run_worker(plan, conn))
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which fails the run)
            import traceback  # noqa: PLC0415

            where = traceback.extract_tb(exc.__traceback__)[-1]
            result = WorkerResult(plan.index, [], cpu_seconds(), 0.0, 0.0, 0.0,
                                  [f"worker {plan.index} crashed: {exc!r} at "
                                   f"{where.filename}:{where.lineno}"])
    with contextlib.suppress(OSError):
        conn.send(("result", result))
    conn.close()
