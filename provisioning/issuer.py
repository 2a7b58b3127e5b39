"""Batch issuance: CSRs in, certificates out, each in the registry, on disk and in the log.

Signing is CPU work done outside any transaction; the registry is written once per chunk in a
single ``BEGIN IMMEDIATE`` transaction that re-checks every decision under the write lock, so
concurrent ``sign`` processes neither duplicate nor lose anything. Output files are promised
in ``pending_outputs`` inside that transaction and written right after the commit; a crash in
between is finished by the next ``sign`` (:func:`finish_pending_outputs`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from provisioning.config import PKIConfig
from provisioning.csr import CSRFormatError, CSRInput, parse_csr
from provisioning.errors import OutputError
from provisioning.fsutil import atomic_write
from provisioning.identity import serial_hex as serial_hex  # noqa: PLC0414 (re-export)
from provisioning.pki import IssuingCA
from provisioning.policy import CSRContext, check
from provisioning.profile import IssuablePublicKey, device_certificate, random_serial, validity
from provisioning.registry import IN_BATCH, Registry, Transaction, operator
from provisioning.timefmt import iso, utcnow

CHUNK = 256
Status = Literal["issued", "existing", "rejected"]


@dataclass(frozen=True)
class SignResult:
    """The outcome for one CSR, as ``sign --json`` prints it."""

    source: str
    device_id: str | None
    status: Status
    serial: str | None = None
    reason: str | None = None
    # The certificate (PEM) for "issued" and "existing": what the enrollment service returns.
    pem: str | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "device_id": self.device_id, "status": self.status,
                "serial": self.serial, "reason": self.reason}


@dataclass(frozen=True)
class SignOptions:
    manifest: frozenset[str] | None = None
    group: str | None = None
    days: int | None = None
    out_dir: Path | None = None
    renew: bool = False


@dataclass
class _Candidate:
    source: str
    device_id: str
    key_sha256: str
    public_key: IssuablePublicKey
    actor: str | None = None
    renews: str | None = None
    cert: x509.Certificate | None = None
    result: SignResult | None = None
    pem: str = field(default="")


def public_key_sha256(public_key: IssuablePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def parse_serial(text: str) -> int | None:
    """Accept what operators paste: any case, with or without ':' separators or 0x."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return int(cleaned, 16) if cleaned else None
    except ValueError:
        return None


def output_bytes(cert_pem: str, ca: IssuingCA) -> bytes:
    """``OUT/<device-id>.pem``: the device certificate followed by the issuing CA."""
    return cert_pem.encode("ascii") + ca.chain_pem


