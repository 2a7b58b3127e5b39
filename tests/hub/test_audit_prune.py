"""Pruning with signed checkpoints: the chain stays verifiable after old records go, and a
checkpoint not signed by the hub (another key, a device's key, an edit) is refused."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.audit import AuditStore, read_records
from hub.audit.checkpoint import CheckpointSigner, CheckpointTrust, load_signer
from hub.audit.prune import PruneResult, prune
from hub.audit.verify import ChainReport, verify_store
from provisioning.authority import Authority
from tests.integration.fleet import Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def signer(fleet: Fleet) -> CheckpointSigner:
    return load_signer(fleet.pki / "server.pem", fleet.pki / "server.key", None)


@pytest.fixture(scope="module")
def trust(fleet: Fleet) -> CheckpointTrust:
    return CheckpointTrust.load(fleet.pki / "server.pem", fleet.ca)


def write(path: Path, count: int, start: int = 0) -> None:
    store = AuditStore(path, batch_size=16)
    store.open()
    for i in range(start, start + count):
        store.record("accept", device_id=f"dev-{i}", serial=f"{i:02x}", peer="192.0.2.1:1")
    store.close()


def time_of(path: Path, record_id: int) -> float:
    return next(r.time for r in read_records(path) if r.id == record_id)


def cut(path: Path, signer: CheckpointSigner, trust: CheckpointTrust, record_id: int
        ) -> PruneResult:
    """Prune everything older than record *record_id* (it and what follows stay, unless
    records share its timestamp)."""
    return prune(path, before=time_of(path, record_id), signer=signer, trust=trust)


def verify(path: Path, trust: CheckpointTrust) -> ChainReport:
    return verify_store(path, trust)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "hub-audit.db"
    write(path, 60)
    return path


def test_prune_leaves_a_signed_checkpoint_and_the_rest_verifies(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    """Records before #31 go; checkpoint #1 covers them; the first record left continues
    from its head; verify says ok and counts what was pruned."""
    done = cut(db, signer, trust, 31)
    checkpoint = done.checkpoint
    assert checkpoint is not None
    assert done.refused is None
    left = read_records(db)
    assert left[0].id == checkpoint.head_id + 1
    assert (checkpoint.id, checkpoint.first_id, checkpoint.count) == (1, 1, checkpoint.head_id)
    assert checkpoint.head_id <= 30
    assert done.kept == len(left) == 60 - checkpoint.count
    report = verify(db, trust)
    assert report.ok, report.problem
    assert (report.records, report.pruned, len(report.checkpoints)) == (
        len(left), checkpoint.count, 1)


def test_prunes_chain_checkpoints_and_the_writer_continues(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    """Two prunes, a prune of everything, then the hub writes on: all verifies."""
    first = cut(db, signer, trust, 20).checkpoint
    second = cut(db, signer, trust, 45).checkpoint
    assert first is not None
    assert second is not None
    assert second.first_id == first.head_id + 1
    assert second.first_prev_hash == first.head_hash
    everything = prune(db, before=time_of(db, 60) + 1, signer=signer, trust=trust)
    assert everything.kept == 0
    assert verify(db, trust).ok
    write(db, 5, start=100)
    report = verify(db, trust)
    assert report.ok, report.problem
    assert (report.records, report.pruned, len(report.checkpoints)) == (5, 60, 3)
    assert report.first is not None
    assert report.first[0] == 61


def test_nothing_older_than_the_cutoff_is_no_checkpoint(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    done = prune(db, before=time_of(db, 1) - 60, signer=signer, trust=trust)
    assert (done.checkpoint, done.kept, done.refused) == (None, 60, None)
    assert verify(db, trust).checkpoints == ()


def test_prune_while_the_hub_writes(tmp_path: Path, signer: CheckpointSigner,
                                    trust: CheckpointTrust) -> None:
    """The writer is open (its own connection) while a prune commits: nothing lost, ok."""
    path = tmp_path / "live.db"
    store = AuditStore(path, flush_interval=0.01)
    store.open()
    try:
        for i in range(300):
            store.record("accept", device_id=f"d{i}")
        store.flush()
        done = cut(path, signer, trust, 150)
        for i in range(300):
            store.record("disconnect", device_id=f"d{i}")
        store.flush()
    finally:
        store.close()
    assert done.checkpoint is not None
    assert len(read_records(path)) == 600 - done.checkpoint.count
    report = verify(path, trust)
    assert report.ok, report.problem


def test_prune_refuses_a_broken_chain_and_changes_nothing(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    """Signing over an edit would launder it: refused, the store as it was."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE events SET reason = 'edited' WHERE id = 10")
    conn.close()
    done = cut(db, signer, trust, 31)
    assert done.checkpoint is None
    assert done.refused is not None
    assert done.refused.record_id == 10
    assert len(read_records(db)) == 60


