"""FleetView.follow, the feed's incremental read: the audit events after a head, classified
by action, then the rows of just the devices they name, all of one commit; the whole state
when an action is unknown, a device action names no device, the head is not in this chain or
too many devices moved. Every action the code base audits is classified."""

from __future__ import annotations

import re
from pathlib import Path

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.registry.view import DEVICE_ACTIONS, QUIET_ACTIONS, FleetView, Position
from provisioning.timefmt import iso, utcnow
from tests.provisioning.csrs import make_csr, make_key

_ACTION = re.compile(r'"([a-z][a-z-]*(?:\.[a-z-]+)+)"')


def _issue(authority: Authority, *names: str) -> None:
    inputs = [CSRInput(f"{n}.csr", make_csr(cn=n, key=make_key())) for n in names]
    for made in authority.issuer().sign(inputs, SignOptions()):
        assert made.status == "issued", made.reason


def _audit(authority: Authority, action: str, device_id: str | None = None) -> None:
    with authority.registry.write("test") as tx:
        tx.audit(iso(utcnow()), action, device_id)


def test_every_audited_action_is_classified() -> None:
    """Each action string written next to an audit call in provisioning/ is either quiet or
    a device action (an unclassified one would cost a full read on every occurrence)."""
    found: set[str] = set()
    for path in (Path(__file__).parents[2] / "provisioning").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.search(r"audit|action|ACTION", line):
                found |= set(_ACTION.findall(line))
    found -= {"provisioning.feed"}  # a logger's name
    assert {"certificate.issue", "est.enroll", "feed.fetch", "device.resume"} <= found
    assert not QUIET_ACTIONS & DEVICE_ACTIONS
    assert found <= QUIET_ACTIONS | DEVICE_ACTIONS, found - QUIET_ACTIONS - DEVICE_ACTIONS


def test_follow_reads_only_the_devices_the_events_name(authority: Authority) -> None:
    """First read: everything. Then a suspension and a request record: the rows of that one
    device (as the whole state has them), no whole state; unchanged: nothing."""
    _issue(authority, "d1", "d2")
    with FleetView(authority.paths.registry) as view:
        seen, moves = view.follow(None)
        assert moves is not None
        assert moves.devices is None
        assert moves.state is not None
        assert view.statistics().full == 1
        authority.suspend("d1")
        _audit(authority, "est.enroll", "d2")
        seen, moves = view.follow(seen)
        assert moves is not None
        assert moves.state is None
        assert moves.devices is not None
        assert list(moves.devices) == ["d1"]
        row = moves.devices["d1"]
        _, whole = view.read(certificates=True)
        assert whole is not None
        assert whole.certificates is not None
        assert row.status == whole.device_status["d1"] == "suspended"
        assert dict(row.refused) == {s: r for s, r in whole.revoked.items()
                                     if r.device_id == "d1"}
        assert dict(row.certificates) == dict(whole.certificates.get("d1", {}))
        assert (view.statistics().full, view.statistics().devices) == (1, 1)
        assert view.follow(seen) == (seen, None)


def test_follow_reads_everything_when_it_cannot_tell(authority: Authority) -> None:
    """An unknown action, a device action with no device, a head from another chain, more
    devices than *most*: the whole state; with whole=True, the rows and the whole state."""
    _issue(authority, "d1", "d2")
    with FleetView(authority.paths.registry) as view:
        seen, _ = view.follow(None)
        for action, device_id in (("fleet.new-thing", "d1"), ("device.suspend", None)):
            _audit(authority, action, device_id)
            seen, moves = view.follow(seen)
            assert moves is not None
            assert moves.devices is None
            assert moves.state is not None
        authority.set_group(["d1", "d2"], "g")
        _, moves = view.follow(seen, most=1)
        assert moves is not None
        assert moves.devices is None
        assert seen.audit_head is not None
        stranger = Position(seen.data_version, seen.audit_head.split(":")[0] + ":00")
        _, moves = view.follow(stranger)
        assert moves is not None
        assert moves.devices is None
        _, moves = view.follow(seen, whole=True)
        assert moves is not None
        assert moves.devices is not None
        assert set(moves.devices) == {"d1", "d2"}
        assert moves.state is not None
        assert moves.state.groups["d1"] == "g"
