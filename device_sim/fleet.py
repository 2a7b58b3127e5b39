"""The parent of a run: enroll, spread the fleet over worker processes, attack, revoke, report.

Timeline: enrollment (cached in the fleet folder) → workers start and report ready → with
attacks, one-byte handshake squatters are opened here → every worker ramps its share of the
fleet at ``rate / processes`` connects per second, interleaved (the squatters are closed when
it is over) → the hold: ``duration`` seconds with every device connected and publishing;
meanwhile the attack and abuse scenarios run here (their own devices) and the revocation:
``revoke`` of the connected devices are revoked through the provisioning library, each
disconnect is timed from its own revocation, then each revoked device reconnects once →
stop: telemetry still in flight is awaited, every device sends DISCONNECT → the workers send
their records → the report.

With ``--rotate`` (:mod:`device_sim.rotation`) every device also runs the device agent during
the hold, which lasts until the renewal rounds are done and the devices told not to renew
have expired; after the stop the CA's registry is polled for the superseded revocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from device_sim.abuse import AbuseKit, AbuseRunner, Limits
from device_sim.brokers import Endpoint, apportion, check_broker, label, scenario_name
from device_sim.defender import HubWatch, defend, watch_at
from device_sim.display import Display
from device_sim.enroll import Enroller, Enrollment, ESTEnroller, FleetDir, LibraryEnroller
from device_sim.errors import UsageError
from device_sim.report import RotationFacts, RunFacts, build
from device_sim.rotation import RotateSettings, sweep_allowance, wait_superseded
from device_sim.scenarios import AttackKit, AttackRunner, ScenarioResult, prepare
from device_sim.squatters import SQUATTERS, SquatFacts, Squatters
from device_sim.worker import (
    RECONNECT_TIMEOUT,
    Counters,
    WorkerPlan,
    WorkerResult,
    new_loop,
    on_loopback,
    raise_nofile,
    watch_pipe,
    worker_main,
)
from provisioning.authority import Authority
from provisioning.duration import format_duration

Observer = Callable[[str], None]  # told "enrolled", "ramp-start", "ramp-end", "stop", "done"
DEVICES_PER_PROCESS = 1000
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunSettings:
    pki: Path
    host: str
    port: int
    devices: int
    rate: float = 200.0
    duration: float = 10.0
    publish_interval: float = 5.0
    revoke: float = 0.0
    attacks: bool = False
    processes: int | None = None  # None: one per 1,000 devices, at most one per CPU
    fleet_dir: Path | None = None
    enroll_url: str | None = None
    enroll_token: tuple[str, str] | None = None
    connect_timeout: float = 30.0
    revocation_timeout: float = 10.0
    check_hostname: bool = True
    limits: Limits = field(default_factory=Limits)  # the broker's, when known (quickstart)
    squatters: int = SQUATTERS  # one-byte TLS connections during the ramp (with attacks)
    # Several brokers (host and port are then the first): devices dealt out round-robin.
    brokers: tuple[Endpoint, ...] = ()
    rotate: RotateSettings | None = None  # --rotate: the fleet renews itself (rotation.py)
    # Where each broker's audit-check findings are read (defender.py), paired with endpoints.
    hub_watch: tuple[HubWatch, ...] = ()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every broker of the run, in order (one unless *brokers* names several)."""
        return self.brokers or ((self.host, self.port),)

    @property
    def broker(self) -> str:
        """The report's ``broker``: HOST:PORT, or the brokers' comma-separated list."""
        return ",".join(label(e) for e in self.endpoints)

    def worker_count(self) -> int:
        if self.processes is not None:
            return max(1, min(self.processes, self.devices))
        return max(1, min(os.cpu_count() or 1, math.ceil(self.devices / DEVICES_PER_PROCESS)))


def enroller_for(settings: RunSettings) -> Enroller:
    if settings.enroll_url is None:
        return LibraryEnroller(settings.pki)
    if settings.enroll_token is None:
        raise UsageError("--enroll needs an enrollment token", "--enroll")
    return ESTEnroller(settings.enroll_url, settings.enroll_token,
                       settings.pki / "ca-chain.pem",
                       (settings.pki / "issuing-ca.pem").read_bytes())


