"""Defender scenarios: misuse that authentication admits, and whether the hub's checks see it.

Every certificate here is valid, so a broker admits each connection; what is tested is the
gateway's audit checks (DESIGN section 11, issue 15), which must say what authentication
cannot:

- ``cloned-device``: two boxes (two connections, two source addresses on loopback) with one
  device's certificate and key throw each other off: two take-overs of one serial, which the
  hub reports as ``certificate-shared``;
- ``client-id-fight``: a device's superseded certificate (renewed by the library as
  ``sign --renew`` does, when the scenario starts: it stays valid for ``renew_grace``) and its
  renewal fight over the client id: two take-overs between different serials,
  ``client-id-conflict``;
- ``expiring-soon``: a device whose certificate ends within the hour connects and stays
  until the hub's pass reports ``certificate-expiring`` (any ``warn_days`` of 1 or more).

What the hub reported is read where it can be: its ``/metrics`` counter
``fleet_hub_findings_total{check}`` (``--hub-metrics``; the count moves, it does not name a
device), and, when the run owns the hub (quickstart), its audit store through ``fleet-hub
audit --config hub.toml --json`` (the finding for that device, with its evidence). With
neither, the scenario checks what a device can see (the take-overs happened, the expiring
device was admitted) and says the finding was not observed.

Every run makes new devices (``atk-clone-<stamp>``, ...): the hub reports a subject once per
window (a serial or a client id) or per day (an expiring serial), so a second run against the
same hub must bring new ones to be seen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim import factory
from device_sim.brokers import Endpoint, label, parse_broker
from device_sim.device import Device
from device_sim.enroll import DeviceFiles
from device_sim.errors import EnrollError, SimError, UsageError
from device_sim.scenarios import ATTACK_TIMEOUT, REVOCATION_GRACE, AttackRunner, ScenarioResult
from device_sim.worker import on_loopback
from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.errors import ProvisioningError
from provisioning.issuer import SignOptions

CLONED, FIGHT, EXPIRING = "cloned-device", "client-id-fight", "expiring-soon"
SHARED_CHECK, CONFLICT_CHECK, EXPIRING_CHECK = ("certificate-shared", "client-id-conflict",
                                                "certificate-expiring")
EXPIRING_VALIDITY = dt.timedelta(hours=1)  # within any warn_days of 1 or more
TAKEOVERS = 2  # what the hub's take-over checks need within shared_window_seconds
FINDING_TIMEOUT = 10.0  # for the hub to report (its pass runs every second)
UNOBSERVED_HOLD = 3.0  # the expiring device stays this long when nothing can be read
BOX_SOURCES = ("127.0.3.1", "127.0.3.2")  # the two boxes, on a loopback broker
METRICS_POLL, AUDIT_POLL = 0.2, 0.5
_COUNTER = re.compile(r'^fleet_hub_findings_total\{check="([^"]+)"\}\s+([0-9.eE+]+)\s*$',
                      re.MULTILINE)


@dataclass(frozen=True)
class Checks:
    """The hub's ``[checks]`` the scenarios expect (DESIGN section 11's defaults).

    ``known``: read from the hub's own config (quickstart), so the expectation names them.
    """

    action: str = "report"
    warn_days: int = 30
    shared_window_seconds: float = 60.0
    known: bool = False

    @classmethod
    def from_hub_config(cls, path: Path) -> Checks:
        with path.open("rb") as handle:
            table = tomllib.load(handle).get("checks", {})
        d = cls()
        return cls(action=str(table.get("action", d.action)),
                   warn_days=int(table.get("warn_days", d.warn_days)),
                   shared_window_seconds=float(table.get("shared_window_seconds",
                                                         d.shared_window_seconds)),
                   known=True)


@dataclass(frozen=True)
class HubWatch:
    """Where one broker's findings can be read: its metrics listener, its config, both or
    neither (then nothing is observed)."""

    metrics: Endpoint | None = None
    config: Path | None = None
    checks: Checks = field(default_factory=Checks)

    @property
    def observing(self) -> bool:
        return self.metrics is not None or self.config is not None

    def counts(self) -> dict[str, int]:
        """``fleet_hub_findings_total`` by check (blocking: call it in a thread); OSError
        when the listener cannot be read, ValueError when it has no such counter."""
        assert self.metrics is not None  # noqa: S101
        url = f"http://{label(self.metrics)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode("utf-8", "replace")
        found = {check: int(float(value)) for check, value in _COUNTER.findall(text)}
        if not found:
            raise ValueError(f"no fleet_hub_findings_total at {url}")
        return found

    def finding(self, check: str, device_id: str) -> Mapping[str, object] | None:
        """The audit store's group for (*check*, *device_id*) (``fleet-hub audit --json``),
        blocking; OSError or ValueError when the command fails."""
        assert self.config is not None  # noqa: S101
        done = subprocess.run(
            [sys.executable, "-m", "hub.cli", "audit", "--config", str(self.config),
             "--json", "--since", "1h"],
            capture_output=True, text=True, timeout=30, check=False)
        if done.returncode not in (0, 1):
            raise ValueError(f"fleet-hub audit exited {done.returncode}: "
                             f"{done.stderr.strip()[-200:]}")
        for group in json.loads(done.stdout or "[]"):
            if group.get("check") == check and group.get("device_id") == device_id:
                return dict(group)
        return None


def watch_at(watches: Sequence[HubWatch], endpoints: Sequence[Endpoint],
             endpoint: Endpoint) -> HubWatch:
    """The watch of *endpoint* (``watches`` pairs with ``endpoints``; none: not observed)."""
    return dict(zip(endpoints, watches, strict=False)).get(endpoint, HubWatch())


def lab_watch(metrics_port: int | None, config: Path) -> HubWatch:
    """A hub the run started itself (quickstart): its metrics, audit store and [checks]."""
    return HubWatch(None if metrics_port is None else ("127.0.0.1", metrics_port), config,
                    Checks.from_hub_config(config))


def parse_hub_metrics(values: list[str], brokers: int) -> tuple[HubWatch, ...]:
    """``--hub-metrics HOST:PORT`` values (each one or a comma-separated list), one per
    broker in the order of ``--broker``."""
    out: list[HubWatch] = []
    for value in values:
        for text in value.split(","):
            try:
                out.append(HubWatch(metrics=parse_broker(text.strip())))
            except UsageError:
                raise UsageError(f"{text.strip()!r} is not HOST:PORT",
                                 "--hub-metrics") from None
    if out and len(out) != brokers:
        raise UsageError(f"{len(out)} metrics listeners for {brokers} brokers: give one per "
                         "--broker, in the same order", "--hub-metrics")
    return tuple(out)


# -- material --------------------------------------------------------------------------------


class Renewal:
    """The fight's renewal (``sign --renew`` through the library), made once for every broker
    when the first fight starts: as late as possible, so that a short ``renew_grace`` (a
    ``--rotate`` run's) has not had the superseded certificate revoked before it is used."""

    def __init__(self, pki: Path, device_id: str, files: DeviceFiles) -> None:
        self.pki, self.device_id, self.files = pki, device_id, files
        self.at: float | None = None  # time.monotonic() of the renewal, once made
        self._task: asyncio.Task[float] | None = None

    def renew(self) -> float:
        """Blocking; EnrollError when the CA refuses."""
        with Authority(self.pki, actor="fleet-sim") as authority:
            _issue(authority, self.files, self.device_id, SignOptions(renew=True))
        self.at = time.monotonic()
        return self.at

    async def made(self) -> float:
        """The renewal's time, making it first if no one has."""
        if self.at is not None:
            return self.at
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.renew))
        return await asyncio.shield(self._task)