def _self_signed(common_name: str) -> CheckpointSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(key, hashes.SHA256()))
    return CheckpointSigner(key, cert.public_bytes(serialization.Encoding.PEM).decode())


def _replace_checkpoint(path: Path, forger: CheckpointSigner) -> None:
    """Re-sign checkpoint #1, same fields, with *forger*'s key and certificate."""
    conn = sqlite3.connect(path, isolation_level=None)
    row = conn.execute("SELECT id, time, first_id, first_prev_hash, head_id, head_hash, count "
                       "FROM checkpoints WHERE id = 1").fetchone()
    forged = forger.sign(*row)
    conn.execute("UPDATE checkpoints SET certificate = ?, signature = ? WHERE id = 1",
                 (forged.certificate, forged.signature))
    conn.close()


def test_a_checkpoint_signed_with_another_key_is_refused(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    """A valid signature by a self-signed server certificate: not the hub's, refused."""
    cut(db, signer, trust, 31)
    _replace_checkpoint(db, _self_signed("fleet-hub"))
    report = verify(db, trust)
    assert report.problem is not None
    assert report.problem.checkpoint_id == 1
    assert "its certificate (CN=fleet-hub) is neither the hub's listener.server_cert nor a " \
        "server certificate issued by a CA in client_ca" in str(report.problem)


def test_a_checkpoint_signed_by_a_device_certificate_is_refused(
        fleet: Fleet, db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    """A device's certificate is issued by the fleet CA too, but it is no server
    certificate: a device cannot vouch for a gateway's log."""
    device = fleet.device("sneaky-1")
    key = serialization.load_pem_private_key(device.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cut(db, signer, trust, 31)
    _replace_checkpoint(db, CheckpointSigner(key, device.cert.read_text()))
    report = verify(db, trust)
    assert report.problem is not None
    assert "is neither the hub's listener.server_cert" in report.problem.what


def test_an_altered_checkpoint_is_refused(db: Path, signer: CheckpointSigner,
                                          trust: CheckpointTrust) -> None:
    """One field of the signed checkpoint changed: its signature no longer matches."""
    cut(db, signer, trust, 31)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE checkpoints SET count = count - 1")
    conn.close()
    report = verify(db, trust)
    assert report.problem is not None
    assert str(report.problem).startswith("checkpoint #1: its signature does not match its "
                                          "content")


def test_a_deleted_checkpoint_leaves_the_records_unanchored(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    checkpoint = cut(db, signer, trust, 31).checkpoint
    assert checkpoint is not None
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM checkpoints")
    conn.close()
    report = verify(db, trust)
    assert report.problem is not None
    assert str(report.problem).startswith(
        f"record #1: missing: records #1..#{checkpoint.head_id} are gone from the start")


def test_records_removed_after_a_checkpoint_are_named(
        db: Path, signer: CheckpointSigner, trust: CheckpointTrust) -> None:
    checkpoint = cut(db, signer, trust, 31).checkpoint
    assert checkpoint is not None
    after = checkpoint.head_id + 1
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM events WHERE id = ?", (after,))
    conn.close()
    report = verify(db, trust)
    assert report.problem is not None
    assert str(report.problem).startswith(f"record #{after}: missing: #{after} removed")


def test_a_checkpoint_of_a_renewed_server_certificate_still_verifies(
        tmp_path: Path, fleet: Fleet, db: Path, signer: CheckpointSigner) -> None:
    """After the hub's server certificate is renewed, the old one (issued by the fleet CA,
    server auth) still vouches for the checkpoints it signed."""
    cut(db, signer, CheckpointTrust.load(fleet.pki / "server.pem", fleet.ca), 31)
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    with Authority(fleet.pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], renewed)
    trust = CheckpointTrust.load(renewed / "server.pem", fleet.ca)
    assert (renewed / "server.pem").read_bytes() != (fleet.pki / "server.pem").read_bytes()
    report = verify(db, trust)
    assert report.ok, report.problem


def test_anchors_after_a_prune(db: Path, signer: CheckpointSigner,
                               trust: CheckpointTrust) -> None:
    """An anchor on the checkpoint's head is checked against it; one on another pruned record
    can no longer be: a note, not a match; a wrong hash on the head is named."""
    shipped = {r.id: str(r.hash) for r in read_records(db)}
    checkpoint = cut(db, signer, trust, 31).checkpoint
    assert checkpoint is not None
    head, other = checkpoint.head_id, checkpoint.head_id - 1
    report = verify_store(db, trust, [(head, shipped[head]), (other, shipped[other])])
    assert report.ok, report.problem
    assert (report.anchors, report.notes) == (1, (f"anchor #{other} was pruned: not checked",))
    wrong = verify_store(db, trust, [(head, shipped[other])])
    assert wrong.problem is not None
    assert wrong.problem.record_id == head
    assert "differs from the copy shipped elsewhere" in wrong.problem.what
