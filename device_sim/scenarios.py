"""Attack scenarios: devices that must be refused, each with the outcome it expects.

Material (made before the run, in ``FLEET_DIR/attack``): a foreign PKI made with the
provisioning library and a certificate from it; an expired and a not-yet-valid certificate
signed by the real issuing CA with chosen dates; a device enrolled and then revoked; and two
valid devices, a victim and an attacker, for client-id spoofing and the ACL checks; four
more valid devices for the abuse scenarios (:mod:`device_sim.abuse`); and the defender
scenarios' devices, new every run (:mod:`device_sim.defender`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from device_sim import factory
from device_sim.device import SUBACK_FAILURE, Device
from device_sim.enroll import DeviceFiles, FleetDir, LibraryEnroller
from device_sim.transport import Credentials, client_context
from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.profile import device_certificate, random_serial

if TYPE_CHECKING:
    from device_sim.defender import DefenderKit

REFUSE = "refused (in TLS, by CONNACK, or closed before CONNACK)"
ATTACK_TIMEOUT = 10.0
# How long a broker may take to learn of a revocation before the revoked device tries.
REVOCATION_GRACE = 2.0
SETTLE = 0.5  # after an attack, before looking at its effect on the victim
ABUSERS = 4  # valid devices for device_sim.abuse: flooder, bystander, hoarder, bulky


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    expected: str
    observed: str
    passed: bool

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "expected": self.expected, "observed": self.observed,
                "passed": self.passed}


@dataclass(frozen=True)
class AttackKit:
    victim: DeviceFiles
    attacker: DeviceFiles
    rogue: DeviceFiles
    expired: DeviceFiles
    future: DeviceFiles
    revoked: DeviceFiles
    revoked_at: float  # time.monotonic() of its revocation (-inf: an earlier run)
    abusers: tuple[DeviceFiles, ...] = ()  # flooder, bystander, hoarder, bulky
    defender: DefenderKit | None = None  # device_sim.defender's devices


def prepare(pki: Path, root: Path) -> AttackKit:
    """Everything the scenarios need; cached pieces are reused (the rogue PKI, the pair)."""
    # defender builds on this module (ScenarioResult, the timeouts): imported when used.
    from device_sim.defender import prepare_defender  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    crew = FleetDir(root / "pair", prefix="atk-").prepare(pki, 2 + ABUSERS,
                                                         LibraryEnroller(pki))
    victim, attacker, *abusers = crew.devices
    return AttackKit(victim, attacker, _rogue(root), *_dated(pki, root), *_revoked(pki, root),
                     abusers=tuple(abusers), defender=prepare_defender(pki, root / "defender"))


def _rogue(root: Path) -> DeviceFiles:
    """A device certificate from another fleet's CA, with a perfectly good profile."""
    rogue_pki = root / "rogue-pki"
    if not (rogue_pki / "pki.toml").is_file():
        initialize(rogue_pki, PKIConfig(trust_domain="rogue.invalid",
                                        organisation="Rogue Devices"), None)
    return FleetDir(root / "rogue", prefix="atk-rogue-").prepare(
        rogue_pki, 1, LibraryEnroller(rogue_pki)).devices[0]


def _dated(pki: Path, root: Path) -> tuple[DeviceFiles, DeviceFiles]:
    """Expired and not-yet-valid certificates from the real issuing CA (made every run)."""
    now = dt.datetime.now(dt.UTC)
    windows = {"atk-expired": (now - dt.timedelta(days=30), now - dt.timedelta(days=1)),
               "atk-future": (now + dt.timedelta(days=1), now + dt.timedelta(days=30))}
    out = []
    with Authority(pki, actor="fleet-sim") as authority:
        ca, config = authority.ca, authority.config
        for device_id, (not_before, not_after) in windows.items():
            key = factory.new_key()
            cert = device_certificate(ca, config, device_id, key.public_key(), random_serial(),
                                      not_before, not_after)
            files = DeviceFiles(device_id, root / f"{device_id}.pem", root / f"{device_id}.key")
            factory.write_key(files.key, key)
            files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                                   + ca.chain_pem)
            out.append(files)
    return out[0], out[1]


