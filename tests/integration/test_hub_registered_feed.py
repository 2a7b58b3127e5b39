"""A real hub fed only by a fleet-state feed, with registered_only, seen through paho.

The feed is the tests' loopback one (tests/hub/feed_support.py: mutual TLS, documents signed
by the issuing key from the PKI folder, long-polls woken by a change); the hub is
``fleet-hub serve`` with ``[revocation] feed`` and no registry or CRL. What the feed lists is
admitted, what it does not is refused ``unregistered``, and a live session whose serial leaves
the feed is kicked at once; with the CA gone the hub keeps its state and /healthz stays 200;
restarted while the CA is still gone, it starts from ``feed_cache``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from provisioning.registry.feeddoc import Device
from tests.hub.feed_support import Signer, ThreadedFeed, state
from tests.integration.fleet import Fleet, RunningHub
from tests.integration.healthz import healthz, wait_healthz
from tests.integration.mqtt import Client
from tests.integration.test_hub_registered_only import mint_unrecorded

ACCEPTED, NOT_AUTHORIZED = 0, 135


@pytest.fixture(scope="module")
def feed(fleet: Fleet) -> Iterator[ThreadedFeed]:
    running = ThreadedFeed(fleet, Signer.issuing(fleet), state(1))
    yield running
    running.close()


def _config(fleet: Fleet, feed: ThreadedFeed) -> Path:
    config = fleet.write_config(
        "hub-feed.toml",
        revocation=f'feed = "{feed.url}"\nfeed_cache = "hub-feed-state.json"\n',
        extra="[auth]\nregistered_only = true\n")
    config.write_text(config.read_text().replace('"hub-audit.db"', '"hub-feed-audit.db"'))
    return config


def _feed_version(hub: RunningHub, version: int) -> None:
    wait_healthz(hub, lambda _status, body: body["feed"]["version"] == version)


def test_a_feed_fed_hub_admits_what_the_feed_lists_and_survives_the_ca(
        fleet: Fleet, feed: ThreadedFeed, connect: Callable[..., Client],
        tmp_path: Path) -> None:
    """Listed: admitted; minted and never listed: unregistered; delisted while connected:
    kicked; CA gone: state kept, /healthz 200; restarted with the CA gone: from the cache."""
    device = fleet.device("feed-dev")
    listed = {"feed-dev": Device(certificates=MappingProxyType({int(device.serial, 16):
                                                                "active"}))}
    minted_cert, minted_key = mint_unrecorded(fleet, "feed-dev", tmp_path / "minted")
    feed.publish(state(2, listed))
    hub = RunningHub.start(_config(fleet, feed))
    try:
        _feed_version(hub, 2)
        minted = connect(cert=minted_cert, key=minted_key, client_id="feed-dev", port=hub.port)
        assert minted.connect() == NOT_AUTHORIZED
        live = connect(device, port=hub.port)
        assert live.connect() == ACCEPTED

        feed.publish(state(3))  # the CA no longer lists the serial: kicked at once
        assert live.wait_disconnected()
        kicks = hub.wait_events("feed-dev", event="kick")
        assert [k["reason"] for k in kicks] == ["unregistered"]
        rejects = hub.wait_events("feed-dev", event="reject")
        assert [r["reason"] for r in rejects] == ["unregistered"]

        feed.publish(state(4, listed))
        _feed_version(hub, 4)
        feed.stop_server()  # the CA goes away: the state stays, healthz stays 200
        status, body = wait_healthz(hub, lambda _s, b: b["revocation"][0]["ok"] is False)
        assert status == 200
        assert body["feed"]["stale"] is False
        assert connect(device, port=hub.port).connect() == ACCEPTED
    finally:
        assert hub.stop() == 0, "".join(hub.log)

    hub = RunningHub.start(_config(fleet, feed))  # the CA still gone: from the cache
    try:
        status, body = healthz(hub)
        assert (status, body["feed"]["version"]) == (200, 4)
        assert connect(device, port=hub.port).connect() == ACCEPTED
        again = connect(cert=minted_cert, key=minted_key, client_id="feed-dev", port=hub.port)
        assert again.connect() == NOT_AUTHORIZED
        sources = [r["reason"] for r in hub.wait_events(event="source")]
        assert any(str(reason).startswith("feed down: ") for reason in sources)
    finally:
        assert hub.stop() == 0, "".join(hub.log)
    assert "starting from the cache" in "".join(hub.log)
