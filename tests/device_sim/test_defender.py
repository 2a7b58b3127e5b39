"""The defender scenarios (issue 15) against real hubs: real TLS, real certificates, the hub's
own /metrics and audit store.

One hub has the quickstart's [checks] (report, warn_days 1): every scenario must see its
finding, attributed to its device through ``fleet-hub audit``. A second hub's checks cannot
find anything (warn_days 0, a take-over window of a millisecond): the same scenarios must fail
there, saying the hub did not report, so the observation is not a formality. A third hub
quarantines: the clone's and the fight's certificates must be refused after the finding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sim.defender import (
    CLONED,
    EXPIRING,
    FIGHT,
    Checks,
    DefenderKit,
    DefenderRunner,
    HubWatch,
    parse_hub_metrics,
    prepare_defender,
)
from device_sim.errors import UsageError
from device_sim.lab import HubProcess, make_pki, write_hub_config
from device_sim.scenarios import AttackKit, AttackRunner, ScenarioResult
from provisioning.authority import Authority


class Site:
    def __init__(self, root: Path, pki: Path) -> None:
        self.root, self.pki = root, pki
        self.kit: DefenderKit = prepare_defender(pki, root / "defender")

    def run(self, hub: HubProcess, watch: HubWatch, **kw: float) -> dict[str, ScenarioResult]:
        ca_pem = (self.pki / "ca-chain.pem").read_text()
        attack = AttackRunner(_no_kit(), "127.0.0.1", hub.port, ca_pem)
        runner = DefenderRunner(
            self.kit, lambda files, source: attack.device(files, files.device_id,
                                                          source=source),
            watch, loopback=True, **kw)
        return {r.name: r for r in asyncio.run(runner.run())}


def _no_kit() -> AttackKit:
    return None  # type: ignore[return-value]  # AttackRunner.device reads no kit


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("defender")
    return Site(root, make_pki(root))


@pytest.fixture(scope="module")
def hub(site: Site) -> Iterator[tuple[HubProcess, Path]]:
    config = write_hub_config(site.root, site.pki)
    process = HubProcess(config)
    yield process, config
    assert process.stop() == 0, "".join(process.log)


def test_material_is_the_ca_s_own(site: Site) -> None:
    """Registered certificates; the fight's renewal is made once, when first asked for: then
    the device has a superseded and an active one. The expiring one has its chain."""
    kit = site.kit
    assert kit.superseded.device_id == kit.renewed.device_id

    def statuses() -> list[str]:
        with Authority(site.pki) as authority:
            return sorted(c.status for c in
                          authority.registry.certificates(kit.superseded.device_id))

    assert statuses() == ["active"]
    assert not kit.renewed.cert.exists()

    async def twice() -> tuple[float, float]:
        made = await asyncio.gather(kit.renewal.made(), kit.renewal.made())
        return made[0], made[1]

    first, second = asyncio.run(twice())
    assert first == second == asyncio.run(kit.renewal.made())
    assert statuses() == ["active", "superseded"]
    assert kit.renewed.cert.read_bytes().count(b"BEGIN CERTIFICATE") >= 2
    assert kit.expiring.cert.read_bytes().count(b"BEGIN CERTIFICATE") >= 2


def test_each_scenario_sees_its_finding(site: Site,
                                        hub: tuple[HubProcess, Path]) -> None:
    process, config = hub
    assert process.metrics_port is not None
    watch = HubWatch(("127.0.0.1", process.metrics_port), config,
                     Checks.from_hub_config(config))
    results = site.run(process, watch)
    for name, check, device in ((CLONED, "certificate-shared", site.kit.clone),
                                (FIGHT, "client-id-conflict", site.kit.superseded),
                                (EXPIRING, "certificate-expiring", site.kit.expiring)):
        result = results[name]
        assert result.passed, result
        assert f"the hub reported {check} for {device.device_id}" in result.observed
    assert results[CLONED].observed.startswith("2 take-overs from 127.0.3.1 and 127.0.3.2")
    assert "peers 127.0.3.1:" in results[CLONED].observed  # the finding's evidence
    assert site.kit.renewed.device_id in results[FIGHT].expected


def test_without_a_channel_the_finding_is_not_observed(site: Site,
                                                       hub: tuple[HubProcess, Path]) -> None:
    """Nothing to read the hub with: what a device sees decides, and it says so."""
    results = site.run(hub[0], HubWatch())
    for result in results.values():
        assert result.passed, result
        assert "not observed" in result.observed


def test_a_hub_whose_checks_find_nothing_fails_them(site: Site, tmp_path: Path) -> None:
    config = write_hub_config(tmp_path, site.pki, layers=(
        {"checks": {"warn_days": 0, "shared_window_seconds": 0.001}},))
    process = HubProcess(config)
    try:
        assert process.metrics_port is not None
        watch = HubWatch(("127.0.0.1", process.metrics_port), None)
        results = site.run(process, watch, finding_timeout=2.0)
    finally:
        assert process.stop() == 0
    for name, check in ((CLONED, "certificate-shared"), (FIGHT, "client-id-conflict"),
                        (EXPIRING, "certificate-expiring")):
        result = results[name]
        assert not result.passed, result
        assert f'fleet_hub_findings_total{{check="{check}"}} +0' in result.observed
    assert results[CLONED].observed.startswith("2 take-overs")


def test_hub_metrics_option_pairs_with_the_brokers() -> None:
    assert [w.metrics for w in parse_hub_metrics(["127.0.0.1:9883,h:1"], 2)] == [
        ("127.0.0.1", 9883), ("h", 1)]
    assert parse_hub_metrics([], 3) == ()
    with pytest.raises(UsageError, match="1 metrics listeners for 2 brokers"):
        parse_hub_metrics(["127.0.0.1:9883"], 2)
    with pytest.raises(UsageError, match="not HOST:PORT"):
        parse_hub_metrics(["nope"], 1)


def test_with_quarantine_the_certificates_are_refused_after(site: Site,
                                                             tmp_path: Path) -> None:
    """A hub whose config says action = "quarantine": the finding, then a refusal."""
    config = write_hub_config(tmp_path, site.pki, layers=({"checks": {"action": "quarantine"}},))
    process = HubProcess(config)
    try:
        assert process.metrics_port is not None
        watch = HubWatch(("127.0.0.1", process.metrics_port), config,
                         Checks.from_hub_config(config))
        results = site.run(process, watch)
    finally:
        assert process.stop() == 0
    for name in (CLONED, FIGHT):
        result = results[name]
        assert result.passed, result
        assert "quarantines its certificates" in result.expected
        assert "action quarantine" in result.observed
        assert result.observed.endswith("; a new connection: refused: CONNACK 5 "
                                        "(not authorised)")
    assert results[EXPIRING].passed, results[EXPIRING]
