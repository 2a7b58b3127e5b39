"""The device agent's loop with a stand-in CA and connection: what it retries, with which
key, what it counts, what it stores before it switches."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from device_sim import factory
from device_sim.agent import FileStore, Renewed, Renewer, Schedule, read_validity
from device_sim.errors import RenewalError

FAST = Schedule(renew_at=0.1, jitter=0.0, retry_base=dt.timedelta(milliseconds=5))


def _cert(key: factory.DevicePrivateKey, start: dt.datetime, life: dt.timedelta,
          ) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + life)
            .sign(key, hashes.SHA256()))


def _second() -> dt.datetime:
    """Now, to the second: certificate times have no fractions."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _device(tmp_path: Path) -> FileStore:
    """A device whose certificate (20 s) is due for renewal at once (0.1 of its life)."""
    key = factory.new_key()
    cert = _cert(key, _second() - dt.timedelta(seconds=2), dt.timedelta(seconds=20))
    store = FileStore(tmp_path / "dev-1.pem", tmp_path / "dev-1.key")
    store.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    factory.write_key(store.key, key)
    return store


class ScriptedCA:
    """Answers each renewal as scripted: an exception, or a certificate (an hour long) for
    the key sent; records the keys it was sent."""

    def __init__(self, *script: RenewalError | None) -> None:
        self.script = list(script)
        self.keys: list[bytes] = []

    async def renew(self, device_id: str, cert: Path, key: Path,
                    new_key: factory.DevicePrivateKey) -> Renewed:
        assert device_id == "dev-1"
        assert cert.is_file()
        assert key.is_file()
        self.keys.append(factory.key_pem(new_key))
        step = self.script.pop(0)
        if step is not None:
            raise step
        issued = _cert(new_key, dt.datetime.now(dt.UTC), dt.timedelta(hours=1))
        return Renewed(issued, issued.public_bytes(serialization.Encoding.PEM), new_key)


async def _run(store: FileStore, ca: ScriptedCA, switches: list[str | None],
               ) -> tuple[Renewer, list[str]]:
    """Run the loop until it has renewed once (or gave up); the serial it saw at each
    switch (the store must hold the new certificate before the switch)."""
    seen: list[str] = []

    async def switch() -> str | None:
        seen.append(read_validity(store.cert).serial)
        return switches.pop(0)

    renewer = Renewer("dev-1", FAST, ca, store, switch)
    task = asyncio.create_task(renewer.run())
    async with asyncio.timeout(10):
        while renewer.stats.renewed == 0 and not task.done():
            await asyncio.sleep(0.005)
    renewer.stop()
    await task
    return renewer, seen


def test_no_answer_retries_the_same_key_a_refusal_a_new_one(tmp_path: Path) -> None:
    """After an attempt that got no answer the same key is sent again (the CA may have
    issued for it); after a refusal (an answer) a new key. Both failures are counted; the
    success is stored, then switched to; the old serial is listed as superseded."""
    store = _device(tmp_path)
    old = read_validity(store.cert).serial
    ca = ScriptedCA(RenewalError("timed out", answered=False),
                    RenewalError("HTTP 400: renew-key-reused", answered=True), None)
    renewer, seen = asyncio.run(_run(store, ca, [None]))
    assert ca.keys[0] == ca.keys[1] != ca.keys[2]
    assert renewer.stats.failed == 2
    assert renewer.stats.last_error == "HTTP 400: renew-key-reused"
    assert renewer.stats.renewed == 1
    assert renewer.stats.superseded == [old]
    new = read_validity(store.cert)
    assert seen == [new.serial]
    assert new.serial != old
    assert factory.key_pem(factory.load_key(store.key)) == ca.keys[2]


def test_a_refused_switch_is_counted_and_retried(tmp_path: Path) -> None:
    """The broker refusing the new certificate is a failed attempt, retried with backoff
    (the certificate is not renewed again)."""
    store = _device(tmp_path)
    ca = ScriptedCA(None)
    renewer, seen = asyncio.run(_run(store, ca, ["refused: CONNACK 5", "closed", None]))
    assert len(ca.keys) == 1
    assert renewer.stats.failed == 2
    assert renewer.stats.renewed == 1
    assert len(set(seen)) == 1
    assert len(seen) == 3


def test_gives_up_before_not_after(tmp_path: Path) -> None:
    """A CA that never answers: attempts stop once not_after - lifetime/50 is reached,
    each one counted, and the loop ends (the broker will close the session at expiry)."""
    key = factory.new_key()
    # Not-after 1 to 2 s from now: attempts from now until 0.14 s before it.
    cert = _cert(key, _second() - dt.timedelta(seconds=5), dt.timedelta(seconds=7))
    store = FileStore(tmp_path / "dev-1.pem", tmp_path / "dev-1.key")
    store.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    factory.write_key(store.key, key)
    ca = ScriptedCA(*[RenewalError("down", answered=False)] * 1000)
    renewer, seen = asyncio.run(_run(store, ca, []))
    assert renewer.stats.renewed == 0
    assert renewer.stats.failed == len(ca.keys) > 0
    assert dt.datetime.now(dt.UTC) >= cert.not_valid_after_utc - dt.timedelta(seconds=0.14)
    assert seen == []
