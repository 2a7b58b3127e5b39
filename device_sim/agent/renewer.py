"""The renewal loop of one device: wait, renew (retrying), store, switch; for ever.

::

    loop:
        sleep until schedule.renew_time(current certificate)
        try EST simplereenroll with a new key (the same one again after an attempt that got
            no answer); on failure count it, back off, try again,
            but start no attempt after schedule.give_up_at(current): the certificate ends,
            the broker closes the session, and the device needs its factory path again
        store the new key and certificate (before using them: a reboot must come back with
            the identity the CA now considers current; the old one is superseded)
        switch: reconnect to the broker with the new certificate, same client id, persistent
            session, so the broker keeps the subscriptions and queued messages and the client
            resends its unacknowledged QoS 1 messages; on failure count it and try again
        the old certificate is revoked by the CA after its grace (renew_grace): the switch
            must happen well within it

What is specific to a device (how it talks EST, where it keeps its key, how its MQTT client
reconnects) comes in through three small interfaces: :class:`Renewal`, :class:`Store` and a
``switch`` coroutine. The loop itself is what a firmware port keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509

from device_sim import factory
from device_sim.agent.est import Renewed
from device_sim.agent.schedule import Schedule, Validity
from device_sim.errors import RenewalError

SWITCH_ATTEMPTS = 5


class Renewal(Protocol):
    async def renew(self, device_id: str, cert: Path, key: Path,
                    new_key: factory.DevicePrivateKey) -> Renewed:
        """A certificate for *new_key*, authenticated by the current ones; RenewalError."""
        ...


class Store(Protocol):
    cert: Path
    key: Path

    def save(self, renewed: Renewed) -> None:
        """Keep the new identity where :attr:`cert` and :attr:`key` point."""
        ...


Switch = Callable[[], Awaitable[str | None]]
"""Reconnect with the identity just stored: None when the broker accepted it, else why not."""


def serial_text(serial: int) -> str:
    """Lowercase hex in whole octets, as the registry and ``fleet-provision`` print it."""
    text = format(serial, "x")
    return text if len(text) % 2 == 0 else "0" + text


def validity_of(cert: x509.Certificate) -> Validity:
    return Validity(cert.not_valid_before_utc, cert.not_valid_after_utc,
                    serial_text(cert.serial_number))


def read_validity(path: Path) -> Validity:
    """The validity of the first certificate in *path* (the device's own)."""
    return validity_of(x509.load_pem_x509_certificates(path.read_bytes())[0])


@dataclass
class FileStore:
    """Key and certificate files, each replaced whole (a temporary file renamed over it).

    The key is replaced first, then the certificate: a crash in between leaves a pair that
    does not match, which the device must detect at boot. A real device keeps two slots and
    flips a pointer once both are written.
    """

    cert: Path
    key: Path

    def save(self, renewed: Renewed) -> None:
        factory.write_key(self.key, renewed.key)
        tmp = self.cert.with_name(f".{self.cert.name}.tmp")
        tmp.write_bytes(renewed.chain_pem)
        tmp.replace(self.cert)


@dataclass
class Stats:
    """What the agent did: each successful renewal, each failed attempt, the serials it
    left behind (superseded at the CA, revoked once their grace ends)."""

    renewed: int = 0
    renewed_at: list[float] = field(default_factory=list)  # epoch seconds of each switch
    failed: int = 0
    superseded: list[str] = field(default_factory=list)
    last_error: str | None = None


class Renewer:
    """The renewal loop of one device (see the module docstring)."""

    def __init__(self, device_id: str, schedule: Schedule, renewal: Renewal, store: Store,
                 switch: Switch, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.device_id = device_id
        self.schedule = schedule
        self.renewal = renewal
        self.store = store
        self.switch = switch
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.stats = Stats()
        self.rng = random.Random(f"{schedule.seed}:{device_id}:retry")  # noqa: S311
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """End the loop at its next wait (an attempt under way is finished first)."""
        self._stopping.set()

    async def _sleep_until(self, when: dt.datetime) -> bool:
        """Until *when* (wall clock); False when stopped first."""
        delay = (when - self.clock()).total_seconds()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return not self._stopping.is_set()

    def _failed(self, why: str) -> None:
        self.stats.failed += 1
        self.stats.last_error = why

    async def run(self) -> None:
        """Renew each certificate in turn until stopped or a renewal cannot be done in time."""
        while True:
            current = read_validity(self.store.cert)
            if not await self._sleep_until(self.schedule.renew_time(self.device_id, current)):
                return
            renewed = await self._renew(current)
            if renewed is None:
                return
            self.store.save(renewed)
            self.stats.superseded.append(current.serial)
            if not await self._switch(validity_of(renewed.cert)):
                return
            self.stats.renewed += 1
            self.stats.renewed_at.append(self.clock().timestamp())

    async def _renew(self, current: Validity) -> Renewed | None:
        """EST with retries and backoff; None when stopped or past the last useful moment.

        A new key for each attempt, except after one that got no answer: the CA may have
        issued for that key (and superseded the current certificate), and answers the same
        key with that certificate again, where a new key would be refused."""
        attempt = 0
        new_key: factory.DevicePrivateKey | None = None
        while self.clock() < self.schedule.give_up_at(current):
            new_key = new_key or factory.new_key()
            try:
                return await self.renewal.renew(self.device_id, self.store.cert,
                                                self.store.key, new_key)
            except RenewalError as exc:
                self._failed(str(exc))
                if exc.answered:
                    new_key = None
            delay = self.schedule.retry_delay(attempt, current, self.rng)
            attempt += 1
            if not await self._sleep_until(self.clock() + delay):
                return None
        return None

    async def _switch(self, new: Validity) -> bool:
        """Reconnect with the new identity, a few times with backoff; False: gave up."""
        for attempt in range(SWITCH_ATTEMPTS):
            why = await self.switch()
            if why is None:
                return True
            self._failed(f"switch: {why}")
            if not await self._sleep_until(
                    self.clock() + self.schedule.retry_delay(attempt, new, self.rng)):
                return False
        return False
