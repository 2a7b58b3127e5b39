"""Nothing is lost and nothing is half-done: SIGKILL mid-batch, and two signers at once.

Both tests drive the real ``python -m provisioning.cli sign`` as separate processes and then
compare the three records of an issuance (registry rows, ``OUT/<device-id>.pem`` files, the
hash-chained audit log) against each other.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioning.issuer import CHUNK
from provisioning.serial import format_serial
from tests.provisioning.conftest import fleet_provision
from tests.provisioning.csrs import make_csr

BATCH = 3000
COMMIT_DEADLINE_S = 60.0
POLL_S = 0.002


@dataclass(frozen=True)
class Snapshot:
    """What the registry says, read straight from the database."""

    certs: dict[str, tuple[str, str]]  # serial -> (device id, PEM)
    pending: dict[str, str]  # absolute output path -> serial
    issue_events: int
    devices: int
    device_events: int


def _write_csrs(folder: Path, device_ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for device_id in device_ids:
        (folder / f"{device_id}.csr").write_bytes(make_csr(device_id))


def _snapshot(registry: Path) -> Snapshot:
    conn = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
    try:
        certs = {serial: (device_id, pem) for serial, device_id, pem in
                 conn.execute("SELECT serial, device_id, pem FROM certificates")}
        pending = dict(conn.execute("SELECT path, serial FROM pending_outputs").fetchall())
        events = Counter(action for (action,) in conn.execute("SELECT action FROM events"))
        devices = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
    finally:
        conn.close()
    return Snapshot(certs, pending, events["certificate.issue"], devices,
                    events["device.create"])


def _count_certificates(registry: Path) -> int:
    """Rows committed so far; 0 while the signer has not opened the registry in WAL mode yet."""
    try:
        conn = sqlite3.connect(f"file:{registry}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(conn.execute("SELECT count(*) FROM certificates").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def _wait_for_commit(proc: subprocess.Popen[bytes], registry: Path, at_least: int) -> int:
    """Poll the registry (read-only) until *at_least* certificate rows are committed."""
    deadline = time.monotonic() + COMMIT_DEADLINE_S
    while time.monotonic() < deadline:
        count = _count_certificates(registry)
        if count >= at_least:
            return count
        assert proc.poll() is None, f"sign exited early with {proc.returncode}"
        time.sleep(POLL_S)
    raise AssertionError(f"no chunk committed within {COMMIT_DEADLINE_S} s")


def _serial_of(pem: bytes) -> str:
    return format_serial(x509.load_pem_x509_certificate(pem).serial_number)


def _check_files_against_registry(out: Path, snap: Snapshot, chain: bytes) -> set[str]:
    """Every file is a registry certificate (same PEM) plus the issuing CA; returns serials."""
    on_disk: set[str] = set()
    for file in out.glob("*.pem"):
        data = file.read_bytes()
        serial = _serial_of(data)
        assert serial in snap.certs, f"{file.name}: serial {serial} is not in the registry"
        device_id, pem = snap.certs[serial]
        assert file.name == f"{device_id}.pem"
        assert data == pem.encode() + chain, f"{file.name} differs from the registry's PEM"
        on_disk.add(serial)
    return on_disk


def _tmp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp"))


def _sign_json(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    assert "database is locked" not in result.stderr
    assert "Traceback" not in result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def _audit_verifies(pki: Path) -> None:
    verify = fleet_provision("audit", "verify", "--pki", pki)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sigkill_mid_batch_leaves_registry_files_and_audit_in_agreement(
    pki_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL in the middle of a large ``sign`` batch loses nothing and half-does nothing.

    The kill lands as soon as the second chunk has committed, so one chunk is finished and
    the next is usually still only promised (its files being written). Right after the
    kill, every output file is a certificate of the registry (same PEM), every registry
    certificate is on disk or promised in ``pending_outputs``, the only temporary files
    belong to promised paths, each certificate row has its ``certificate.issue`` event and
    ``audit verify`` passes. Re-running the same batch completes it: the certificates
    finished before the kill come back ``existing`` with the same serial, the rest
    ``issued``, and afterwards registry and files match exactly.
    """
    device_ids = [f"dev-{i:05d}" for i in range(1, BATCH + 1)]
    csr_dir, out = tmp_path / "csrs", tmp_path / "out"
    _write_csrs(csr_dir, device_ids)
    out.mkdir()
    registry, chain = pki_dir / "registry.db", (pki_dir / "issuing-ca.pem").read_bytes()
    args = ["sign", "--pki", str(pki_dir), "--out", str(out), "--json", str(csr_dir)]

    with (tmp_path / "killed.err").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "provisioning.cli", *args],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_for_commit(proc, registry, at_least=2 * CHUNK)
            assert proc.poll() is None, "sign finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    snap = _snapshot(registry)
    done_before = {device_id: serial for serial, (device_id, _) in snap.certs.items()}
    assert 2 * CHUNK <= len(snap.certs) < BATCH, "kill did not land mid-batch"
    assert len(snap.certs) % CHUNK == 0, "a chunk was committed in part"
    on_disk = _check_files_against_registry(out, snap, chain)
    for serial, (device_id, _) in snap.certs.items():
        path = str((out / f"{device_id}.pem").absolute())
        assert serial in on_disk or snap.pending.get(path) == serial, (
            f"{device_id} ({serial}) is neither on disk nor promised")
    assert set(snap.pending.values()) <= set(snap.certs)
    for tmp in _tmp_files(out):
        owner = tmp.name[1:].split(".pem.", 1)[0] + ".pem"
        assert str(out / owner) in snap.pending, f"stray temporary file {tmp.name}"
    assert snap.issue_events == len(snap.certs)
    assert snap.device_events == snap.devices == len(snap.certs)
    _audit_verifies(pki_dir)

    rows = _sign_json(fleet_provision(*args))
    assert len(rows) == BATCH
    by_device = {row["device_id"]: row for row in rows}
    assert sorted(by_device) == device_ids
    status = Counter(row["status"] for row in rows)
    assert set(status) <= {"issued", "existing"}
    assert status["existing"] == len(done_before)
    assert status["issued"] + status["existing"] == BATCH
    for device_id, serial in done_before.items():
        assert by_device[device_id]["status"] == "existing"
        assert by_device[device_id]["serial"] == serial

    final = _snapshot(registry)
    assert len(final.certs) == BATCH
    assert final.pending == {}
    assert _tmp_files(out) == []
    assert _check_files_against_registry(out, final, chain) == set(final.certs)
    assert {row["serial"] for row in rows} == set(final.certs)
    assert len({row["serial"] for row in rows}) == BATCH
    assert final.issue_events == BATCH
    _audit_verifies(pki_dir)


