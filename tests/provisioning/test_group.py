"""Device groups (issue 11 defect 12): ``group set`` moves devices in one audited transaction,
all or none; ``sign --group`` says when it leaves an existing device's group alone."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr

SIGN_KEYS = ["source", "device_id", "status", "serial", "reason"]  # DESIGN section 4


@pytest.fixture
def fleet(pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> Path:
    """d1 and d2 in group sensors, d3 in no group; returns the CSR folder."""
    csrs = tmp_path / "csrs"
    csrs.mkdir()
    for cn in ("d1", "d2", "d3"):
        (csrs / f"{cn}.csr").write_bytes(make_csr(cn=cn))
    out = tmp_path / "o"
    assert cli("sign", "--pki", pki_dir, "--group", "sensors", "--out", out,
               csrs / "d1.csr", csrs / "d2.csr").code == 0
    assert cli("sign", "--pki", pki_dir, "--out", out, csrs / "d3.csr").code == 0
    return csrs


def _groups(pki: Path, cli: Callable[..., CliResult]) -> dict[str, str | None]:
    return {d["device_id"]: d["group"]
            for d in json.loads(cli("devices", "--pki", pki, "--json").out)}


def _events(pki: Path, action: str | None = None) -> list[tuple[str, str | None, dict[str, str]]]:
    with sqlite3.connect(pki / "registry.db") as conn:
        rows = conn.execute("SELECT action, device_id, detail FROM events ORDER BY id").fetchall()
    return [(a, d, json.loads(detail)) for a, d, detail in rows if action in (None, a)]


def test_group_set_moves_devices_in_one_audited_transaction(
        fleet: Path, pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """Each device moved is one device.group event (from, to); the chain verifies."""
    before = len(_events(pki_dir))
    result = cli("group", "set", "--pki", pki_dir, "--group", "operators", "d1", "d3", "d1")
    assert (result.code, result.out) == (0, "")
    assert result.err == ("moved d1 to group operators (was in group sensors)\n"
                          "moved d3 to group operators (was in no group)\n")
    assert _groups(pki_dir, cli) == {"d1": "operators", "d2": "sensors", "d3": "operators"}
    events = _events(pki_dir)
    assert len(events) == before + 2
    assert events[before:] == [("device.group", "d1", {"from": "sensors", "to": "operators"}),
                               ("device.group", "d3", {"from": None, "to": "operators"})]
    assert cli("audit", "verify", "--pki", pki_dir).code == 0


def test_a_device_already_in_the_group_is_not_an_event(
        fleet: Path, pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """Nothing changed, nothing audited, exit 0."""
    before = len(_events(pki_dir))
    result = cli("group", "set", "--pki", pki_dir, "--group", "sensors", "d2")
    assert (result.code, result.err) == (0, "d2 is already in group sensors\n")
    assert len(_events(pki_dir)) == before


def test_an_unknown_device_moves_nobody(fleet: Path, pki_dir: Path,
                                        cli: Callable[..., CliResult]) -> None:
    """All or none: one unknown id fails the command with exit 1 and nothing is written."""
    before = _events(pki_dir)
    result = cli("group", "set", "--pki", pki_dir, "--group", "operators", "d1", "ghost", "d3",
                 "nope")
    assert (result.code, result.out) == (1, "")
    assert result.err == ("error: no device 'ghost', 'nope' in the registry; no device was "
                          f"moved ({pki_dir})\n")
    assert _groups(pki_dir, cli) == {"d1": "sensors", "d2": "sensors", "d3": None}
    assert _events(pki_dir) == before


@pytest.mark.parametrize("group", ["bad group", "../x", "-x", "a" * 65, ""])
def test_group_names_follow_the_device_id_rules(group: str, fleet: Path, pki_dir: Path,
                                                cli: Callable[..., CliResult]) -> None:
    """A bad group name is a usage error (exit 2) naming --group; nothing is written."""
    before = _events(pki_dir)
    result = cli("group", "set", "--pki", pki_dir, "--group", group, "d1")
    assert (result.code, result.out) == (2, "")
    assert result.err == (f"error: group {group!r} is not valid (same rules as a device id) "
                          "(--group)\n")
    assert _events(pki_dir) == before


def test_group_set_needs_group_and_devices(pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """Both are required: one-line usage errors, exit 2."""
    missing_group = cli("group", "set", "--pki", pki_dir, "d1")
    assert missing_group.code == 2
    assert missing_group.err == ("error: Missing option '--group'. "
                                 "(fleet-provision group set)\n")
    missing_ids = cli("group", "set", "--pki", pki_dir, "--group", "g")
    assert missing_ids.code == 2
    assert missing_ids.err == ("error: Missing argument 'DEVICE_ID...'. "
                               "(fleet-provision group set)\n")


def test_sign_says_when_it_ignores_group(fleet: Path, pki_dir: Path, tmp_path: Path,
                                         cli: Callable[..., CliResult]) -> None:
    """Re-submitting d1's CSR with another --group: "existing", a one-line note on stderr
    and a ``note`` key; the group stays (moving is group set's job)."""
    result = cli("sign", "--pki", pki_dir, "--group", "operators", "--out", tmp_path / "o",
                 "--json", fleet / "d1.csr", fleet / "d1.csr", fleet / "d2.csr")
    assert result.code == 0, result.err
    note = ("--group 'operators' ignored: device 'd1' exists and stays in group 'sensors'; "
            "move it with fleet-provision group set")
    note2 = note.replace("'d1'", "'d2'")
    assert result.err.splitlines() == [f"note: {note}", f"note: {note2}",
                                        f"0 issued, 3 existing, 0 rejected; certificates in "
                                        f"{tmp_path / 'o'}"]
    rows = json.loads(result.out)
    assert [list(r) for r in rows] == [[*SIGN_KEYS, "note"]] * 3
    assert [r["note"] for r in rows] == [note, note, note2]
    assert [r["status"] for r in rows] == ["existing"] * 3
    assert _groups(pki_dir, cli)["d1"] == "sensors"
    text = cli("sign", "--pki", pki_dir, "--group", "operators", "--out", tmp_path / "o",
               fleet / "d3.csr")
    assert text.err.splitlines()[0] == ("note: --group 'operators' ignored: device 'd3' "
                                        "exists and stays in no group; move it with "
                                        "fleet-provision group set")


def test_sign_keeps_its_json_keys_when_nothing_is_ignored(
        fleet: Path, pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """The same group, or no --group: no note, exactly DESIGN's keys."""
    for extra in (["--group", "sensors"], []):
        result = cli("sign", "--pki", pki_dir, *extra, "--out", tmp_path / "o", "--json",
                     fleet / "d1.csr")
        assert result.code == 0
        assert [list(r) for r in json.loads(result.out)] == [SIGN_KEYS]
        assert "note:" not in result.err


def test_group_is_in_the_help(pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """fleet-provision --help lists group; group set --help shows its example."""
    assert "group" in cli("--help").out.split()
    assert "fleet-provision group set --pki fleet-pki --group operators" in " ".join(
        cli("group", "set", "--help").out.split())


# -- a running hub sees the move -----------------------------------------------------------

def test_a_running_hub_applies_the_new_group(tmp_path: Path,
                                             cli: Callable[..., CliResult]) -> None:
    """Before: '#' is refused to gm-1; after group set operators, a new connection gets it
    (the hub's registry watcher reads devices."group" when the audit head moves)."""
    from tests.integration.fleet import Fleet, RunningHub
    from tests.integration.mqtt import Client

    fleet = Fleet.create(tmp_path / "fleet")
    device = fleet.device("gm-1")
    hub = RunningHub.start(fleet.write_config())  # [acl.groups.operators] subscribe = ["#"]

    def subscribe_all() -> list[int]:
        client = Client(hub.port, fleet.ca, device.cert, device.key, device.device_id)
        try:
            assert client.connect() == 0
            return client.subscribe("#")
        finally:
            client.close()

    try:
        assert subscribe_all() == [0x80]
        assert cli("group", "set", "--pki", fleet.pki, "--group", "operators",
                   "gm-1").code == 0
        deadline = time.monotonic() + 10
        granted = subscribe_all()
        while granted != [1] and time.monotonic() < deadline:
            time.sleep(0.1)
            granted = subscribe_all()
        assert granted == [1], "".join(hub.log)
    finally:
        assert hub.stop() == 0, "".join(hub.log)
