"""The ``client_ca`` bundle, re-read when its file changes: issuing-CA rotation without a restart.

DESIGN section 10: during an issuing-CA rotation ``ca-chain.pem`` carries the old and the new
intermediate, and hubs admit both without a restart. :class:`BundleWatcher` looks at the
file's (device, inode, mtime, size) every :data:`CHECK_SECONDS` in a worker thread (one
``stat``), and at once when asked (SIGHUP). A changed file is read and checked off the loop
(:func:`parse_bundle`: at least one PEM certificate, every one a CA), then each user prepares
what it needs from those bytes, still off the loop (the listener builds its ``SSLContext``:
from the bytes checked, not from the file, which may have changed again meanwhile). Only when
every user is ready does the new bundle go in force, on the loop, each user in one step: the
listener's context for new handshakes (live connections keep theirs), the CRL verifier's CAs,
the feed verifier's signers. Nothing is added to the connect path: a handshake reads the
listener's current context, as before.

A bundle that fails any of that is refused: one WARNING and one audit ``source`` event
(``client_ca refused: <why>``) per refused file version, counted; the bundle in force stays.
A file rewritten with the same certificates changes nothing (no new generation).

With a fleet-state feed, the bundle in force is ``client_ca`` composed with the issuing CAs
the feed names (:meth:`BundleWatcher.announce`, :func:`hub.revocation.feed_issuers.compose`):
an intermediate made by ``issuing-ca rotate`` is trusted and admitted as soon as the feed
names it, and one retired (no longer named) stops being trusted even while ``client_ca``
still lists it. The same path puts it in force: a new generation, every user prepared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hub.errors import BundleError
from hub.issuers import ANY_UNDER_ROOT, allowed_issuers, describe
from hub.revocation.feed_issuers import compose
from hub.tasks import cancel_and_wait

__all__ = ["CHECK_SECONDS", "Bundle", "BundleStatus", "BundleWatcher", "Prepare",
           "parse_bundle"]

log = logging.getLogger("hub.cabundle")

CHECK_SECONDS: Final = 1.0
FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size
_MISSING: Final[FileKey] = (-1, -1, -1, -1)


@dataclass(frozen=True, slots=True)
class Bundle:
    """One version of the bundle: its certificates, as PEM text (``cadata``), and its
    generation (1 at start, +1 for every changed bundle put in force)."""

    certificates: tuple[x509.Certificate, ...]
    pem: str
    generation: int

    @classmethod
    def of(cls, certificates: Sequence[x509.Certificate], generation: int) -> Bundle:
        pem = "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in certificates)
        return cls(tuple(certificates), pem, generation)

    def same_certificates(self, other: Sequence[x509.Certificate]) -> bool:
        return [c.public_bytes(Encoding.DER) for c in self.certificates] == \
            [c.public_bytes(Encoding.DER) for c in other]


@dataclass(frozen=True, slots=True)
class BundleStatus:
    """The bundle in force and the last refusal, for /healthz and /metrics."""

    path: str
    generation: int
    certificates: int
    loaded_at: float  # time.time() the bundle in force was put in force
    refused: int  # changed bundles refused since start
    last_error: str | None  # why the last changed bundle was refused; None since a good one

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "generation": self.generation,
                "certificates": self.certificates, "loaded_at": self.loaded_at,
                "refused": self.refused, "last_error": self.last_error}


# Run in a worker thread with a bundle that passed parse_bundle: everything that may fail or
# cost CPU (raise BundleError, OSError, ssl.SSLError or ValueError to refuse the bundle);
# returns the step that puts it in force, run on the loop.
Prepare = Callable[[Bundle], Callable[[], None]]


class AuditSink(Protocol):
    """``hub.audit.AuditStore`` as the watcher writes to it."""

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None) -> None: ...


def _is_ca(cert: x509.Certificate) -> bool:
    with contextlib.suppress(x509.ExtensionNotFound):
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    return False


def parse_bundle(data: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates of a bundle's bytes; BundleError unless there is at least one and
    every one is a CA (a device or server certificate in ``client_ca`` would be a trust
    anchor: with partial chains, anything it signed, or it itself, would verify)."""
    if not data.strip():
        raise BundleError("the file is empty")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(f"no PEM certificate could be read: {exc}") from None
    for cert in certs:
        if not _is_ca(cert):
            raise BundleError(f"{cert.subject.rfc4514_string()!r} is not a CA certificate "
                              "(BasicConstraints ca=TRUE)")
    return tuple(certs)


def _tell_issuers(bundle: Bundle) -> None:
    """Which intermediates may issue devices now; a WARNING when the trust holds a root only."""
    text = describe(bundle.certificates)
    if allowed_issuers(bundle.certificates) is ANY_UNDER_ROOT:
        log.warning("client_ca: %s; put the issuing CA(s) in client_ca to admit only theirs",
                    text)
    else:
        log.info("client_ca: %s", text)


def _key(path: Path) -> FileKey:
    try:
        st = path.stat()
    except FileNotFoundError:
        return _MISSING
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class _Ready:
    bundle: Bundle
    commits: tuple[Callable[[], None], ...]


@dataclass(frozen=True, slots=True)
class _Same:
    """The file changed, its certificates did not."""


