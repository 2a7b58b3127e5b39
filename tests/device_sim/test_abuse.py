"""The abuse scenarios' pieces: the limits they expect, the bytes they send, their bounds."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from device_sim.abuse import Limits, remaining_length
from device_sim.lab import write_hub_config
from device_sim.squatters import SquatFacts, fd_budget, scenario


@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
    (200_000_000, b"\x80\x84\xaf\x5f"),
])
def test_remaining_length_is_mqtts_variable_byte_integer(value: int, encoded: bytes) -> None:
    """MQTT 3.1.1 §2.2.3's examples, and the oversize PUBLISH's 200 MB."""
    assert remaining_length(value) == encoded


def test_limits_default_to_design_section_5() -> None:
    """Without the broker's config the scenarios expect DESIGN's defaults, marked unknown."""
    limits = Limits()
    assert (limits.max_packet_bytes, limits.publish_rate, limits.max_retained_per_device,
            limits.max_pending_tls) == (262_144, 100.0, 100, 16)
    assert not limits.known
    assert limits.to_json()["source"] == "DESIGN defaults"


def test_limits_from_quickstarts_hub_config(tmp_path: Path) -> None:
    """quickstart's hub.toml has no [limits]: the hub's defaults, now known."""
    config = write_hub_config(tmp_path, tmp_path / "pki")
    limits = Limits.from_hub_config(config)
    assert limits == Limits(known=True)
    assert limits.to_json()["source"] == "hub config"


def test_limits_from_a_hub_config_with_limits(tmp_path: Path) -> None:
    """Keys in [limits] override the defaults; the others stay."""
    config = write_hub_config(tmp_path, tmp_path / "pki")
    config.write_text(config.read_text() + "\n[limits]\npublish_rate = 20\n"
                      "max_retained_per_device = 5\non_rate_limit = \"disconnect\"\n")
    limits = Limits.from_hub_config(config)
    assert (limits.publish_rate, limits.max_retained_per_device, limits.on_rate_limit) == (
        20.0, 5, "disconnect")
    assert limits.max_packet_bytes == 262_144


def test_squatters_are_bounded_by_the_descriptor_limit() -> None:
    """Never more squatters than descriptors to spare under RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fd_budget(200) <= 200
    assert fd_budget(10**9) < soft


def test_squatter_scenario_fails_when_the_fleet_waited() -> None:
    """All devices connected, but p99 past the bound: a device waited for a squatter."""
    facts = SquatFacts(asked=200, opened=200, sources=25, open_at_ramp_end=8, failure=None)
    slow = scenario(facts, 100, {"count": 100, "failed": 0, "p99_ms": 29_995.5})
    assert not slow.passed
    assert slow.observed == ("200 squatters from 25 source addresses, 8 still open when the "
                             "ramp ended; fleet: 100 connected, 0 failed, p99 29,996 ms")
    assert scenario(facts, 100, {"count": 100, "failed": 0, "p99_ms": 215.0}).passed
    assert not scenario(facts, 100, {"count": 99, "failed": 1, "p99_ms": 215.0}).passed
    none = SquatFacts(asked=200, opened=0, sources=25, open_at_ramp_end=0,
                      failure="Connection refused")
    refused = scenario(none, 100, {"count": 100, "failed": 0, "p99_ms": 215.0})
    assert not refused.passed
    assert refused.observed.endswith("(Connection refused)")
