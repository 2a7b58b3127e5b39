"""The device agent against the real CA service and the real hub: a paho device renews its
certificate over EST twice while publishing QoS 1 every 20 ms, switching its MQTT session
to each new certificate, and a separate subscriber gets every sequence number."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from device_sim.agent import ESTRenewal, FileStore, Renewer, Schedule, Stats, read_validity
from device_sim.device import Device
from device_sim.errors import RenewalError
from device_sim.factory import new_key
from device_sim.lab import (
    CAServiceProcess,
    Enrolled,
    HubProcess,
    enroll,
    make_pki,
    write_hub_config,
)
from device_sim.lab.policy import ensure_service_cert, set_policy
from device_sim.transport import Credentials, client_context
from provisioning.authority import Authority
from provisioning.serial import format_serial
from tests.integration.mqtt import Client

DEVICE = "agent-0001"
BURST = "agent-0002"
BURST_SIZE = 150
LOST = "agent-0003"
TOPIC = f"devices/{DEVICE}/telemetry"
GRACE_S = 3
DEADLINE_S = 40.0


@dataclass
class Played:
    stats: Stats
    sent: int
    device_received: set[int]
    watcher: set[int]
    first_revoked: bool
    still_connected: bool


@dataclass
class Lab:
    root: Path
    pki: Path
    hub: HubProcess
    ca: CAServiceProcess
    device: Enrolled
    operator: Enrolled
    burst: Enrolled
    lost: Enrolled


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("agent")
    pki = make_pki(root)
    set_policy(pki, "1m", f"{GRACE_S}s")
    ensure_service_cert(pki)
    # Enrolled before the hub starts: it knows the operator's group from its first read.
    (device,) = enroll(pki, root, [DEVICE])
    (operator,) = enroll(pki, root, ["operator-1"], group="operators")
    (burst,) = enroll(pki, root, [BURST])
    (lost,) = enroll(pki, root, [LOST])
    config = write_hub_config(root, pki, layers=(
        {"acl": {"groups": {"operators": {"subscribe": ["#"]}}}},))
    with HubProcess(config) as hub, CAServiceProcess(pki) as ca:
        yield Lab(root, pki, hub, ca, device, operator, burst, lost)


def _seq(payload: bytes) -> int:
    return int(json.loads(payload)["seq"])


def _revoked_superseded(pki: Path, serial: str) -> bool:
    with Authority(pki) as authority:
        row = authority.registry.certificate(serial)
    return row is not None and row.status == "revoked" and row.reason == "superseded"


async def _play(lab: Lab, cert: Path, key: Path, watcher: Client) -> Played:
    """The device: connect (clean session 0), publish every 20 ms, renew twice, then wait
    for the first old certificate's grace to end while still publishing."""
    ca_pem = (lab.pki / "ca-chain.pem").read_text()
    received: set[int] = set()
    device = Device(DEVICE, client_context(ca_pem, Credentials(cert, key)), "127.0.0.1",
                    lab.hub.port, clean_session=False,
                    on_message=lambda _t, payload: received.add(_seq(payload)))
    assert (await device.connect(10)).accepted
    assert await device.subscribe([TOPIC]) == [1]
    first_serial = read_validity(cert).serial

    async def switch() -> str | None:
        outcome = await device.switch(client_context(ca_pem, Credentials(cert, key)))
        return None if outcome.accepted else outcome.describe()

    sent = 0
    stop = asyncio.Event()

    async def publish() -> None:
        nonlocal sent
        while not stop.is_set():
            if device.publish(TOPIC, b'{"seq":%d}' % (sent + 1)):
                sent += 1
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as session:
        renewer = Renewer(DEVICE, Schedule(renew_at=0.15, jitter=0.0),
                          ESTRenewal(lab.ca.url, lab.pki / "ca-chain.pem", session),
                          FileStore(cert, key), switch)
        publisher = asyncio.create_task(publish())
        agent = asyncio.create_task(renewer.run())
        deadline = time.monotonic() + DEADLINE_S
        while renewer.stats.renewed < 2 and not agent.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        renewer.stop()
        await agent
        # The first certificate's grace ends: the CA revokes it; the hub must not close the
        # session, which is on the newest certificate by now.
        while not _revoked_superseded(lab.pki, first_serial) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        revoked = _revoked_superseded(lab.pki, first_serial)
        hub_saw_revocation = time.monotonic() + 2.0  # the hub refreshes every 0.5 s
        while time.monotonic() < hub_saw_revocation and device.connected:
            await asyncio.sleep(0.1)
        stop.set()
        await publisher
    drain = time.monotonic() + 10
    while time.monotonic() < drain and (len(received) < sent or device.acked < sent):
        await asyncio.sleep(0.05)
    still_connected = device.connected
    await device.disconnect()
    seen: set[int] = set()
    while (message := watcher.receive(0.5 if len(seen) < sent else 0.01)) is not None:
        seen.add(_seq(message.payload))
    return Played(renewer.stats, sent, received, seen, revoked, still_connected)