def run_fleet(settings: RunSettings, display: Display | None = None,
              observer: Observer | None = None) -> dict[str, Any]:
    """One whole run; returns the report (see :func:`device_sim.report.build`)."""
    display = display or Display(quiet=True)
    notify = observer or (lambda _phase: None)
    raise_nofile()
    started = time.monotonic()
    for host, port in settings.endpoints:
        check_broker(host, port)
    fleet_dir = settings.fleet_dir or settings.pki / "sim-fleet"
    display.phase(f"enrolling {settings.devices} devices (each its own P-256 key and CSR) "
                  f"into {fleet_dir}")
    enrollment = FleetDir(fleet_dir).prepare(settings.pki, settings.devices,
                                             enroller_for(settings), display.enroll)
    display.phase(f"{enrollment.enrolled} certificates issued ({enrollment.method}), "
                  f"{enrollment.cached} reused from the fleet folder, "
                  f"{enrollment.retired} retired, in {enrollment.seconds:.1f} s")
    kit = prepare(settings.pki, fleet_dir / "attack") if settings.attacks else None
    notify("enrolled")

    async def main() -> RunFacts:
        return await _Parent(settings, enrollment, kit, display, notify).run()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        facts = runner.run(main())
    facts.wall_s = time.monotonic() - started
    facts.enrollment = {"method": enrollment.method, "enrolled": enrollment.enrolled,
                        "cached": enrollment.cached, "retired": enrollment.retired,
                        "seconds": round(enrollment.seconds, 3), "fleet_dir": str(fleet_dir)}
    report = build(facts)
    notify("done")
    return report


@dataclass
class _Link:
    index: int
    conn: Connection
    process: BaseProcess
    ready: bool = False
    ramp_done: bool = False
    counters: Counters = field(default_factory=Counters)
    picked: list[str] | None = None
    result: WorkerResult | None = None