@dataclass(frozen=True)
class DefenderKit:
    clone: DeviceFiles  # one certificate, played by two boxes
    superseded: DeviceFiles  # the fight: the device's first certificate, renewed in the run
    renewed: DeviceFiles  # its renewal's files (same device id, another key and serial)
    expiring: DeviceFiles  # valid for EXPIRING_VALIDITY
    renewal: Renewal


def prepare_defender(pki: Path, root: Path) -> DefenderKit:
    """New devices for this run (see the module docstring), issued by the library; the
    fight's renewal is made when the scenario starts (:class:`Renewal`)."""
    shutil.rmtree(root, ignore_errors=True)  # the previous run's: their subjects are spent
    root.mkdir(parents=True)
    stamp = int(time.time())
    files = {name: DeviceFiles(f"atk-{name}-{stamp}", root / f"{name}.pem",
                               root / f"{name}.key")
             for name in ("clone", "fight", "expiring")}
    fight_id = files["fight"].device_id
    renewed = DeviceFiles(fight_id, root / "renewed.pem", root / "renewed.key")
    with Authority(pki, actor="fleet-sim") as authority:
        for name, options in (("clone", SignOptions()), ("fight", SignOptions()),
                              ("expiring", SignOptions(validity=EXPIRING_VALIDITY))):
            _issue(authority, files[name], files[name].device_id, options)
    return DefenderKit(files["clone"], files["fight"], renewed, files["expiring"],
                       Renewal(pki, fight_id, renewed))