class Issuer:
    """Signs CSRs for one PKI; ``progress`` is told after every committed chunk."""

    def __init__(self, registry: Registry, ca: IssuingCA, config: PKIConfig,
                 actor: str | None = None) -> None:
        self.actor = actor or operator()
        self.registry = registry
        self.ca = ca
        self.config = config

    def sign(self, inputs: list[CSRInput], options: SignOptions,
             progress: Callable[[list[SignResult]], None] | None = None,
             in_transaction: Callable[[Transaction], None] | None = None) -> list[SignResult]:
        """Issue per chunk; *in_transaction* also writes into each chunk's transaction.

        The enrollment service passes its queued audit events that way, so a busy batch
        costs one commit instead of two.
        """
        self.finish_pending_outputs()
        if options.out_dir is not None:
            options.out_dir.mkdir(parents=True, exist_ok=True)
        results: list[SignResult] = []
        # The files of a chunk are written right after its commit, in this thread: a writer
        # thread would wait for the GIL between every syscall while signing holds it. Their
        # promises are cleared in the next chunk's transaction, saving a commit per chunk.
        written: list[Path] = []
        for start in range(0, len(inputs), CHUNK):
            chunk, writes = self._sign_chunk(inputs[start:start + CHUNK], options,
                                             in_transaction, written)
            written = self._write_files(writes)
            results.extend(chunk)
            if progress is not None:
                progress(chunk)
        self._clear_promises(written)
        return results

    def _sign_chunk(self, inputs: list[CSRInput], options: SignOptions,
                    in_transaction: Callable[[Transaction], None] | None = None,
                    written: list[Path] | None = None,
                    ) -> tuple[list[SignResult], list[tuple[Path, str]]]:
        now = utcnow()
        slots: list[SignResult | _Candidate] = [self._screen(item, options) for item in inputs]
        candidates = [s for s in slots if isinstance(s, _Candidate)]
        known = self.registry.known_keys([(c.device_id, c.key_sha256) for c in candidates])
        days = options.days or self.config.default_days
        not_before, not_after = validity(self.ca, days, now)
        for cand in candidates:
            if (cand.device_id, cand.key_sha256) not in known or cand.renews is not None:
                self._mint(cand, not_before, not_after)
        writes: list[tuple[Path, str]] = []
        with self.registry.write(actor=self.actor) as tx:
            view = _ChunkView(tx, [c.device_id for c in candidates])
            for cand in candidates:
                self._record(tx, view, cand, options, now, writes)
            view.flush()
            if in_transaction is not None:
                in_transaction(tx)
            if written:
                tx.executemany("DELETE FROM pending_outputs WHERE path = ?",
                               [(str(p),) for p in written])
        return [s if isinstance(s, SignResult) else _result(s) for s in slots], writes

    def _screen(self, item: CSRInput, options: SignOptions) -> SignResult | _Candidate:
        try:
            csr = parse_csr(item.data)
        except CSRFormatError as exc:
            return SignResult(item.source, None, "rejected", reason=str(exc))
        ctx = CSRContext(csr, self.config.trust_domain, options.manifest)
        rejection = check(ctx)
        device_id = _cn_or_none(ctx)
        if rejection is not None:
            return SignResult(item.source, device_id, "rejected", reason=str(rejection))
        public_key = cast("IssuablePublicKey", ctx.public_key)  # key_type_allowed checked it
        assert device_id is not None  # cn_is_device_id accepted it  # noqa: S101
        return _Candidate(item.source, device_id, public_key_sha256(public_key), public_key,
                          actor=item.actor, renews=item.renews)

    def _mint(self, cand: _Candidate, not_before: dt.datetime, not_after: dt.datetime) -> None:
        cand.cert = device_certificate(self.ca, self.config, cand.device_id, cand.public_key,
                                       random_serial(), not_before, not_after)
        cand.pem = cand.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def _record(self, tx: Transaction, view: _ChunkView, cand: _Candidate,
                options: SignOptions, now: dt.datetime,
                writes: list[tuple[Path, str]]) -> None:
        """Decide under the write lock; the read-only pre-check may be stale."""
        device = view.devices.get(cand.device_id)
        if device is not None and device[0] != "active":
            cand.result = _reject(cand, f"device-{device[0]}: device {cand.device_id!r} is "
                                  f"{device[0]}; want an active device")
            return
        if cand.renews is not None and not self._renewable(tx, cand):
            return
        same = view.newest_with_key(cand.device_id, cand.key_sha256)
        # RFC 7030 4.2.2: re-enrolling with the key of the certificate being renewed renews
        # it. A retry after that renewal finds the newer certificate first: "existing".
        if same is not None and same[0] == cand.renews:
            same = None
        if same is not None:
            serial, status, pem = same
            if status in ("revoked", "on_hold"):
                cand.result = _reject(cand, f"key-{status.replace('_', '-')}: the certificate "
                                      f"for this key ({serial}) is {status}; make a new key")
                return
            cand.result = SignResult(cand.source, cand.device_id, "existing", serial, pem=pem)
            self._promise(view, options, cand.device_id, serial, pem, writes)
            return
        current = view.live_serials(cand.device_id)
        if current and not options.renew:
            cand.result = _reject(cand, f"has-certificate: device {cand.device_id!r} already "
                                  f"has active certificate {current[0]} for another key; "
                                  "use --renew (EST: simplereenroll) to replace it")
            return
        if cand.cert is None:  # the pre-check saw this key, but it has gone since: mint now
            self._mint(cand, *validity(self.ca, options.days or self.config.default_days, now))
        assert cand.cert is not None  # noqa: S101
        stamp = iso(now)
        if device is None:
            view.add_device(cand.device_id, options.group, stamp)
            tx.audit(stamp, "device.create", cand.device_id, None, {"group": options.group},
                     actor=cand.actor)
        elif options.group is not None and device[1] != options.group:
            view.flush()  # the device row may be one of this chunk's pending inserts
            tx.execute('UPDATE devices SET "group" = ?, updated_at = ? WHERE device_id = ?',
                       (options.group, stamp, cand.device_id))
            view.devices[cand.device_id] = ("active", options.group)
            tx.audit(stamp, "device.group", cand.device_id, None,
                     {"from": device[1], "to": options.group}, actor=cand.actor)
        for old in current:
            tx.execute("UPDATE certificates SET status = 'superseded' WHERE serial = ?", (old,))
            view.set_status(cand.device_id, old, "superseded")
            tx.audit(stamp, "certificate.supersede", cand.device_id, old, {"by": "renewal"},
                     actor=cand.actor)
        view.flush()  # the certificate row refers to the device row
        serial = self._insert(tx, cand, stamp)
        view.add_certificate(cand.device_id, serial, cand.key_sha256, cand.pem)
        tx.audit(stamp, "certificate.issue", cand.device_id, serial,
                 {"source": cand.source, "renewal": bool(current),
                  "not_after": iso(cand.cert.not_valid_after_utc)}, actor=cand.actor)
        cand.result = SignResult(cand.source, cand.device_id, "issued", serial, pem=cand.pem)
        self._promise(view, options, cand.device_id, serial, cand.pem, writes)

    @staticmethod
    def _renewable(tx: Transaction, cand: _Candidate) -> bool:
        """Re-checked under the write lock: the renewed certificate is the device's and live."""
        row = tx.execute("SELECT device_id, status FROM certificates WHERE serial = ?",
                         (cand.renews,)).fetchone()
        if row is None:
            cand.result = _reject(cand, f"renew-unknown: certificate {cand.renews} is not in "
                                  "the registry")
        elif row[0] != cand.device_id:
            cand.result = _reject(cand, f"device-mismatch: the CSR names {cand.device_id!r}, "
                                  f"the certificate being renewed names {row[0]!r}; want the "
                                  "same device id")
        elif row[1] in ("revoked", "on_hold"):
            cand.result = _reject(cand, f"renew-{row[1].replace('_', '-')}: certificate "
                                  f"{cand.renews} is {row[1]}; it cannot be renewed")
        return cand.result is None

    def _insert(self, tx: Transaction, cand: _Candidate, stamp: str) -> str:
        """Insert the row; a serial collision (2^-159 odds) is re-minted, never reused."""
        while True:
            assert cand.cert is not None  # noqa: S101
            serial = serial_hex(cand.cert.serial_number)
            fingerprint = cand.cert.fingerprint(hashes.SHA256()).hex()
            try:
                tx.execute(
                    "INSERT INTO certificates (serial, device_id, fingerprint, "
                    "public_key_sha256, not_before, not_after, status, issued_at, pem) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?)",
                    (serial, cand.device_id, fingerprint, cand.key_sha256,
                     iso(cand.cert.not_valid_before_utc), iso(cand.cert.not_valid_after_utc),
                     stamp, cand.pem))
            except sqlite3.IntegrityError:
                self._mint(cand, cand.cert.not_valid_before_utc, cand.cert.not_valid_after_utc)
                continue
            return serial

    @staticmethod
    def _promise(view: _ChunkView, options: SignOptions, device_id: str, serial: str,
                 pem: str, writes: list[tuple[Path, str]]) -> None:
        if options.out_dir is None:
            return
        path = view.out_dir(options.out_dir) / f"{device_id}.pem"
        view.promises.append((str(path), serial))
        writes.append((path, pem))

    def _write_files(self, writes: list[tuple[Path, str]]) -> list[Path]:
        """Write promised files (temporary file + rename each, so no reader sees half).

        No fsync: SIGKILL cannot lose them, and after a power cut re-running the same batch
        rewrites every file from the registry (each CSR comes back "existing").
        """
        try:
            for path, pem in writes:
                atomic_write(path, output_bytes(pem, self.ca), sync=False)
        except OSError as exc:
            raise OutputError(f"cannot write certificate file: {exc.strerror}",
                              exc.filename or "--out") from exc
        return [path for path, _ in writes]

    def _clear_promises(self, written: list[Path]) -> None:
        if not written:
            return
        with self.registry.write(actor=self.actor) as tx:
            tx.executemany("DELETE FROM pending_outputs WHERE path = ?",
                           [(str(p),) for p in written])

    def finish_pending_outputs(self) -> int:
        """Write the files an interrupted run committed but did not get to write."""
        rows = self.registry.conn.execute(
            "SELECT p.path, c.pem FROM pending_outputs p JOIN certificates c "
            "ON c.serial = p.serial").fetchall()
        writes = [(Path(path), pem) for path, pem in rows]
        for folder in {path.parent for path, _ in writes}:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_dead_temporaries(folder)
        self._clear_promises(self._write_files(writes))
        return len(writes)