def _revoked(pki: Path, root: Path) -> tuple[DeviceFiles, float]:
    """A device the CA revoked: the one of an earlier run if the registry still says so."""
    note = root / "revoked.json"
    with Authority(pki, actor="fleet-sim") as authority:
        try:
            cached = json.loads(note.read_text())
            files = DeviceFiles(cached["device_id"], Path(cached["cert"]), Path(cached["key"]))
            row = authority.registry.device(files.device_id)
            if row is not None and row.status == "revoked" and files.cert.is_file():
                return files, float("-inf")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        fleet = FleetDir(root / "revoked", prefix=f"atk-revoked-{int(time.time())}-")
        files = fleet.prepare(pki, 1, LibraryEnroller(pki)).devices[0]
        authority.revoke(files.device_id, None, "keyCompromise")
        revoked_at = time.monotonic()
    note.write_text(json.dumps({"device_id": files.device_id, "cert": str(files.cert),
                                "key": str(files.key)}))
    return files, revoked_at


class AttackRunner:
    """Runs the scenarios on the current loop against one broker."""

    def __init__(self, kit: AttackKit, host: str, port: int, ca_pem: str, *,
                 check_hostname: bool = True) -> None:
        self.kit = kit
        self.host, self.port = host, port
        self.ca_pem = ca_pem
        self.check_hostname = check_hostname
        self.victim_inbox: list[tuple[str, bytes]] = []

    def device(self, files: DeviceFiles | None, client_id: str, *,
               inbox: list[tuple[str, bytes]] | None = None,
               source: str | None = None) -> Device:
        """A device with *files* (None: no certificate) for this broker, not yet connected
        (from *source*, a local address, when given)."""
        creds = (Credentials(files.cert, files.key) if files is not None
                 else Credentials(None, None))
        context = client_context(self.ca_pem, creds, check_hostname=self.check_hostname)
        on_message = None if inbox is None else (lambda t, p: inbox.append((t, p)))
        return Device(client_id, context, self.host, self.port, on_message=on_message,
                      source=source)

    async def _refused(self, name: str, files: DeviceFiles | None,
                       client_id: str) -> ScenarioResult:
        device = self.device(files, client_id)
        outcome = await device.connect(ATTACK_TIMEOUT)
        if outcome.accepted:
            await device.disconnect()
        return ScenarioResult(name, REFUSE, outcome.describe(), outcome.refused)

    async def run(self) -> list[ScenarioResult]:
        kit = self.kit
        victim_id = kit.victim.device_id
        wait = kit.revoked_at + REVOCATION_GRACE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        results = list(await asyncio.gather(
            self._refused("no-certificate", None, "atk-nocert"),
            self._refused("foreign-ca", kit.rogue, kit.rogue.device_id),
            self._refused("expired", kit.expired, kit.expired.device_id),
            self._refused("not-yet-valid", kit.future, kit.future.device_id),
            self._refused("revoked-before-connect", kit.revoked, kit.revoked.device_id)))
        victim = self.device(kit.victim, victim_id, inbox=self.victim_inbox)
        outcome = await victim.connect(ATTACK_TIMEOUT)
        codes = (await victim.subscribe([f"devices/{victim_id}/cmd",
                                         f"devices/{victim_id}/telemetry"])
                 if outcome.accepted else None)
        if codes is None or SUBACK_FAILURE in codes:
            why = f"the victim {victim_id} could not connect and subscribe: " + (
                outcome.describe() if not outcome.accepted else f"SUBACK {codes}")
            for name, expected in (("client-id-spoofing", "-"),
                                   ("publish-other-device", "-"), ("subscribe-all", "-")):
                results.append(ScenarioResult(name, expected, why, passed=False))
            await victim.disconnect()
            return results
        try:
            results.append(await self._spoof(victim))
            results.extend(await self._acl(victim))
        finally:
            await victim.disconnect()
        return results

    async def _roundtrip(self, victim: Device) -> bool:
        """The victim still works: its own telemetry comes back to it."""
        marker = b"control-%f" % time.monotonic()
        topic = f"devices/{victim.client_id}/telemetry"
        if not victim.publish(topic, marker):
            return False
        deadline = time.monotonic() + ATTACK_TIMEOUT
        while time.monotonic() < deadline:
            if (topic, marker) in self.victim_inbox:
                return True
            if not victim.connected:
                return False
            await asyncio.sleep(0.02)
        return False

    async def _spoof(self, victim: Device) -> ScenarioResult:
        """A valid certificate (the attacker's) with the victim's client id."""
        spoofer = self.device(self.kit.attacker, victim.client_id)
        outcome = await spoofer.connect(ATTACK_TIMEOUT)
        await asyncio.sleep(SETTLE)
        # Connected, and still served: its own message comes back (a slow broker may take
        # long; that is said, but only a lost connection fails the scenario).
        echoed = victim.connected and await self._roundtrip(victim)
        alive = victim.connected
        if outcome.accepted:
            await spoofer.disconnect()
        effect = ("the victim stayed connected" if alive else "the victim was disconnected")
        if alive and not echoed:
            effect += f" (its own message did not come back within {ATTACK_TIMEOUT:g} s)"
        return ScenarioResult("client-id-spoofing", f"{REFUSE}; the victim stays connected",
                              f"{outcome.describe()}; {effect}", outcome.refused and alive)

    async def _acl(self, victim: Device) -> list[ScenarioResult]:
        inbox: list[tuple[str, bytes]] = []
        attacker = self.device(self.kit.attacker, self.kit.attacker.device_id, inbox=inbox)
        outcome = await attacker.connect(ATTACK_TIMEOUT)
        if not outcome.accepted:
            why = f"the attacker's own valid connection failed: {outcome.describe()}"
            return [ScenarioResult("publish-other-device", "-", why, passed=False),
                    ScenarioResult("subscribe-all", "-", why, passed=False)]
        try:
            target = f"devices/{victim.client_id}/cmd"
            payload = b"forged command from " + attacker.client_id.encode()
            attacker.publish(target, payload)
            deadline = time.monotonic() + ATTACK_TIMEOUT
            while attacker.acked < 1 and attacker.connected and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await self._roundtrip(victim)  # the broker has moved past the forged message
            await asyncio.sleep(SETTLE)
            delivered = (target, payload) in self.victim_inbox
            publish = ScenarioResult(
                "publish-other-device", f"a PUBLISH to {target} is not delivered to the victim",
                "delivered to the victim" if delivered else "not delivered", not delivered)
            codes = await attacker.subscribe(["#"]) if attacker.connected else None
            observed = ("no SUBACK: connection closed" if codes is None else
                        "SUBACK " + ", ".join(f"0x{c:02x}" for c in codes)
                        + (" (refused)" if codes == [SUBACK_FAILURE] else " (granted)"))
            if codes is not None and codes != [SUBACK_FAILURE]:
                # Granted: does the broker still filter what it delivers? Own traffic
                # (the victim's telemetry round trip) shows whether others' leak.
                own = f"devices/{attacker.client_id}/"
                await self._roundtrip(victim)
                await asyncio.sleep(SETTLE)
                leaked = sum(1 for topic, _ in inbox if not topic.startswith(own))
                observed += f"; {leaked} messages of other devices delivered to it"
            subscribe = ScenarioResult("subscribe-all", "SUBACK 0x80 (refused)", observed,
                                       codes == [SUBACK_FAILURE])
            return [publish, subscribe]
        finally:
            await attacker.disconnect()