def _issue(authority: Authority, files: DeviceFiles, device_id: str,
           options: SignOptions) -> None:
    """A new key and CSR for *device_id*, signed; key and certificate (with the chain) into
    *files*."""
    key = factory.new_key()
    result = authority.issuer().sign([CSRInput(device_id, factory.csr_pem(device_id, key))],
                                     options)[0]
    if result.status != "issued" or result.pem is None:
        raise EnrollError(f"the CA refused {device_id} for the defender scenarios: "
                          f"{result.reason or result.status}")
    factory.write_key(files.key, key)
    leaf = x509.load_pem_x509_certificate(result.pem.encode())  # the leaf alone
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                           + authority.ca.chain_pem)


# -- the scenarios ---------------------------------------------------------------------------

MakeDevice = Callable[[DeviceFiles, str | None], Device]  # files, source address -> device


@dataclass(frozen=True)
class _Sighting:
    seen: bool | None  # None: not observed (no channel)
    text: str


async def defend(kit: DefenderKit | None, attack: AttackRunner,
                 watch: HubWatch) -> list[ScenarioResult]:
    """The scenarios at the broker of *attack* (its devices: TLS, host, port); none without
    material."""
    if kit is None:
        return []
    runner = DefenderRunner(kit, lambda files, source: attack.device(
        files, files.device_id, source=source), watch, loopback=on_loopback(attack.host))
    return await runner.run()