class BundleWatcher:
    """Watches ``client_ca`` and puts a changed, valid bundle in force for every user."""

    def __init__(self, path: Path, load: Callable[[Path], Sequence[x509.Certificate]], *,
                 audit: AuditSink | None = None, interval: float = CHECK_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        """The initial bundle is *load(path)* (its errors propagate: no bundle, no start)."""
        self.path = path
        # The file's key before it is read: a change made meanwhile is seen at the first check.
        self._seen = _key(path)
        self._configured = tuple(load(path))  # client_ca's own certificates in force
        self._announced: Sequence[x509.Certificate] | None = None  # the feed's issuers
        self._announce_pending = False
        self._bundle = Bundle.of(self._configured, 1)
        _tell_issuers(self._bundle)
        self._loaded_at = clock()
        self._clock = clock
        self._audit = audit
        self._interval = interval
        self._users: list[Prepare] = []
        self._refused = 0
        self._last_error: str | None = None
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def bundle(self) -> Bundle:
        """The bundle in force."""
        return self._bundle

    def subscribe(self, prepare: Prepare) -> None:
        """*prepare* takes part in every later change (see :data:`Prepare`)."""
        self._users.append(prepare)

    def status(self) -> BundleStatus:
        return BundleStatus(str(self.path), self._bundle.generation,
                            len(self._bundle.certificates), self._loaded_at, self._refused,
                            self._last_error)

    def start(self) -> None:
        """Check every *interval* seconds in one task until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="hub client_ca watcher")

    def check_soon(self) -> None:
        """Check now (SIGHUP) rather than at the next interval."""
        self._poke.set()

    def announce(self, issuers: Sequence[x509.Certificate] | None) -> None:
        """The feed's verified issuing CAs changed (None: it names none): recompose the
        bundle now (on the loop; the work is done by the watcher's task)."""
        self._announced = None if issuers is None else tuple(issuers)
        self._announce_pending = True
        self._poke.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self._interval)
            self._poke.clear()
            try:
                await self.check()
            except Exception:  # the watcher must outlive any bug, or rotation would stop
                log.exception("client_ca check failed")

    async def check(self) -> bool:
        """Look at the file once (and at a pending announcement); True when a new bundle was
        put in force."""
        async with self._lock:
            key = await asyncio.to_thread(_key, self.path)
            changed = key != self._seen
            if not changed and not self._announce_pending:
                return False
            announced, pending, self._announce_pending = self._announced, \
                self._announce_pending, False
            try:
                configured, outcome = await asyncio.to_thread(
                    self._prepare, self._bundle, None if changed else self._configured,
                    announced)
            except (BundleError, OSError, ssl.SSLError, ValueError) as exc:
                if changed:
                    self._refuse(key, exc)
                    # Compose the feed's news with the bundle in force at the next look.
                    self._announce_pending = pending
                else:
                    self._refuse_issuers(exc)
                return False
            self._seen, self._configured = key, configured
            if isinstance(outcome, _Same):
                return False
            for commit in outcome.commits:
                commit()
            self._bundle, self._loaded_at = outcome.bundle, self._clock()
            self._last_error = None
            what = "client_ca reloaded" if changed else "trust changed by the feed's issuers"
            text = (f"{what}: generation {outcome.bundle.generation}, "
                    f"{len(outcome.bundle.certificates)} certificates")
            log.warning("%s from %s; new handshakes use it", text, self.path)
            _tell_issuers(outcome.bundle)
            if self._audit is not None:
                self._audit.record("source", reason=text)
            return True

    def _prepare(self, current: Bundle, configured: tuple[x509.Certificate, ...] | None,
                 announced: Sequence[x509.Certificate] | None
                 ) -> tuple[tuple[x509.Certificate, ...], _Ready | _Same]:
        """Worker thread: read and check the file (unless *configured* is given: it did not
        change), compose with the feed's issuers, let every user prepare."""
        if configured is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise BundleError(f"cannot read it: {exc.strerror or exc}") from None
            configured = parse_bundle(data)
        certs = compose(configured, announced)
        if current.same_certificates(certs):
            return configured, _Same()
        bundle = Bundle.of(certs, current.generation + 1)
        return configured, _Ready(bundle, tuple(prepare(bundle) for prepare in self._users))

    def _refuse_issuers(self, exc: BaseException) -> None:
        """The feed's issuers could not be put in force (a user could not prepare them)."""
        why = " ".join(str(exc).split()) or type(exc).__name__
        self._refused += 1
        self._last_error = f"feed issuers: {why}"
        log.warning("the feed's issuers cannot be put in force, keeping generation %d: %s",
                    self._bundle.generation, why)
        if self._audit is not None:
            self._audit.record("source", reason=f"feed issuers refused: {why}")

    def _refuse(self, key: FileKey, exc: BaseException) -> None:
        """Once per refused file version: the next look sees the same key and moves on."""
        self._seen = key
        self._refused += 1
        why = " ".join(str(exc).split()) or type(exc).__name__
        self._last_error = why
        log.warning("client_ca %s refused, keeping generation %d (%d certificates): %s",
                    self.path, self._bundle.generation, len(self._bundle.certificates), why)
        if self._audit is not None:
            self._audit.record("source", reason=f"client_ca refused: {why}")