def test_two_concurrent_signers_neither_duplicate_nor_lose(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Two ``sign`` processes on one PKI at once: no lock error, no duplicate, no lost row.

    Each process has 600 CSRs of its own and the same 100 CSR files as the other (same
    device id and key), which sort first so both reach them at the same moment. Both exit
    0; the registry holds exactly 1300 certificates with unique serials; every shared device
    has exactly one certificate, which both processes report (``issued`` by exactly one of
    them, ``existing`` by the other); the audit chain verifies and the output folder matches
    the registry.
    """
    shared = [f"a-shared-{i:04d}" for i in range(1, 101)]
    own = {name: [f"{name}-{i:04d}" for i in range(1, 601)] for name in ("p1", "p2")}
    _write_csrs(tmp_path / "shared", shared)
    procs: dict[str, subprocess.Popen[str]] = {}
    for name, ids in own.items():
        folder = tmp_path / name
        _write_csrs(folder, ids)
        for device_id in shared:
            (folder / f"{device_id}.csr").write_bytes(
                (tmp_path / "shared" / f"{device_id}.csr").read_bytes())
    try:
        for name in own:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "provisioning.cli", "sign", "--pki", str(pki_dir),
                 "--json", str(tmp_path / name)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            results[name] = _sign_json(subprocess.CompletedProcess(
                proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    snap = _snapshot(pki_dir / "registry.db")
    assert len(snap.certs) == 1300
    assert snap.issue_events == 1300
    assert snap.pending == {}
    per_device = Counter(device_id for device_id, _ in snap.certs.values())
    assert set(per_device) == set(shared) | set(own["p1"]) | set(own["p2"])
    assert max(per_device.values()) == 1
    serial_of = {device_id: serial for serial, (device_id, _) in snap.certs.items()}

    reported: dict[str, list[tuple[str, str]]] = {device_id: [] for device_id in shared}
    for name, rows in results.items():
        assert len(rows) == 700
        for row in rows:
            assert row["serial"] == serial_of[row["device_id"]]
            if row["device_id"] in reported:
                reported[row["device_id"]].append((name, row["status"]))
            else:
                assert row["device_id"] in own[name]
                assert row["status"] == "issued"
    for device_id, statuses in reported.items():
        assert sorted(n for n, _ in statuses) == ["p1", "p2"], device_id
        assert sorted(s for _, s in statuses) == ["existing", "issued"], (device_id, statuses)
    issued_serials = [row["serial"] for rows in results.values() for row in rows
                      if row["status"] == "issued"]
    assert len(issued_serials) == len(set(issued_serials)) == 1300

    out = pki_dir / "certs"
    chain = (pki_dir / "issuing-ca.pem").read_bytes()
    assert _check_files_against_registry(out, snap, chain) == set(snap.certs)
    assert _tmp_files(out) == []
    _audit_verifies(pki_dir)
