"""``fleet-sim run --rotate``: the fleet renews itself through the device agent.

Each fleet device runs :class:`device_sim.agent.Renewer` beside its MQTT session
(:class:`Rotator`, in the worker processes): EST ``simplereenroll`` at ``renew_at`` of its
certificate's life, then a switch of its session (persistent, clean session 0) to the new
certificate. A few devices are told not to renew: the broker must close them at their
certificate's not-after. Telemetry carries a sequence number per device and each device is
subscribed to its own topic, so a message lost across a switch shows up as a missing number.

The parent checks the CA afterwards (:func:`superseded_revoked`): every certificate a
renewal replaced must be revoked with reason ``superseded`` once ``renew_grace`` is over.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from device_sim.agent import ESTRenewal, FileStore, Renewer, Schedule, Stats, read_validity
from device_sim.device import Device
from device_sim.transport import ClientTLS
from provisioning.authority import Authority

KICK_EARLY_S = 1.0  # a close this long before not-after still counts as the expiry kick
KICK_LATE_S = 10.0  # ... and this long after (the hub sweeps about twice a second)
STOP_TIMEOUT_S = 35.0  # an attempt under way when the run stops: EST's own timeout, plus


@dataclass(frozen=True)
class RotationPlan:
    """What a worker needs to rotate its devices (pickled to the worker processes)."""

    est_url: str
    trust: Path  # ca-chain.pem: the EST service's certificate and the issuing CAs
    schedule: Schedule
    no_renew: frozenset[str]
    rounds: int  # renewals each renewing device must complete before the run may end


@dataclass(frozen=True)
class RotateSettings:
    """``--rotate`` and its options, as the parent of a run uses them."""

    est_url: str
    validity: dt.timedelta
    renew_grace: dt.timedelta
    renew_at: float = 0.67
    jitter: float = 0.1
    no_renew: int = 2
    rounds: int = 2
    seed: str = "0"

    def plan(self, trust: Path, no_renew: Iterable[str]) -> RotationPlan:
        return RotationPlan(self.est_url, trust, Schedule(self.renew_at, self.jitter,
                                                          self.seed),
                            frozenset(no_renew), self.rounds)

    def deadline_s(self, duration: float) -> float:
        """How long the hold may last at most: the rounds of renewals (each certificate
        lives the validity plus at most a tenth back-dated), one more lifetime for the last
        expiry, and half a minute."""
        life = self.validity.total_seconds() * 1.1
        return max(duration, (self.rounds + 1) * life + 30.0)


@dataclass
class DeviceRotation:
    """One device's renewal state in a worker."""

    not_after: float  # of the certificate it connected with (epoch seconds)
    renewer: Renewer | None
    task: asyncio.Task[None] | None = None
    seqs: set[int] = field(default_factory=set)


def sequence(payload: bytes) -> int | None:
    """The ``seq`` of a telemetry payload ``{"seq":N,...}``; None for anything else."""
    head, _, rest = payload.partition(b'"seq":')
    if head != b"{":
        return None
    digits = rest.split(b",", 1)[0].rstrip(b"}")
    return int(digits) if digits.isdigit() else None


class Rotator:
    """The renewal agents of one worker's devices, sharing one HTTP session to the CA."""

    def __init__(self, plan: RotationPlan,
                 context_for: Callable[[str], ClientTLS]) -> None:
        self.plan = plan
        self.context_for = context_for  # a new ClientTLS from the device's files
        self.devices: dict[str, DeviceRotation] = {}
        self.session: aiohttp.ClientSession | None = None
        self.renewal: ESTRenewal | None = None
        self.on_round: Callable[[str], None] = lambda _id: None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=64)
        self.session = aiohttp.ClientSession(connector=connector)
        self.renewal = ESTRenewal(self.plan.est_url, self.plan.trust, self.session)

    def track(self, device_id: str, cert: Path) -> DeviceRotation:
        """Start tracking a device (before it connects): its certificate's not-after."""
        state = DeviceRotation(read_validity(cert).not_after.timestamp(), None)
        self.devices[device_id] = state
        return state

    def received(self, device_id: str, payload: bytes) -> None:
        seq = sequence(payload)
        if seq is not None:
            self.devices[device_id].seqs.add(seq)

    def start(self, device: Device, cert: Path, key: Path) -> None:
        """Run the agent for a connected device, unless it is one told not to renew."""
        state = self.devices[device.client_id]
        if device.client_id in self.plan.no_renew or self.renewal is None:
            return
        async def switch() -> str | None:
            outcome = await device.switch(self.context_for(device.client_id))
            if outcome.accepted:
                state.not_after = read_validity(cert).not_after.timestamp()
                if renewer.stats.renewed + 1 == self.plan.rounds:
                    self.on_round(device.client_id)
            return None if outcome.accepted else outcome.describe()

        renewer = Renewer(device.client_id, self.plan.schedule, self.renewal,
                          FileStore(cert, key), switch)
        state.renewer = renewer
        state.task = asyncio.create_task(renewer.run())

    def forget(self, device_id: str) -> None:
        """The device is gone (or revoked): its agent stops at its next wait."""
        state = self.devices.get(device_id)
        if state is not None and state.renewer is not None:
            state.renewer.stop()

    def stats(self, device_id: str) -> Stats:
        state = self.devices.get(device_id)
        return state.renewer.stats if state and state.renewer else Stats()

    def expiry_kick(self, device_id: str, at: float) -> bool:
        """Whether a close by the broker at *at* (epoch s) is the expiry of a device told not
        to renew: within a second before to ten seconds after its certificate's not-after."""
        state = self.devices.get(device_id)
        return (device_id in self.plan.no_renew and state is not None
                and state.not_after - KICK_EARLY_S <= at <= state.not_after + KICK_LATE_S)

    def lost(self, device_id: str, sent: int) -> int:
        """Sequence numbers 1..sent the device never got back on its subscription."""
        seqs = self.devices[device_id].seqs if device_id in self.devices else set()
        return sent - len(seqs.intersection(range(1, sent + 1)))

    async def close(self) -> None:
        """Stop every agent (an attempt under way is finished first), then the session."""
        tasks = []
        for state in self.devices.values():
            if state.renewer is not None and state.task is not None:
                state.renewer.stop()
                tasks.append(state.task)
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        if self.session is not None:
            await self.session.close()


def superseded_revoked(pki: Path, serials: Iterable[str]) -> int:
    """How many of *serials* the CA's registry shows revoked with reason superseded."""
    with Authority(pki) as authority:
        rows = [authority.registry.certificate(s) for s in serials]
    return sum(1 for r in rows if r is not None and r.status == "revoked"
               and r.reason == "superseded")


def sweep_allowance(grace: dt.timedelta) -> float:
    """Seconds after a renewal by which the CA service has revoked the old certificate: the
    grace, its sweep interval (min(30 s, grace/4), at least 1 s) and a second of rounding."""
    grace_s = grace.total_seconds()
    return grace_s + max(1.0, min(30.0, grace_s / 4)) + 2.0


async def wait_superseded(pki: Path, serials: list[str], deadline: float) -> int:
    """Poll the registry until every serial is revoked (superseded) or *deadline*
    (``time.monotonic()``); returns how many are."""
    while True:
        done = await asyncio.to_thread(superseded_revoked, pki, serials)
        if done >= len(serials) or time.monotonic() >= deadline:
            return done
        await asyncio.sleep(0.5)
