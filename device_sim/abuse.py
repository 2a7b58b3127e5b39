"""Abuse scenarios: valid devices that misbehave, and what the broker's ``[limits]`` make of it.

DESIGN section 5 gives every limit a default; a run that knows the hub's config (quickstart
writes it) takes them from its ``[limits]`` table instead. Each scenario uses its own device
of the attack kit, is bounded in messages and time, and talks only to the broker given:

- ``oversize-packet``: a PUBLISH whose fixed header declares 200 MB, then up to 1 MB of body;
  the connection must be closed before the body.
- ``publish-flood``: one device floods its own topic while another's telemetry must still
  arrive; what of the flood came back is reported (and checked against the rate when known).
- ``retained-flood``: one device retains a message on each of 300 topics; a new subscription
  may get back at most ``max_retained_per_device``. The topics are cleared afterwards.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device_sim.device import SUBACK_FAILURE, Device
from device_sim.enroll import DeviceFiles
from device_sim.scenarios import ATTACK_TIMEOUT, SETTLE, ScenarioResult

DECLARED_BYTES = 200_000_000  # the oversize PUBLISH's remaining length
OVERSIZE_BODY = 1 << 20  # at most this much of its body is sent
CLOSE_WAIT = 3.0  # for the broker to close after the fixed header, and after the body
FLOOD_MESSAGES = 5000
FLOOD_PAYLOAD = b"x" * 48
BYSTANDER_MESSAGES = 50
BYSTANDER_INTERVAL = 0.02
RETAINED_MESSAGES = 300  # at least; 3x max_retained_per_device when that is larger
RETAINED_MAX_MESSAGES = 3000
PACE = 0.8  # of publish_rate, for the retained flood: the rate limit must not be what drops


@dataclass(frozen=True)
class Limits:
    """The hub's ``[limits]`` the scenarios expect (DESIGN section 5's defaults).

    ``known``: read from the broker's own config, so figures that depend on the exact
    limit (how much of a flood may get through) are checked, not only reported.
    """

    max_packet_bytes: int = 262_144
    publish_rate: float = 100.0
    publish_bytes_rate: int = 524_288
    on_rate_limit: str = "drop"
    max_retained_per_device: int = 100
    max_retained_bytes: int = 1_048_576
    max_pending_tls: int = 16
    known: bool = False

    @classmethod
    def from_hub_config(cls, path: Path) -> Limits:
        """The ``[limits]`` of a hub.toml; keys it leaves out keep DESIGN's defaults."""
        with path.open("rb") as handle:
            table = tomllib.load(handle).get("limits", {})
        d = cls()
        return cls(
            max_packet_bytes=int(table.get("max_packet_bytes", d.max_packet_bytes)),
            publish_rate=float(table.get("publish_rate", d.publish_rate)),
            publish_bytes_rate=int(table.get("publish_bytes_rate", d.publish_bytes_rate)),
            on_rate_limit=str(table.get("on_rate_limit", d.on_rate_limit)),
            max_retained_per_device=int(table.get("max_retained_per_device",
                                                  d.max_retained_per_device)),
            max_retained_bytes=int(table.get("max_retained_bytes", d.max_retained_bytes)),
            max_pending_tls=int(table.get("max_pending_tls", d.max_pending_tls)),
            known=True)

    def to_json(self) -> dict[str, object]:
        return {"source": "hub config" if self.known else "DESIGN defaults",
                "max_packet_bytes": self.max_packet_bytes, "publish_rate": self.publish_rate,
                "max_retained_per_device": self.max_retained_per_device}


@dataclass(frozen=True)
class AbuseKit:
    """The attack kit's devices these scenarios use, one each."""

    flooder: DeviceFiles
    bystander: DeviceFiles
    hoarder: DeviceFiles
    bulky: DeviceFiles


