"""Admission and eviction: every connect decision, and closing sessions that lose the right.

The checks run in DESIGN section 5's order once TLS has verified the chain: the certificate
names a device of the fleet's trust domain, it is not revoked or on hold and its device is
active, with ``[auth] registered_only`` its serial is one the registry or the feed lists for
that device (else ``unregistered``: signed by the issuing key, never recorded by the CA), then
the client id matches, then the optional password. Refusals are data (a reason
code), audited and counted, never exceptions.

Time comes from a :class:`Clock` (the wall clock, which certificates' not-after are in), and
each live connection is a :class:`Tracked` the gatekeeper can kick: tests drive admission,
eviction and expiry with in-memory fakes, without sleeping and without patching.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from hub.acl import AclPolicy
from hub.config import AuthConfig
from hub.identity import DeviceIdentity, IdentityProblem, identity_from_der
from hub.revocation import Snapshot, refusal, unregistered
from hub.tls import HandshakeRefusal
from provisioning.identity import verify_password

log = logging.getLogger("hub.gatekeeper")


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch (what a certificate's not-after is in)."""

    def time(self) -> float: ...


class SystemClock:
    """:func:`time.time`."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()


SYSTEM_CLOCK = SystemClock()
# What fleet_hub_certificates_expiring{within} counts (issue 14): a week to plan, a day to act.
EXPIRY_HORIZONS: Final = (("7d", 7 * 86400.0), ("1d", 86400.0))


class Tracked(Protocol):
    """A live connection the hub admitted (``hub.broker.connection.Connection``)."""

    @property
    def client_id(self) -> str: ...

    @property
    def identity(self) -> DeviceIdentity: ...

    @property
    def peer(self) -> str: ...

    async def kick(self, reason: str) -> None:
        """Close the connection; *reason* is the eviction's (revoked, expired...)."""


class SnapshotSource(Protocol):
    """The revocation watcher as the gatekeeper reads it: the current snapshot."""

    @property
    def snapshot(self) -> Snapshot: ...


class AuditSink(Protocol):
    """``hub.audit.AuditStore`` as the gatekeeper writes to it."""

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None) -> None: ...


