"""``fleet-sim run`` with several brokers: devices dealt out round-robin, figures per broker.

Two real ``fleet-hub serve`` processes on one PKI (both watch its registry): the fleet is
spread over them by device index, the attacks run at each, a revocation made at the CA cuts
every revoked device off at its own hub, and the report names both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sim.brokers import apportion, assign, parse_brokers
from device_sim.errors import UsageError
from device_sim.lab import HubProcess, write_hub_config
from tests.device_sim.conftest import Lab, SimRun, fleet_sim


def test_repeated_and_comma_separated_brokers_are_one_list() -> None:
    """--broker may be repeated and each value may list several; the order is kept."""
    assert parse_brokers(["127.0.0.1:1,127.0.0.1:2", "[::1]:3"]) == [
        ("127.0.0.1", 1), ("127.0.0.1", 2), ("::1", 3)]


@pytest.mark.parametrize(("values", "why"), [
    (["127.0.0.1:1,127.0.0.1:1"], "127.0.0.1:1 is given twice"),
    (["127.0.0.1:1,"], "has an empty broker in its list"),
    (["127.0.0.1:1,nope"], "'nope' is not HOST:PORT"),
])
def test_bad_broker_lists_are_usage_errors(values: list[str], why: str) -> None:
    """A broker given twice, an empty item or a bad HOST:PORT: a usage error naming it."""
    with pytest.raises(UsageError, match=why):
        parse_brokers(values)


def test_devices_are_dealt_out_round_robin() -> None:
    """Device i goes to broker i mod n, whatever process plays it."""
    brokers = [("a", 1), ("b", 2), ("c", 3)]
    assert [assign(i, brokers)[0] for i in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_revocations_are_apportioned_over_the_brokers() -> None:
    """A worker's picks are split over its brokers in proportion to their live devices,
    largest remainders first (25 of 10 x 50: five brokers give 3, five give 2)."""
    assert apportion(25, [50] * 10) == [3] * 5 + [2] * 5
    assert apportion(3, [1, 0, 5]) == [1, 0, 2]
    assert apportion(9, [2, 2]) == [2, 2]
    assert apportion(0, [4]) == [0]


def test_cli_rejects_a_broker_named_twice(lab: Lab, tmp_path: Path) -> None:
    """Exit 2 and one line naming --broker, before anything is enrolled."""
    result = fleet_sim("run", "--pki", lab.pki, "--broker", lab.broker, "--broker",
                       lab.broker, "--devices", "1", "--fleet-dir", tmp_path / "f")
    assert result.code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {lab.broker} is given twice (--broker)")


@pytest.fixture(scope="module")
def second_hub(lab: Lab) -> Iterator[HubProcess]:
    """Another hub on the lab's PKI, in its own folder (its own audit store)."""
    (lab.root / "second").mkdir()
    with HubProcess(write_hub_config(lab.root / "second", lab.pki)) as hub:
        yield hub


@pytest.fixture(scope="module")
def two_broker_run(lab: Lab, second_hub: HubProcess,
                   tmp_path_factory: pytest.TempPathFactory) -> SimRun:
    tmp = tmp_path_factory.mktemp("two-brokers")
    other = f"127.0.0.1:{second_hub.port}"
    return fleet_sim("run", "--pki", lab.pki, "--broker", f"{lab.broker},{other}",
                     "--devices", "6", "--rate", "200", "--duration", "1",
                     "--publish-interval", "0.3", "--processes", "2", "--quiet",
                     "--attacks", "--revoke", "0.5", "--fleet-dir", tmp / "fleet",
                     report=tmp / "report.json")


def _accepted(config: Path, want: int, timeout: float = 10.0) -> set[str]:
    """The fleet devices a hub's audit store has accepted, once *want* have landed (it is
    written in batches off the hub's loop) or *timeout* s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([sys.executable, "-m", "hub.cli", "events", "--config",
                               str(config), "--json"], capture_output=True, text=True,
                              check=True)
        found = {str(e["device_id"]) for e in json.loads(done.stdout)
                 if e["event"] == "accept" and str(e["device_id"]).startswith("sim-")}
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_the_fleet_is_spread_over_both_brokers(lab: Lab, second_hub: HubProcess,
                                                two_broker_run: SimRun) -> None:
    """Exit 0; 3 devices at each hub, the even ordinals at the first; the report's
    ``broker`` lists both and ``brokers`` gives each one's figures."""
    result = two_broker_run
    assert result.code == 0, result.stdout + result.stderr
    report = result.report
    assert report is not None
    other = f"127.0.0.1:{second_hub.port}"
    assert report["broker"] == f"{lab.broker},{other}"
    rows = {row["broker"]: row for row in report["brokers"]}
    assert set(rows) == {lab.broker, other}
    assert [(r["devices"], r["connected"], r["failed"]) for r in rows.values()] == [
        (3, 3, 0), (3, 3, 0)]
    fleet = sorted(p.stem for p in (Path(report["enrollment"]["fleet_dir"]) / "keys")
                   .iterdir())
    first = _accepted(lab.root / "hub.toml", 3)
    second = _accepted(lab.root / "second" / "hub.toml", 3)
    assert first == set(fleet[0::2])
    assert second == set(fleet[1::2])


def test_attacks_run_at_every_broker(lab: Lab, second_hub: HubProcess,
                                     two_broker_run: SimRun) -> None:
    """Each attack scenario appears once per broker, named scenario@HOST:PORT, all passed."""
    report = two_broker_run.report
    assert report is not None
    names = {s["name"] for s in report["scenarios"]}
    for broker in (lab.broker, f"127.0.0.1:{second_hub.port}"):
        for scenario in ("no-certificate", "revoked-before-connect", "client-id-spoofing",
                         "subscribe-all", "handshake-squatters", "publish-flood"):
            assert f"{scenario}@{broker}" in names
    assert all(s["passed"] for s in report["scenarios"]), report["scenarios"]


def test_revoked_devices_are_cut_off_at_their_own_broker(two_broker_run: SimRun) -> None:
    """Half the live fleet is revoked at the CA: every one disconnected and refused again,
    counted at the broker it was on; nobody else dropped."""
    report = two_broker_run.report
    assert report is not None
    revocation = report["revocation"]
    assert (revocation["revoked"], revocation["disconnected"],
            revocation["reconnects_refused"]) == (3, 3, 3)
    rows = report["brokers"]
    assert sum(r["revoked"] for r in rows) == 3
    assert all(r["revoked"] == r["disconnected"] == r["reconnects_refused"] for r in rows)
    assert all(r["unexpected_disconnects"] == 0 for r in rows)