class _ChunkView:
    """The registry rows one chunk's decisions need, read in two queries under the lock.

    Decisions update the view as they go, so two CSRs of one chunk see each other; inserts
    of devices and promises are batched and flushed before anything that refers to them.
    """

    def __init__(self, tx: Transaction, device_ids: list[str]) -> None:
        self.tx = tx
        self.devices: dict[str, tuple[str, str | None]] = {}
        # device -> [serial, status, public-key hash, pem], oldest first
        self.certs: dict[str, list[list[str]]] = {}
        self.new_devices: list[tuple[str, str | None, str, str]] = []
        self.promises: list[tuple[str, str]] = []
        self._out: tuple[Path, Path] | None = None
        ids = sorted(set(device_ids))
        for start in range(0, len(ids), IN_BATCH):
            part = ids[start:start + IN_BATCH]
            marks = ",".join("?" * len(part))
            for row in tx.execute('SELECT device_id, status, "group" FROM devices '  # noqa: S608
                                  f"WHERE device_id IN ({marks})", tuple(part)):
                self.devices[row[0]] = (row[1], row[2])
            for row in tx.execute(
                    "SELECT device_id, serial, status, public_key_sha256, pem "  # noqa: S608
                    f"FROM certificates WHERE device_id IN ({marks}) "
                    "ORDER BY issued_at, rowid", tuple(part)):
                self.certs.setdefault(row[0], []).append([row[1], row[2], row[3], row[4]])

    def newest_with_key(self, device_id: str, key_sha256: str) -> tuple[str, str, str] | None:
        for serial, status, key, pem in reversed(self.certs.get(device_id, [])):
            if key == key_sha256:
                return serial, status, pem
        return None

    def live_serials(self, device_id: str) -> list[str]:
        return [c[0] for c in self.certs.get(device_id, []) if c[1] in ("active", "on_hold")]

    def set_status(self, device_id: str, serial: str, status: str) -> None:
        for cert in self.certs.get(device_id, []):
            if cert[0] == serial:
                cert[1] = status

    def add_device(self, device_id: str, group: str | None, stamp: str) -> None:
        self.devices[device_id] = ("active", group)
        self.new_devices.append((device_id, group, stamp, stamp))

    def add_certificate(self, device_id: str, serial: str, key_sha256: str, pem: str) -> None:
        self.certs.setdefault(device_id, []).append([serial, "active", key_sha256, pem])

    def out_dir(self, folder: Path) -> Path:
        if self._out is None or self._out[0] != folder:
            self._out = (folder, folder.absolute())
        return self._out[1]

    def flush(self) -> None:
        if self.new_devices:
            self.tx.executemany('INSERT INTO devices (device_id, status, "group", created_at, '
                                "updated_at, metadata) VALUES (?, 'active', ?, ?, ?, '{}')",
                                self.new_devices)
            self.new_devices.clear()
        if self.promises:
            self.tx.executemany("INSERT OR REPLACE INTO pending_outputs (path, serial) "
                                "VALUES (?, ?)", self.promises)
            self.promises.clear()


def _remove_dead_temporaries(folder: Path) -> None:
    """Temporary files of killed writers (``.NAME.PID.tmp``); a live writer's are left alone."""
    for stray in folder.glob(".*.tmp"):
        pid = stray.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            stray.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _result(cand: _Candidate) -> SignResult:
    assert cand.result is not None  # noqa: S101
    return cand.result


def _reject(cand: _Candidate, reason: str) -> SignResult:
    return SignResult(cand.source, cand.device_id, "rejected", reason=reason)


def _cn_or_none(ctx: CSRContext) -> str | None:
    with contextlib.suppress(IndexError, ValueError):
        return ctx.device_id
    return None
