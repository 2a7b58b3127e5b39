"""The read-only fleet-state view (provisioning.registry.view): what the hub and the feed read."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.registry.store import Registry
from provisioning.registry.view import FleetView, FleetViewError, Position
from tests.provisioning.conftest import TRUST_DOMAIN
from tests.provisioning.csrs import make_csr, make_key


def _issue(authority: Authority, *names: str, group: str | None = None,
           renew: bool = False) -> dict[str, int]:
    inputs = [CSRInput(f"{n}.csr", make_csr(cn=n, key=make_key())) for n in names]
    results = authority.issuer().sign(inputs, SignOptions(group=group, renew=renew))
    serials = {}
    for r in results:
        assert r.status == "issued", r.reason
        assert r.pem is not None
        assert r.device_id is not None
        serials[r.device_id] = x509.load_pem_x509_certificate(r.pem.encode()).serial_number
    return serials


def test_importing_the_view_leaves_the_ca_out() -> None:
    """A gateway imports the view without sqlite-utils, cryptography or the CA's modules."""
    code = ("import sys, provisioning.registry.view; "
            "print(sorted(m for m in sys.modules if m.startswith("
            "('sqlite_utils', 'cryptography', 'provisioning'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    loaded = eval(done.stdout)  # noqa: S307 (our own subprocess's list of names)
    assert loaded == ["provisioning", "provisioning.errors", "provisioning.identity",
                      "provisioning.registry", "provisioning.registry.schema",
                      "provisioning.registry.view", "provisioning.serial"]


def test_the_state_is_what_the_ca_did_and_the_file_is_not_written(authority: Authority,
                                                                  pki_dir: Path) -> None:
    """Revoked and held serials (as integers), devices not active, groups, password hashes."""
    serials = _issue(authority, "ok", "gone", "held", group="sensors")
    _issue(authority, "plain")
    authority.revoke("gone", None, "keyCompromise")
    authority.suspend("held")
    authority.set_password("ok", "s3cret")
    registry = pki_dir / "registry.db"
    before = hashlib.sha256(registry.read_bytes()).hexdigest()
    with FleetView(registry) as view:
        position, state = view.read()
    assert state is not None
    assert state.position == position
    assert {s: (r.status, r.reason, r.device_id) for s, r in state.revoked.items()} == {
        serials["gone"]: ("revoked", "keyCompromise", "gone"),
        serials["held"]: ("on_hold", "certificateHold", "held")}
    assert dict(state.device_status) == {"gone": "revoked", "held": "suspended"}
    assert dict(state.groups) == {"ok": "sensors", "gone": "sensors", "held": "sensors"}
    assert list(state.password_hashes) == ["ok"]
    assert state.password_hashes["ok"].startswith("scrypt$")
    assert state.certificates is None
    assert hashlib.sha256(registry.read_bytes()).hexdigest() == before


def test_read_since_a_position_answers_only_after_a_ca_action(authority: Authority,
                                                              pki_dir: Path) -> None:
    """Unchanged: the same position, no state; a commit that is no CA action moves the
    position only; a CA action gives the new state."""
    serials = _issue(authority, "d1")
    with FleetView(pki_dir / "registry.db") as view:
        seen, state = view.read()
        assert state is not None
        assert not state.revoked
        assert view.read(seen) == (seen, None)
        with Registry(pki_dir / "registry.db") as registry, registry.write("test") as tx:
            tx.promise_outputs([("/nowhere/d1.pem", "00")])  # no audit event
        moved, state = view.read(seen)
        assert state is None
        assert moved.audit_head == seen.audit_head
        assert moved.data_version != seen.data_version
        authority.revoke("d1", None, "unspecified")
        latest, state = view.read(moved)
        assert state is not None
        assert latest.audit_head != moved.audit_head
        assert set(state.revoked) == {serials["d1"]}
        assert view.position() == latest


def test_certificates_lists_each_devices_valid_serials(authority: Authority,
                                                       pki_dir: Path) -> None:
    """With certificates=True: active and superseded serials per device, held ones not."""
    first = _issue(authority, "r1", "h1")
    renewed = _issue(authority, "r1", renew=True)
    authority.suspend("h1")
    with FleetView(pki_dir / "registry.db") as view:
        _, state = view.read(certificates=True)
    assert state is not None
    assert state.certificates is not None
    assert {d: dict(s) for d, s in state.certificates.items()} == {
        "r1": {first["r1"]: "superseded", renewed["r1"]: "active"}}


def test_valid_serials_are_read_for_the_devices_named(authority: Authority,
                                                      pki_dir: Path) -> None:
    """The point read behind the hub's unregistered-certificate check: the named devices'
    active and superseded serials; held and revoked ones, unnamed and unknown devices not."""
    first = _issue(authority, "v1", "v2", "held", "gone", "other")
    renewed = _issue(authority, "v1", renew=True)
    authority.suspend("held")
    authority.revoke("gone", None, "keyCompromise")
    with FleetView(pki_dir / "registry.db") as view:
        found = view.valid_serials(["v1", "v2", "held", "gone", "never-enrolled", "v1"])
    assert found == {"v1": frozenset({first["v1"], renewed["v1"]}),
                     "v2": frozenset({first["v2"]})}


def test_trust_domain_comes_from_the_pki_init_event(pki_dir: Path, tmp_path: Path) -> None:
    """init's sealed pki.init event names the domain; a registry without one names none."""
    with FleetView(pki_dir / "registry.db") as view:
        assert view.trust_domain() == TRUST_DOMAIN
    Registry(tmp_path / "bare.db", create=True).close()
    with FleetView(tmp_path / "bare.db") as view:
        assert view.trust_domain() is None


def test_failures_are_fleet_view_errors(authority: Authority, pki_dir: Path,
                                        tmp_path: Path) -> None:
    """A missing file, a file that is no database, a serial that is not hex: one error type."""
    with pytest.raises(FleetViewError, match="cannot be opened read-only"):
        FleetView(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with FleetView(garbage) as view, pytest.raises(FleetViewError, match="cannot be read"):
        view.read()
    _issue(authority, "bad")
    authority.suspend("bad")
    with sqlite3.connect(pki_dir / "registry.db") as conn:
        conn.execute("UPDATE certificates SET serial = 'zz' WHERE device_id = 'bad'")
    with FleetView(pki_dir / "registry.db") as view, pytest.raises(
            FleetViewError, match="malformed serial"):
        view.read()


def test_position_is_comparable() -> None:
    """Positions are values: the hub keeps the last one it loaded."""
    assert Position(3, "1:ab") == Position(3, "1:ab") != Position(4, "1:ab")