class GateMetrics(Protocol):
    """The counters of ``hub.metrics.Metrics`` the gatekeeper moves."""

    def accepted(self) -> None: ...
    def refused(self, reason: str) -> None: ...
    def kicked(self, reason: str) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one CONNECT: accepted with an identity, or refused with a reason."""

    accepted: bool
    reason: str | None = None
    detail: str | None = None
    identity: DeviceIdentity | None = None
    group: str | None = None



class Gatekeeper:
    """Decides who gets in and throws out whoever stops qualifying."""

    def __init__(self, auth: AuthConfig, watcher: SnapshotSource, audit: AuditSink,
                 metrics: GateMetrics, trust_domain: str | None = None, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.auth = auth
        self._registered_only = auth.registered_only  # the connect path reads it per CONNECT
        self.clock = clock
        self.watcher = watcher
        self.audit = audit
        self.metrics = metrics
        # The fleet's SPIFFE trust domain (hub.trust), set when the runtime starts; while None
        # every certificate is refused: there is nothing to check its domain against.
        self.trust_domain = trust_domain
        self.live: dict[str, Tracked] = {}
        # Serials refused at this gateway until an operator clears them (hub.findings owns
        # the set and its file; the gatekeeper only reads it, one set lookup per CONNECT).
        self.quarantined: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- refusals before MQTT ---------------------------------------------------------------

    def handshake_refused(self, peer: str, refusal_: HandshakeRefusal) -> None:
        self._refuse(Decision(False, refusal_.reason, refusal_.detail, refusal_.identity), peer)

    # -- CONNECT ----------------------------------------------------------------------------

    async def admit(self, der: bytes | None, client_id: str, password: str | bytes | None,
                    peer: str, *, will_topic: str | None = None,
                    acl: AclPolicy | None = None) -> Decision:
        """Decide on a CONNECT from the certificate of *this* connection."""
        decision = await self._decide(der, client_id, password)
        if decision.accepted and will_topic is not None and acl is not None:
            assert decision.identity is not None  # noqa: S101
            if not acl.may_publish(decision.identity.device_id, decision.group, will_topic):
                decision = Decision(False, "will-denied", f"will topic {will_topic!r} is not "
                                    "allowed for this device", decision.identity, decision.group)
        if decision.accepted:
            assert decision.identity is not None  # noqa: S101
            self.audit.record("accept", device_id=decision.identity.device_id,
                              serial=decision.identity.serial_hex, peer=peer)
            self.metrics.accepted()
        else:
            self._refuse(decision, peer)
        return decision

    async def _decide(self, der: bytes | None, client_id: str,
                      password: str | bytes | None) -> Decision:
        found = identity_from_der(der)
        if isinstance(found, IdentityProblem):
            reason = "no-certificate" if der is None else "bad-identity"
            return Decision(False, reason, found.detail,
                            _unidentified(found.serial) if found.serial is not None else None)
        if found.trust_domain != self.trust_domain:
            # Before revocation: device ids are only unique within one trust domain, so the
            # registry's word on "x" says nothing about spiffe://other/device/x.
            return Decision(False, "wrong-trust-domain", f"certificate names trust domain "
                            f"{found.trust_domain!r}, the fleet's is {self.trust_domain!r}",
                            found)
        snapshot = self.watcher.snapshot
        refused = refusal(snapshot, found.serial, found.device_id)
        group = _group(snapshot, found.device_id)
        if refused is not None:
            return Decision(False, refused, f"device {found.device_id} serial "
                            f"{found.serial_hex} is {refused}", found, group)
        if found.serial in self.quarantined:
            return Decision(False, "quarantined", f"serial {found.serial_hex} is quarantined "
                            "at this gateway (fleet-hub quarantine list)", found, group)
        if self._registered_only and unregistered(snapshot, found.serial, found.device_id):
            return Decision(False, "unregistered", f"serial {found.serial_hex} is not one the "
                            f"registry or the feed lists for device {found.device_id}", found,
                            group)
        if self.clock.time() >= found.not_after:
            return Decision(False, "expired", "certificate expired", found, group)
        if client_id != found.device_id:
            return Decision(False, "client-id-mismatch", f"client id {client_id!r} is not the "
                            f"certificate's device {found.device_id!r}", found, group)
        if self.auth.password:
            problem = await self._password_problem(snapshot, found.device_id, password)
            if problem is not None:
                return Decision(False, "bad-password", problem, found, group)
        return Decision(True, identity=found, group=group)

    async def _password_problem(self, snapshot: Snapshot, device_id: str,
                                password: str | bytes | None) -> str | None:
        stored = snapshot.password_hashes.get(device_id)
        if stored is None:
            return "no password is set for this device in the registry"
        if password is None:
            return "CONNECT carried no password"
        # The exact bytes the client sent, or no match: a lenient decode would let bytes that
        # were never the secret stand in for it.
        try:
            wire = password.encode("utf-8") if isinstance(password, str) else password
            secret = wire.decode("utf-8")
        except UnicodeError:
            return "password is not UTF-8: no secret set in the registry has these bytes"
        if wire.endswith(b"\0"):
            # scrypt keys HMAC-SHA256 with the password, and HMAC pads a key with zero bytes:
            # "secret" and "secret\0" hash alike, so the hash alone cannot refuse this one.
            return "password ends with a NUL byte: it is not the secret set in the registry"
        # scrypt costs ~50 ms of CPU: never on the event loop.
        ok = await asyncio.to_thread(verify_password, secret, stored)
        return None if ok else "password does not match"

    def _refuse(self, decision: Decision, peer: str) -> None:
        identity = decision.identity
        self.audit.record("reject", device_id=(identity.device_id or None) if identity else None,
                          serial=identity.serial_hex if identity else None, peer=peer,
                          reason=decision.reason)
        self.metrics.refused(decision.reason or "unknown")
        log.info("refused %s: %s (%s)", peer, decision.reason, decision.detail)

    # -- live sessions ----------------------------------------------------------------------

    def attach(self, session: Tracked) -> None:
        """Track an admitted connection; :meth:`sweep` closes it at its certificate's
        not-after. A client id has one tracked connection: the broker detaches the old one
        before a take-over."""
        self.live[session.client_id] = session
        self.metrics.connection_opened()
        # The decision was taken on an earlier snapshot: a revocation that landed between
        # the check and now would otherwise never reach this session.
        reason = self.lost(self.watcher.snapshot, session.identity)
        if reason is not None:
            self.evict(session, reason)

    def detach(self, client_id: str, session: Tracked | None = None) -> None:
        current = self.live.get(client_id)
        if current is None or (session is not None and current is not session):
            return
        del self.live[client_id]
        self.metrics.connection_closed()

    def expiring(self, horizons: Sequence[tuple[str, float]] = EXPIRY_HORIZONS
                 ) -> dict[str, int]:
        """How many live sessions' certificates expire within each horizon (label, seconds)
        from now: one pass over the sessions when asked (a scrape), nothing on the connect
        path. A certificate already past its not-after, not yet swept, counts in each."""
        now = self.clock.time()
        counts = dict.fromkeys((label for label, _ in horizons), 0)
        for session in list(self.live.values()):
            left = session.identity.not_after - now
            for label, seconds in horizons:
                if left <= seconds:
                    counts[label] += 1
        return counts

    def sweep(self) -> None:
        """Close every live session whose certificate has expired (called about twice a second:
        one pass over the sessions costs less than a timer object per session)."""
        now = self.clock.time()
        expired = [s for s in self.live.values() if now >= s.identity.not_after]
        for session in expired:
            self.evict(session, "expired")

    def revocation_changed(self, _old: Snapshot, new: Snapshot) -> None:
        """Close every live session whose certificate or device lost the right, at once (with
        ``registered_only``, also one whose serial is no longer listed)."""
        for session in list(self.live.values()):
            reason = self.lost(new, session.identity)
            if reason is not None:
                self.evict(session, reason)

    def lost(self, snapshot: Snapshot, identity: DeviceIdentity) -> str | None:
        """Why a live session on *identity* may not stay; None when it may."""
        reason = refusal(snapshot, identity.serial, identity.device_id)
        if reason is None and identity.serial in self.quarantined:
            return "quarantined"
        if reason is None and self._registered_only and unregistered(
                snapshot, identity.serial, identity.device_id):
            return "unregistered"
        return reason

    def evict(self, session: Tracked, reason: str) -> None:
        """Close *session* (if it is still the tracked one of its client id): audited kick."""
        if self.live.get(session.client_id) is not session:
            return
        self.detach(session.client_id, session)
        self.audit.record("kick", device_id=session.identity.device_id,
                          serial=session.identity.serial_hex, peer=session.peer, reason=reason)
        self.metrics.kicked(reason)
        log.warning("closing %s (%s): %s", session.client_id, session.peer, reason)
        task = asyncio.get_running_loop().create_task(session.kick(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _unidentified(serial: int) -> DeviceIdentity:
    return DeviceIdentity("", serial, 0.0, "")


def _group(snapshot: Snapshot, device_id: str) -> str | None:
    return snapshot.groups.get(device_id)
