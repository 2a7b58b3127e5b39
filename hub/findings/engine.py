"""The hub's findings: the checks of this package wired to the gatekeeper, broker and audit.

The broker tells :meth:`Findings.took_over` of each take-over and :meth:`Findings.admitted` of
each accepted CONNECT; both are O(1) dict work (the take-over history is a short deque). The
rest runs in one task, once a second (:data:`SWEEP_SECONDS`): the pass over the live sessions
(:mod:`~hub.findings.sweep`), the certificates admitted since the last pass (key quality in a
worker thread, once per serial; unregistered), the client_ca bundle when it changed, and the
quarantine file (written and re-read in worker threads).

Quarantine (``[checks] action = "quarantine"``, misuse checks only): the certificate's serial
goes into the gatekeeper's ``quarantined`` set at once (refused from the next CONNECT, its
live session closed, reason ``quarantined``), then into the file. An operator's clear is seen
by the next pass that finds the file changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from cryptography import x509

from hub.audit import format_time
from hub.errors import QuarantineError
from hub.findings import quarantine
from hub.findings.keys import key_problem
from hub.findings.model import MISUSE, UNREGISTERED_CERTIFICATE, WEAK_KEY, Finding
from hub.findings.reporter import FindingSink, Reporter
from hub.findings.sweep import DAY, KICK_DEADLINE, Live, StillConnected, ca_expiring, expiring
from hub.findings.takeovers import Takeover, TakeoverDetector
from hub.revocation import refusal, unregistered
from hub.tasks import cancel_and_wait
from provisioning.registry.view import FleetView, FleetViewError
from provisioning.serial import format_serial

if TYPE_CHECKING:
    from hub.config import ChecksConfig
    from hub.gatekeeper import Clock, Gatekeeper
    from hub.identity import DeviceIdentity

log = logging.getLogger("hub.findings")

SWEEP_SECONDS: Final = 1.0
UNREGISTERED_GRACE: Final = 5.0  # a device enrolled a moment ago may not be in the state yet
CA_RECHECK: Final = 3600.0


class BundleLike(Protocol):
    """``hub.cabundle.Bundle``: the client_ca certificates in force and their generation."""

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]: ...

    @property
    def generation(self) -> int: ...


@dataclass(slots=True)
class _Admitted:
    identity: DeviceIdentity
    der: bytes | None  # None: its key was looked at already
    peer: str
    time: float


class Findings:
    """Runs the checks of DESIGN section 11 for one hub."""

    def __init__(self, config: ChecksConfig, gatekeeper: Gatekeeper, audit: FindingSink,
                 bundle: Callable[[], BundleLike], client_ca: Path, *,
                 clock: Clock | None = None, registry: Path | None = None) -> None:
        self.config = config
        self.gatekeeper = gatekeeper
        self.clock = clock or gatekeeper.clock
        self.reporter = Reporter(audit, config.shared_window_seconds)
        self.takeovers = TakeoverDetector(config.shared_window_seconds)
        self.still_connected = StillConnected(KICK_DEADLINE)
        # The sessions the pass looks at; the broker points this at every open connection.
        self.sessions: Callable[[], Iterable[Live]] = lambda: list(gatekeeper.live.values())
        self._bundle = bundle
        self._client_ca = str(client_ca)
        self._admitted: dict[int, _Admitted] = {}
        self._unlisted: dict[int, _Admitted] = {}  # waiting out UNREGISTERED_GRACE
        # With a registry source and registered_only off, the state lists no serials (a
        # fleet-wide read on every registry change costs the gateway memory and CPU in
        # proportion to the fleet): the serials admitted are looked up there instead.
        self._registry = registry
        self._view: FleetView | None = None
        self._registry_failing = False
        self._keys_done: set[int] = set()
        self._expiring_told: dict[int, float] = {}
        self._ca_generation: int | None = None
        self._ca_checked = 0.0
        self._file = config.quarantine_file
        self._file_signature: quarantine.Signature = None
        self._to_write: dict[int, quarantine.Entry] = {}
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[None] | None = None

    # -- the connect path: O(1) --------------------------------------------------------------

    def admitted(self, identity: DeviceIdentity, der: bytes | None, peer: str) -> None:
        """A CONNECT was accepted on *der*; looked at by the next pass."""
        serial = identity.serial
        if serial not in self._admitted:
            self._admitted[serial] = _Admitted(
                identity, None if serial in self._keys_done else der, peer, self.clock.time())

    def took_over(self, client_id: str, old: Live, identity: DeviceIdentity, peer: str,
                  old_idle: float | None = None) -> None:
        """*identity* from *peer* is taking *client_id* over from the live connection *old*
        (silent for *old_idle* seconds: long for a half-open connection, short for a clone)."""
        finding = self.takeovers.observe(Takeover(self.clock.time(), client_id,
                                                  old.identity.serial, old.peer,
                                                  identity.serial, peer, old_idle))
        if finding is not None:
            asyncio.get_running_loop().call_soon(self.found, finding)

    # -- start, stop, the pass ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the quarantine file (a corrupt one stops the start: QuarantineError), look at
        client_ca, then run the pass every second."""
        if self._file is not None:
            await self._reload_quarantine()
        self._ca(self.clock.time())  # ca-expiring at start, not a pass later
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hub findings")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        await self._write_quarantine()
        view, self._view = self._view, None
        if view is not None:
            view.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.sweep()
            except Exception:  # the pass must outlive any bug, or the checks would stop
                log.exception("findings pass failed")

    async def sweep(self) -> None:
        """One pass (the task calls it every second; tests call it directly)."""
        now = self.clock.time()
        sessions = list(self.sessions())
        lost = partial(self.gatekeeper.lost, self.gatekeeper.watcher.snapshot)
        for finding in self.still_connected.check(sessions, lost, now):
            self.found(finding)
        self._expiring(sessions, now)
        self._ca(now)
        await self._look_at_admitted(now)
        self.takeovers.prune(now)
        self.reporter.prune(now)
        await self._write_quarantine()
        await self._poll_quarantine()

    def _expiring(self, sessions: Sequence[Live], now: float) -> None:
        told = self._expiring_told
        fresh = [s for s in sessions if now - told.get(s.identity.serial, -DAY) >= DAY]
        for serial, finding in expiring(fresh, now, self.config.warn_days):
            self.found(finding)
            told[serial] = now
        if len(told) > 2 * len(sessions) + 1000:
            for serial in [s for s, t in told.items() if now - t >= DAY]:
                del told[serial]

    def _ca(self, now: float) -> None:
        bundle = self._bundle()
        if bundle.generation == self._ca_generation and now - self._ca_checked < CA_RECHECK:
            return
        self._ca_generation, self._ca_checked = bundle.generation, now
        for finding in ca_expiring(bundle.certificates, now, self.config.warn_days,
                                   self._client_ca):
            self.found(finding)

    async def _look_at_admitted(self, now: float) -> None:
        admitted, self._admitted = self._admitted, {}
        if not self.gatekeeper.auth.registered_only:
            snapshot = self.gatekeeper.watcher.snapshot
            if snapshot.certificates is not None:
                self._unregistered(admitted, now)
            elif self._registry is not None:
                await self._unregistered_in_registry(admitted, now)
        keys = [(a.identity, a.der, a.peer) for a in admitted.values() if a.der is not None]
        if not keys:
            return
        config = self.config
        problems = await asyncio.to_thread(_inspect, [der for _, der, _ in keys],
                                           config.min_rsa_bits, frozenset(config.curves))
        for (identity, _, peer), problem in zip(keys, problems, strict=True):
            self._keys_done.add(identity.serial)
            if problem is not None:
                serial = identity.serial_hex
                self.found(Finding(WEAK_KEY, serial, identity.device_id, serial, peer, problem,
                                   ((identity.serial, identity.device_id),)))

    def _unregistered(self, admitted: dict[int, _Admitted], now: float) -> None:
        snapshot = self.gatekeeper.watcher.snapshot
        self._unlisted.update(admitted)
        for serial, seen in list(self._unlisted.items()):
            identity = seen.identity
            if not unregistered(snapshot, serial, identity.device_id) or \
                    refusal(snapshot, serial, identity.device_id) is not None:
                # Listed, or revoked / held since (the list holds valid serials only): the
                # gatekeeper's business, not an unregistered certificate.
                del self._unlisted[serial]
            elif now - seen.time >= UNREGISTERED_GRACE:
                del self._unlisted[serial]
                self._unregistered_found(seen, (snapshot.certificates or {}).get(
                    identity.device_id))

    async def _unregistered_in_registry(self, admitted: dict[int, _Admitted],
                                        now: float) -> None:
        """unregistered-certificate against the registry itself: one point read (in a worker
        thread) of the devices whose admitted serials are past the grace."""
        self._unlisted.update(admitted)
        due = {serial: seen for serial, seen in self._unlisted.items()
               if now - seen.time >= UNREGISTERED_GRACE}
        if not due:
            return
        try:
            listed = await asyncio.to_thread(self._valid_serials,
                                             [seen.identity.device_id for seen in due.values()])
        except FleetViewError as exc:  # kept for the next pass
            if not self._registry_failing:
                log.warning("unregistered-certificate: %s", exc)
            self._registry_failing = True
            return
        self._registry_failing = False
        snapshot = self.gatekeeper.watcher.snapshot
        for serial, seen in due.items():
            del self._unlisted[serial]
            identity = seen.identity
            known = listed.get(identity.device_id)
            if (known is not None and serial in known) or \
                    refusal(snapshot, serial, identity.device_id) is not None:
                continue  # registered, or revoked / held since: the gatekeeper's business
            self._unregistered_found(seen, known)

    def _unregistered_found(self, seen: _Admitted, known: Iterable[int] | None) -> None:
        """Report *seen*'s certificate; *known*: its device's listed serials (None: none)."""
        identity = seen.identity
        self.found(Finding(
            UNREGISTERED_CERTIFICATE, identity.serial_hex, identity.device_id,
            identity.serial_hex, seen.peer,
            {"device_known": known is not None,
             "listed_serials": sorted(format_serial(s) for s in known or ()),
             "admitted_at": format_time(seen.time)},
            ((identity.serial, identity.device_id),)))

    def _valid_serials(self, device_ids: list[str]) -> dict[str, frozenset[int]]:
        """Worker thread: the registry's valid serials of *device_ids*."""
        assert self._registry is not None  # noqa: S101 - only called with a registry
        if self._view is None:
            self._view = FleetView(self._registry)
        return self._view.valid_serials(device_ids)

    # -- reporting and quarantine ------------------------------------------------------------

    def found(self, finding: Finding) -> None:
        """Report *finding* (once per period) and, when the action says so, quarantine."""
        quarantining = self.config.action == "quarantine" and finding.check in MISUSE \
            and bool(finding.quarantine)
        if quarantining:
            finding = Finding(finding.check, finding.subject, finding.device_id,
                              finding.serial, finding.peer,
                              {**finding.evidence, "action": "quarantine"}, finding.quarantine)
        if self.reporter.report(finding, self.clock.time()) and quarantining:
            self.quarantine(finding.quarantine, finding.check)

    def quarantine(self, certificates: Iterable[tuple[int, str]], check: str) -> None:
        """Refuse each (serial, device id) here from now on and close its live session."""
        since = format_time(self.clock.time())
        for serial, device_id in certificates:
            if serial not in self.gatekeeper.quarantined:
                self.gatekeeper.quarantined.add(serial)
                log.warning("quarantined serial %s of %s (%s)", format_serial(serial),
                            device_id, check)
            if self._file is not None and serial not in self._to_write:
                self._to_write[serial] = quarantine.entry(serial, device_id, check, since)[1]
            session = self.gatekeeper.live.get(device_id)
            if session is not None and session.identity.serial == serial:
                self.gatekeeper.evict(session, "quarantined")
        if self._to_write and self._writing is None:
            # On disk now, not at the next pass: a restart a moment later still refuses it.
            self._writing = asyncio.get_running_loop().create_task(self._write_quarantine())
            self._writing.add_done_callback(self._written)

    def _written(self, _task: asyncio.Task[None]) -> None:
        self._writing = None

    async def _write_quarantine(self) -> None:
        if not self._to_write or self._file is None:
            return
        pending = dict(self._to_write)
        try:
            await asyncio.to_thread(quarantine.add, self._file, pending.items())
        except QuarantineError as exc:
            log.error("%s; the quarantine holds in memory, retrying", exc)  # noqa: TRY400
            return
        for serial in pending:
            self._to_write.pop(serial, None)

    async def _poll_quarantine(self) -> None:
        if self._file is None:
            return
        try:
            sig = await asyncio.to_thread(quarantine.signature, self._file)
        except QuarantineError as exc:
            log.error("%s", exc)  # noqa: TRY400
            return
        if sig != self._file_signature:
            try:
                await self._reload_quarantine()
            except QuarantineError as exc:
                log.error("%s; keeping the quarantine in memory", exc)  # noqa: TRY400

    async def _reload_quarantine(self) -> None:
        assert self._file is not None  # noqa: S101
        sig = await asyncio.to_thread(quarantine.signature, self._file)
        entries = await asyncio.to_thread(quarantine.read, self._file)
        self._file_signature = sig
        held = self.gatekeeper.quarantined
        wanted = set(entries) | set(self._to_write)
        for serial in held - wanted:
            log.warning("quarantine of serial %s cleared", format_serial(serial))
        held.clear()
        held.update(wanted)

    def counts(self) -> dict[str, int]:
        """Findings recorded since start, by check (/metrics, /healthz)."""
        return self.reporter.counts()


def _inspect(ders: list[bytes | None], min_rsa_bits: int,
             curves: frozenset[str]) -> list[dict[str, object] | None]:
    return [key_problem(der, min_rsa_bits, curves) if der is not None else None
            for der in ders]