def remaining_length(value: int) -> bytes:
    """MQTT's variable byte integer (MQTT 3.1.1 §2.2.3), as a fixed header carries it."""
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll *condition* on the loop (the devices' counters move in paho's callbacks)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _quiet(counter: Callable[[], int], timeout: float) -> None:
    """Until *counter* has not moved for SETTLE seconds (at most *timeout*)."""
    deadline = time.monotonic() + timeout
    last, since = counter(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < SETTLE:
        await asyncio.sleep(0.05)
        if counter() != last:
            last, since = counter(), time.monotonic()


class AbuseRunner:
    """The three scenarios, concurrently, on the current loop."""

    def __init__(self, kit: AbuseKit, limits: Limits,
                 make_device: Callable[[DeviceFiles, list[tuple[str, bytes]] | None], Device],
                 ) -> None:
        self.kit = kit
        self.limits = limits
        self._make = make_device

    async def run(self) -> list[ScenarioResult]:
        results = await asyncio.gather(self.oversize(), self.flood(), self.retained_flood())
        return list(results)

    async def _connect(self, files: DeviceFiles, inbox: list[tuple[str, bytes]] | None,
                       filters: list[str]) -> tuple[Device, str | None]:
        """A connected (and subscribed) device, or why not."""
        device = self._make(files, inbox)
        outcome = await device.connect(ATTACK_TIMEOUT)
        if not outcome.accepted:
            return device, f"{files.device_id} could not connect: {outcome.describe()}"
        if filters:
            codes = await device.subscribe(filters)
            if codes is None or SUBACK_FAILURE in codes:
                await device.disconnect()
                return device, f"{files.device_id} could not subscribe: SUBACK {codes}"
        return device, None

    async def oversize(self) -> ScenarioResult:
        name = "oversize-packet"
        expected = (f"a PUBLISH declaring {DECLARED_BYTES:,} bytes is closed after its fixed "
                    f"header, before the body (max_packet_bytes {self.limits.max_packet_bytes:,})")
        device, why = await self._connect(self.kit.bulky, None, [])
        if why is not None:
            return ScenarioResult(name, expected, why, passed=False)
        try:
            header = b"\x30" + remaining_length(DECLARED_BYTES)
            sent = await device.send_raw(header, CLOSE_WAIT)
            if sent == len(header) and await device.wait_gone(CLOSE_WAIT):
                return ScenarioResult(name, expected, "closed after the fixed header "
                                      "(0 body bytes sent)", passed=True)
            topic = f"devices/{device.client_id}/telemetry".encode()
            body = len(topic).to_bytes(2, "big") + topic
            body += b"\0" * (OVERSIZE_BODY - len(body))
            taken = await device.send_raw(body, ATTACK_TIMEOUT)
            closed = await device.wait_gone(CLOSE_WAIT)
            observed = (f"closed after {taken:,} body bytes were sent" if closed else
                        f"still open {CLOSE_WAIT:g} s after {taken:,} body bytes")
            return ScenarioResult(name, expected, observed, passed=False)
        finally:
            await device.disconnect(1.0)

    async def flood(self) -> ScenarioResult:
        name = "publish-flood"
        limits = self.limits
        flooder_id, bystander_id = self.kit.flooder.device_id, self.kit.bystander.device_id
        expected = (f"{bystander_id}'s {BYSTANDER_MESSAGES} messages all arrive while "
                    f"{flooder_id} publishes {FLOOD_MESSAGES:,} QoS 0 messages at once")
        if limits.known:
            expected += (f"; of those at most 2 x {limits.publish_rate:g}/s burst + "
                         f"{limits.publish_rate:g}/s are delivered")
        flood_topic = f"devices/{flooder_id}/telemetry"
        own_topic = f"devices/{bystander_id}/telemetry"
        flooder, why = await self._connect(self.kit.flooder, None, [flood_topic])
        bystander, why2 = await self._connect(self.kit.bystander, None, [own_topic])
        try:
            if why or why2:
                return ScenarioResult(name, expected, why or why2 or "", passed=False)
            start = time.monotonic()

            async def flood() -> None:
                for i in range(FLOOD_MESSAGES):
                    if not flooder.publish(flood_topic, FLOOD_PAYLOAD, qos=0):
                        return
                    if i % 250 == 249:
                        await asyncio.sleep(0)  # the bystander's turn, and paho's writes

            async def telemetry() -> None:
                for seq in range(BYSTANDER_MESSAGES):
                    bystander.publish(own_topic, b'{"seq":%d}' % seq)
                    await asyncio.sleep(BYSTANDER_INTERVAL)

            await asyncio.gather(flood(), telemetry())
            await _until(lambda: bystander.received >= BYSTANDER_MESSAGES
                         or not bystander.connected, ATTACK_TIMEOUT)
            await _quiet(lambda: flooder.received, ATTACK_TIMEOUT)
            span = time.monotonic() - start - SETTLE  # first send to (about) the last echo
            got, sent = bystander.received, bystander.sent
            observed = (f"{bystander_id}: {got} of {sent} arrived; {flooder_id}: "
                        f"{flooder.sent:,} sent, {flooder.received:,} delivered back to it "
                        + ("(still connected)" if flooder.connected else "(disconnected)"))
            passed = got == sent == BYSTANDER_MESSAGES
            if limits.known and limits.on_rate_limit == "drop":
                allowed = int(limits.publish_rate * (2 + max(span, 0.0))) + 1
                observed += f", {allowed:,} allowed in {max(span, 0.0):.2f} s"
                passed = passed and flooder.received <= allowed
            return ScenarioResult(name, expected, observed, passed)
        finally:
            await asyncio.gather(flooder.disconnect(), bystander.disconnect())

    async def retained_flood(self) -> ScenarioResult:
        name = "retained-flood"
        cap = self.limits.max_retained_per_device
        count = min(RETAINED_MAX_MESSAGES, max(RETAINED_MESSAGES, 3 * cap))
        hoarder_id = self.kit.hoarder.device_id
        prefix = f"devices/{hoarder_id}/retained"
        expected = (f"{count} retained messages on distinct topics, a new subscription gets "
                    f"at most {cap} back (max_retained_per_device)")
        inbox: list[tuple[str, bytes]] = []
        hoarder, why = await self._connect(self.kit.hoarder, inbox, [])
        if why is not None:
            return ScenarioResult(name, expected, why, passed=False)
        try:
            topics = [f"{prefix}/{i:04d}" for i in range(count)]
            await self._paced(hoarder, [(t, b"retained by " + hoarder_id.encode())
                                        for t in topics])
            acked = await _until(lambda: hoarder.acked >= hoarder.sent, ATTACK_TIMEOUT)
            codes = await hoarder.subscribe([f"{prefix}/#"]) if hoarder.connected else None
            if codes is None or SUBACK_FAILURE in codes:
                return ScenarioResult(name, expected, f"the new subscription failed: SUBACK "
                                      f"{codes}", passed=False)
            # A live message after the SUBACK comes after the retained ones it delivers.
            marker = (f"{prefix}/marker", b"marker %f" % time.monotonic())
            hoarder.publish(*marker)
            await _until(lambda: marker in inbox or not hoarder.connected, ATTACK_TIMEOUT)
            await _quiet(lambda: hoarder.retained, ATTACK_TIMEOUT)
            kept = sorted({t for t, _ in inbox if t != marker[0]})
            observed = (f"{hoarder.retained} retained messages came back ({len(kept)} "
                        f"topics) of {count} published"
                        + ("" if acked else f" ({hoarder.acked} acknowledged)"))
            # Clean up what the broker kept: an empty retained payload deletes it.
            await self._paced(hoarder, [(t, b"") for t in kept])
            await _until(lambda: hoarder.acked >= hoarder.sent, ATTACK_TIMEOUT)
            return ScenarioResult(name, expected, observed, hoarder.retained <= cap)
        finally:
            await hoarder.disconnect()

    async def _paced(self, device: Device, messages: list[tuple[str, bytes]]) -> None:
        """Retained QoS 1 publishes under the publish rate, so none is dropped for rate.

        Half the burst at once, then PACE x publish_rate; bounded by the message count.
        """
        rate = self.limits.publish_rate * PACE
        allowance = self.limits.publish_rate / 2
        start = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            ahead = i - allowance - rate * (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead / rate)
            if not device.publish(topic, payload, retain=True):
                return