def test_device_renews_twice_and_loses_no_qos1_message(lab: Lab) -> None:
    """Two renewals over EST simplereenroll (a new key each: the CA refuses a reused one),
    each followed by a switch to the new certificate on a persistent session: every QoS 1
    message published before, during and after the switches reaches a separate subscriber
    and the device's own subscription; the superseded certificate is revoked after the
    grace and the session on the new certificate stays up."""
    watcher = Client(lab.hub.port, lab.pki / "ca-chain.pem", lab.operator.cert,
                     lab.operator.key, "operator-1")
    try:
        assert watcher.connect() == 0
        assert watcher.subscribe(TOPIC) == [1]
        result = asyncio.run(_play(lab, lab.device.cert, lab.device.key, watcher))
    finally:
        watcher.close()
    assert result.stats.renewed == 2, result.stats
    assert result.stats.failed == 0, result.stats
    assert result.sent > 50
    everything = set(range(1, result.sent + 1))
    assert everything - result.watcher == set()
    assert everything - result.device_received == set()
    assert result.first_revoked is True
    assert result.still_connected is True
    with Authority(lab.pki) as authority:
        history = authority.registry.certificates(DEVICE)
    assert len(history) == 3
    assert len({row.public_key_sha256 for row in history}) == 3  # a new key each time


async def _burst_then_switch(lab: Lab, cert: Path, key: Path) -> tuple[int, int, set[int]]:
    """Renew once, then publish 150 QoS 1 messages at once and switch at the same moment:
    paho has most of them unacknowledged (20 in flight, the rest queued) when the old
    connection is closed. Returns (sent, carried over the switch, sequence numbers back).

    150, not more: the hub's publish_rate bucket holds 200 messages (2 s of 100/s) and the
    resent DUPs count against it; past it the hub acknowledges and drops (rate-limited)."""
    ca_pem = (lab.pki / "ca-chain.pem").read_text()
    received: set[int] = set()
    device = Device(BURST, client_context(ca_pem, Credentials(cert, key)), "127.0.0.1",
                    lab.hub.port, clean_session=False,
                    on_message=lambda _t, payload: received.add(_seq(payload)))
    assert (await device.connect(10)).accepted
    assert await device.subscribe([f"devices/{BURST}/telemetry"]) == [1]
    async with aiohttp.ClientSession() as session:
        renewed = await ESTRenewal(lab.ca.url, lab.pki / "ca-chain.pem", session).renew(
            BURST, cert, key, new_key())
    FileStore(cert, key).save(renewed)
    new_context = client_context(ca_pem, Credentials(cert, key))
    for seq in range(1, BURST_SIZE + 1):
        assert device.publish(f"devices/{BURST}/telemetry", b'{"seq":%d}' % seq)
    assert (await device.switch(new_context)).accepted
    deadline = time.monotonic() + 10
    while len(received) < device.sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await device.disconnect()
    return device.sent, device.carried, received


def test_qos1_messages_in_flight_at_the_switch_are_resent(lab: Lab) -> None:
    """The messages paho holds unacknowledged when the old connection closes (in flight or
    queued behind its in-flight window) go out on the new connection after the CONNACK, and
    every one comes back on the device's persistent subscription."""
    sent, carried, received = asyncio.run(_burst_then_switch(lab, lab.burst.cert,
                                                             lab.burst.key))
    assert sent == BURST_SIZE
    assert carried > BURST_SIZE // 2  # the switch really did have messages in flight
    assert set(range(1, BURST_SIZE + 1)) - received == set()


async def _lost_answer(lab: Lab) -> tuple[str, str, RenewalError]:
    """simplereenroll for key K whose answer the device never sees, then K again, then a
    new key; all with the current (now superseded) certificate."""
    cert, key = lab.lost.cert, lab.lost.key
    async with aiohttp.ClientSession() as session:
        est = ESTRenewal(lab.ca.url, lab.pki / "ca-chain.pem", session)
        k = new_key()
        first = await est.renew(LOST, cert, key, k)  # the answer "lost"
        again = await est.renew(LOST, cert, key, k)
        with pytest.raises(RenewalError) as refused:
            await est.renew(LOST, cert, key, new_key())
    return (format_serial(first.cert.serial_number), format_serial(again.cert.serial_number),
            refused.value)


def test_a_lost_answer_is_retried_with_the_same_key(lab: Lab) -> None:
    """Why the agent keeps the key of an attempt that got no answer: the CA has issued for
    it and superseded the current certificate, so the same key gets the same certificate
    back, while a new key is refused (403 renew-not-active), an answer, not to be retried
    with that key."""
    first, again, refused = asyncio.run(_lost_answer(lab))
    assert first == again
    assert refused.answered is True
    assert "403" in str(refused)
    assert "renew-not-active" in str(refused)