class DefenderRunner:
    """The three scenarios, concurrently, against one broker."""

    def __init__(self, kit: DefenderKit, make_device: MakeDevice, watch: HubWatch,
                 *, loopback: bool, finding_timeout: float = FINDING_TIMEOUT) -> None:
        self.kit = kit
        self.finding_timeout = finding_timeout
        self._make = make_device
        self.watch = watch
        self.sources: tuple[str | None, str | None] = (BOX_SOURCES if loopback
                                                       else (None, None))

    async def run(self) -> list[ScenarioResult]:
        results = await asyncio.gather(self.cloned(), self.fight(), self.expiring())
        return list(results)

    def _expect(self, check: str, device_id: str) -> str:
        checks = self.watch.checks
        text = f"the hub reports {check} for {device_id}"
        if checks.known and checks.action == "quarantine" and check != EXPIRING_CHECK:
            text += " and quarantines its certificates (closed, then refused)"
        return text

    async def cloned(self) -> ScenarioResult:
        files = self.kit.clone
        expected = (f"two boxes with {files.device_id}'s one certificate take each other's "
                    f"place {TAKEOVERS} times; " + self._expect(SHARED_CHECK, files.device_id))
        return await self._flap(CLONED, expected, SHARED_CHECK, files.device_id,
                                (files, files), "box")

    async def fight(self) -> ScenarioResult:
        old, new = self.kit.superseded, self.kit.renewed
        expected = (f"{old.device_id}'s superseded certificate and its renewal (both valid "
                    f"during renew_grace) take its client id from each other {TAKEOVERS} "
                    "times; " + self._expect(CONFLICT_CHECK, old.device_id))
        try:
            renewed_at = await self.kit.renewal.made()
        except (SimError, ProvisioningError, OSError) as exc:
            return ScenarioResult(FIGHT, expected, f"the renewal failed: {exc}", passed=False)
        wait = renewed_at + REVOCATION_GRACE - time.monotonic()
        if wait > 0:  # for the broker to learn of the new certificate
            await asyncio.sleep(wait)
        return await self._flap(FIGHT, expected, CONFLICT_CHECK, old.device_id, (old, new),
                                "certificate")

    async def _flap(self, name: str, expected: str, check: str, device_id: str,
                    files: tuple[DeviceFiles, DeviceFiles], what: str) -> ScenarioResult:
        """Side 0 connects, side 1 takes over, side 0 takes over again (TAKEOVERS), each
        take-over awaited until the displaced connection is closed."""
        before = await self._baseline()
        if isinstance(before, str):
            return ScenarioResult(name, expected, before, passed=False)
        live: list[Device] = []
        takeovers, problem = 0, None
        try:
            for step in range(TAKEOVERS + 1):
                side = step % 2
                device = self._make(files[side], self.sources[side])
                outcome = await device.connect(ATTACK_TIMEOUT)
                if not outcome.accepted:
                    problem = f"{what} {side + 1}'s connect {step + 1}: {outcome.describe()}"
                    break
                if live and await live[-1].wait_gone(ATTACK_TIMEOUT):
                    takeovers += 1
                elif live:
                    problem = (f"{what} {2 - side} stayed connected after {what} {side + 1} "
                               f"connected with its client id")
                live.append(device)
                if problem:
                    break
            sighting = (await self._sighting(check, device_id, before)
                        if takeovers >= TAKEOVERS else
                        _Sighting(None, "the hub's findings not looked at"))
            quarantined = await self._quarantined(files[0], sighting)
        finally:
            await asyncio.gather(*(d.disconnect(1.0) for d in live))
        sources = ("" if self.sources[0] is None
                   else f" from {self.sources[0]} and {self.sources[1]}")
        observed = (f"{takeovers} take-overs{sources}"
                    + (f" ({problem})" if problem else "") + f"; {sighting.text}")
        if quarantined is not None:
            observed += f"; {quarantined[1]}"
        passed = (takeovers >= TAKEOVERS and sighting.seen is not False
                  and (quarantined is None or quarantined[0]))
        return ScenarioResult(name, expected, observed, passed)

    async def _quarantined(self, files: DeviceFiles,
                           sighting: _Sighting) -> tuple[bool, str] | None:
        """With ``action = "quarantine"`` known and the finding seen: a new connection on
        the certificate must be refused."""
        checks = self.watch.checks
        if not (checks.known and checks.action == "quarantine" and sighting.seen):
            return None
        device = self._make(files, self.sources[0])
        outcome = await device.connect(ATTACK_TIMEOUT)
        if outcome.accepted:
            await device.disconnect(1.0)
        return outcome.refused, f"a new connection: {outcome.describe()}"

    async def expiring(self) -> ScenarioResult:
        files = self.kit.expiring
        warn = self.watch.checks
        minutes = round(EXPIRING_VALIDITY.total_seconds() / 60)
        expected = (f"{files.device_id} (certificate ending within {minutes} min) is admitted; "
                    + self._expect(EXPIRING_CHECK, files.device_id)
                    + (f" (warn_days {warn.warn_days})" if warn.known else ""))
        before = await self._baseline()
        if isinstance(before, str):
            return ScenarioResult(EXPIRING, expected, before, passed=False)
        device = self._make(files, None)
        outcome = await device.connect(ATTACK_TIMEOUT)
        try:
            if not outcome.accepted:
                return ScenarioResult(EXPIRING, expected, outcome.describe(), passed=False)
            if self.watch.observing:
                sighting = await self._sighting(EXPIRING_CHECK, files.device_id, before)
            else:
                await device.wait_gone(UNOBSERVED_HOLD)  # a pass of the hub's, unseen
                sighting = _Sighting(None, self._unobserved())
            stayed = device.connected
        finally:
            await device.disconnect(1.0)
        observed = (f"{outcome.describe()}"
                    + ("" if stayed else ", then disconnected") + f"; {sighting.text}")
        return ScenarioResult(EXPIRING, expected, observed,
                              stayed and sighting.seen is not False)

    # -- the hub's side ----------------------------------------------------------------------

    def _unobserved(self) -> str:
        return ("the hub's findings not observed (give --hub-metrics HOST:PORT to read its "
                "fleet_hub_findings_total)")

    async def _baseline(self) -> dict[str, int] | str | None:
        """The counters before the scenario acts (None: no metrics), or why unreadable."""
        if self.watch.metrics is None:
            return None
        try:
            return await asyncio.to_thread(self.watch.counts)
        except (OSError, ValueError) as exc:
            return f"cannot read the hub's findings: {_reason(exc)}"

    async def _sighting(self, check: str, device_id: str,
                        before: dict[str, int] | str | None) -> _Sighting:
        watch = self.watch
        if not watch.observing:
            return _Sighting(None, self._unobserved())
        deadline = time.monotonic() + self.finding_timeout
        delta = 0
        try:
            if watch.metrics is not None and isinstance(before, dict):
                while True:
                    delta = (await asyncio.to_thread(watch.counts)).get(check, 0) \
                        - before.get(check, 0)
                    if delta > 0 or time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(METRICS_POLL)
            counter = f'fleet_hub_findings_total{{check="{check}"}} +{delta}'
            if watch.config is None:
                return _Sighting(delta > 0, f"{counter} on the hub's /metrics (the count, "
                                 "not the device)" if delta > 0 else
                                 f"{counter} within {self.finding_timeout:g} s: not reported")
            while True:  # the audit row follows the counter (the store writes in batches)
                group = await asyncio.to_thread(watch.finding, check, device_id)
                if group is not None or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(AUDIT_POLL)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return _Sighting(False, f"cannot read the hub's findings: {_reason(exc)}")
        if group is None:
            return _Sighting(False, f"no {check} finding for {device_id} in the hub's audit "
                             f"store within {self.finding_timeout:g} s"
                             + (f" ({counter})" if watch.metrics is not None else ""))
        return _Sighting(True, f"the hub reported {check} for {device_id} "
                         f"(audit: {_evidence(group)})")


def _evidence(group: Mapping[str, object]) -> str:
    """The telling part of a finding's evidence, short."""
    evidence = group.get("evidence")
    parts = [f"{group.get('count')} finding(s)"]
    if isinstance(evidence, Mapping):
        for key in ("peers", "serials", "days_left", "action"):
            if key in evidence:
                value = evidence[key]
                shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
                parts.append(f"{key} {shown}")
    return "; ".join(parts)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