class _Parent:
    def __init__(self, settings: RunSettings, enrollment: Enrollment, kit: AttackKit | None,
                 display: Display, notify: Observer) -> None:
        self.settings = settings
        self.enrollment = enrollment
        self.kit = kit
        self.display = display
        self.notify = notify
        self.ca_pem = (settings.pki / "ca-chain.pem").read_text()
        self.links: list[_Link] = []
        self.changed = asyncio.Event()
        self.revoked_at: dict[str, float] = {}
        self.scenarios: list[ScenarioResult] = []
        self.squats: dict[str, SquatFacts] = {}  # broker -> what its squatters did
        self.errors: list[str] = []
        rotate = settings.rotate
        # The last devices of the fleet are told not to renew (dealt over the workers).
        self.no_renew = ([f.device_id for f in enrollment.devices[-rotate.no_renew:]]
                         if rotate is not None and rotate.no_renew > 0 else [])
        self.rotation = (rotate.plan(settings.pki / "ca-chain.pem", self.no_renew)
                         if rotate is not None else None)

    # -- workers ---------------------------------------------------------------------------

    def _start_workers(self) -> None:
        s = self.settings
        count = s.worker_count()
        context = multiprocessing.get_context("spawn")
        # As a real fleet: many source addresses (for each broker on 127/8).
        spread = any(on_loopback(host) for host, _ in s.endpoints)
        brokers = s.endpoints if len(s.endpoints) > 1 else ()
        for index in range(count):
            share = [(i, files) for i, files in enumerate(self.enrollment.devices)
                     if i % count == index]
            plan = WorkerPlan(index, share, s.host, s.port, self.ca_pem, s.rate,
                              s.publish_interval, s.connect_timeout, s.check_hostname,
                              spread_sources=spread, brokers=brokers,
                              rotation=self.rotation)
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(plan, theirs),
                                      name=f"fleet-sim-worker-{index}", daemon=True)
            process.start()
            theirs.close()
            link = _Link(index, ours, process)
            self.links.append(link)
            watch_pipe(asyncio.get_running_loop(), ours, functools.partial(self._receive, link))

    def _receive(self, link: _Link) -> None:
        try:
            while link.conn.poll():
                self._handle(link, link.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(link.conn.fileno())
            if link.result is None:
                link.result = WorkerResult(link.index, [], 0.0, 0.0, 0.0, 0.0,
                                           [f"worker {link.index} exited early "
                                            f"(code {link.process.exitcode})"])
        self.changed.set()

    def _handle(self, link: _Link, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            link.ready = True
        elif kind == "progress":
            link.counters = message[1]
            self.display.fleet(self.total(), self.settings.devices, len(self.revoked_at))
        elif kind == "ramp_done":
            link.ramp_done = True
        elif kind == "picked":
            link.picked = list(message[1])
        elif kind == "result":
            link.result = message[1]

    def total(self) -> Counters:
        out = Counters()
        for link in self.links:
            for f in fields(Counters):
                setattr(out, f.name, getattr(out, f.name) + getattr(link.counters, f.name))
        return out

    async def _until(self, condition: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not condition():
            if all(link.result is not None for link in self.links):
                return condition()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True

    def _send(self, message: tuple[Any, ...]) -> None:
        for link in self.links:
            with contextlib.suppress(OSError):
                link.conn.send(message)

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> RunFacts:
        s = self.settings
        cpu_start = _cpu()
        self._start_workers()
        display = self.display
        squatters: list[tuple[str, Squatters]] = []
        try:
            if not await self._until(lambda: all(k.ready for k in self.links), READY_TIMEOUT):
                why = "; ".join(e for k in self.links if k.result for e in k.result.errors)
                raise UsageError(f"worker processes did not start: {why or 'no answer'}",
                                 "--processes")
            if self.kit is not None and s.squatters > 0:
                for endpoint in s.endpoints:  # each broker has its own handshake capacity
                    squatters.append((label(endpoint), Squatters(*endpoint, s.squatters)))
                    await squatters[-1][1].open()
                display.phase(f"{sum(q.opened for _, q in squatters)} one-byte TLS squatters "
                              "open" + (f" at {len(squatters)} brokers"
                                        if len(squatters) > 1 else ""))
            ramp_start = time.monotonic() + 0.1
            self._send(("go", ramp_start))
            self.notify("ramp-start")
            display.phase(f"connecting {s.devices} devices at {s.rate:g}/s over "
                          f"{len(self.links)} processes to {s.broker}")
            await self._until(lambda: all(k.ramp_done or k.result for k in self.links), None)
            self.squats = {broker: q.close() for broker, q in squatters}
            squatters = []
            self.notify("ramp-end")
            hold_end = time.monotonic() + s.duration
            display.phase(f"{self.total().connected} connected; holding {s.duration:g} s"
                          + (", attacking" if self.kit else "")
                          + (f", revoking {s.revoke:.0%}" if s.revoke > 0 else ""))
            jobs = []
            if self.kit is not None:
                jobs.append(asyncio.create_task(self._attacks(self.kit)))
            if s.revoke > 0:
                jobs.append(asyncio.create_task(self._revocation()))
            if s.rotate is not None:
                await self._rotation_hold(s.rotate, hold_end)
            else:
                await asyncio.sleep(max(0.0, hold_end - time.monotonic()))
            if jobs:
                await asyncio.gather(*jobs)
            self.notify("stop")
            display.phase("disconnecting")
            self._send(("stop",))
            await self._until(lambda: all(k.result is not None for k in self.links), 120)
        finally:
            for _, q in squatters:
                q.close()
            for link in self.links:
                link.process.join(5)
                if link.process.is_alive():
                    link.process.kill()
                    link.process.join()
                asyncio.get_running_loop().remove_reader(link.conn.fileno())
                link.conn.close()
        results = [k.result or WorkerResult(k.index, [], 0.0, 0.0, 0.0, 0.0,
                                            [f"worker {k.index} sent no result"])
                   for k in self.links]
        rotation = await self._superseded(results) if s.rotate is not None else None
        return RunFacts(s.devices, s.broker, results, ramp_start, self.scenarios,
                        self.revoked_at, s.revocation_timeout, s.revoke > 0,
                        parent_cpu_s=_cpu() - cpu_start, errors=self.errors,
                        squats=self.squats, limits=s.limits if self.kit else None,
                        rotation=rotation)

    async def _rotation_hold(self, rotate: RotateSettings, hold_end: float) -> None:
        """With --rotate the hold lasts --duration and until every renewing device has
        renewed --rounds times and every device told not to renew has been closed at its
        not-after; at most :meth:`RotateSettings.deadline_s`."""
        renewing = self.settings.devices - len(self.no_renew)
        self.display.phase(
            f"rotating: {renewing} devices renew at {rotate.renew_at:g} of their "
            f"{format_duration(rotate.validity)} certificates until each has renewed "
            f"{rotate.rounds} times; {len(self.no_renew)} told not to renew")

        def done() -> bool:
            total = self.total()
            return (time.monotonic() >= hold_end and total.rounds_done >= renewing
                    and total.expired_kicked >= len(self.no_renew))

        await self._until(done, rotate.deadline_s(self.settings.duration))

    async def _superseded(self, results: list[WorkerResult]) -> RotationFacts:
        """Every certificate a renewal replaced, revoked (superseded) at the CA once the
        grace is over: polled in the registry until then."""
        rotate = self.settings.rotate
        assert rotate is not None  # noqa: S101
        serials = [serial for w in results for r in w.records for serial in r.superseded]
        if serials:
            self.display.phase(f"waiting for the CA to revoke {len(serials)} superseded "
                               f"certificates (renew_grace "
                               f"{format_duration(rotate.renew_grace)})")
        deadline = time.monotonic() + sweep_allowance(rotate.renew_grace)
        revoked = await wait_superseded(self.settings.pki, serials, deadline) if serials else 0
        return RotationFacts(rotate.rounds, len(self.no_renew), len(serials), revoked,
                             format_duration(rotate.validity), rotate.renew_at,
                             format_duration(rotate.renew_grace))

    async def _attacks(self, kit: AttackKit) -> None:
        """The attack and abuse scenarios at every broker at once (each must refuse)."""
        endpoints = self.settings.endpoints
        several = len(endpoints) > 1
        found = await asyncio.gather(*(self._attacks_at(kit, e) for e in endpoints))
        self.scenarios = [replace(r, name=scenario_name(r.name, label(e), several))
                          for e, results in zip(endpoints, found, strict=True)
                          for r in results]

    async def _attacks_at(self, kit: AttackKit, endpoint: Endpoint) -> list[ScenarioResult]:
        runner = AttackRunner(kit, *endpoint, self.ca_pem,
                              check_hostname=self.settings.check_hostname)
        abuse = AbuseRunner(AbuseKit(*kit.abusers), self.settings.limits,
                            lambda files, inbox: runner.device(files, files.device_id,
                                                               inbox=inbox))
        watch = watch_at(self.settings.hub_watch, self.settings.endpoints, endpoint)
        refused, abused, defended = await asyncio.gather(
            runner.run(), abuse.run(), defend(kit.defender, runner, watch))
        return refused + abused + defended

    def _shares(self, total: int) -> list[int]:
        """Split *total* over the workers in proportion to their live devices."""
        return apportion(total, [k.counters.connected for k in self.links])

    async def _revocation(self) -> None:
        s = self.settings
        connected = self.total().connected
        total = min(connected, max(1, round(s.revoke * connected))) if connected else 0
        for link, share in zip(self.links, self._shares(total), strict=True):
            link.picked = None
            with contextlib.suppress(OSError):
                link.conn.send(("pick", share))
        await self._until(lambda: all(k.picked is not None for k in self.links), 30)
        ids = [d for k in self.links for d in (k.picked or [])]
        if not ids:
            self.errors.append("no connected device to revoke")
            return
        self.display.phase(f"revoking {len(ids)} live devices through the CA")
        times = await asyncio.to_thread(revoke_devices, s.pki, ids, self.revoked_at)
        last = max(times.values())

        def all_gone() -> bool:
            return self.total().revoked_gone >= len(ids)

        await self._until(all_gone, last + s.revocation_timeout - time.monotonic())
        self._send(("deadline",))
        await self._until(lambda: self.total().reconnects >= len(ids), RECONNECT_TIMEOUT + 5)


def revoke_devices(pki: Path, device_ids: list[str], into: dict[str, float],
                   ) -> dict[str, float]:
    """Revoke each device as an operator would, back to back with one opened CA.

    Each revocation is its own registry transaction and CRL (``Authority.revoke``), stamped
    with ``time.monotonic()`` right after its commit: that is when the broker may learn it.
    """
    with Authority(pki, actor="fleet-sim") as authority:
        _ = authority.ca  # load the key before the first stamp
        for device_id in device_ids:
            authority.revoke(device_id, None, "keyCompromise")
            into[device_id] = time.monotonic()
    return into


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
