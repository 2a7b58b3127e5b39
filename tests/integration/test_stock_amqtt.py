"""Our plugins inside a stock amqtt, loaded from amqtt's own YAML configuration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from device_sim.lab import AMQTT_READY, ReadyProcess, amqtt_argv, amqtt_yaml, free_port
from tests.integration.fleet import Fleet
from tests.integration.healthz import revocation_change
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135


@pytest.fixture(scope="module")
def stock_metrics() -> SimpleNamespace:
    """Where the plugins' runtime serves /metrics and /healthz inside the stock amqtt."""
    return SimpleNamespace(metrics_port=free_port())


@pytest.fixture(scope="module")
def stock(fleet: Fleet, stock_metrics: SimpleNamespace) -> Iterator[int]:
    """`amqtt -c stock.yaml` with FleetAuthPlugin and FleetTopicPlugin, ready once its
    listener is bound (the lab's ReadyProcess)."""
    hub_toml = fleet.write_config(
        "hub-stock.toml", extra=f'[metrics]\nbind = "127.0.0.1:{stock_metrics.metrics_port}"\n')
    hub_toml.write_text(hub_toml.read_text().replace('"hub-audit.db"', '"stock-audit.db"')
                        .replace('bind = "127.0.0.1:0"\n\n[revocation]',
                                 'bind = "127.0.0.1:0"\n\n[revocation]'))
    yaml = fleet.root / "stock.yaml"
    yaml.write_text(amqtt_yaml(fleet.pki, free_port(), {
        "hub.plugins.FleetAuthPlugin": {"config": hub_toml},
        "hub.plugins.FleetTopicPlugin": {"config": hub_toml}}))
    with ReadyProcess("stock-amqtt", amqtt_argv(yaml), AMQTT_READY, cwd=fleet.root,
                      timeout=30, stop_timeout=15) as process:
        yield process.port


def test_stock_amqtt_runs_our_checks(fleet: Fleet, stock: int, stock_metrics: SimpleNamespace,
                                     connect: Callable[..., Client]) -> None:
    """Valid device in; revoked, client-id mismatch and no-certificate out; ACL enforced."""
    good = fleet.device("stock-good")
    revoked = fleet.device("stock-revoked")
    with revocation_change(stock_metrics):  # the plugins' snapshot has the revocation
        fleet.revoke("stock-revoked")
    client = connect(good, port=stock)
    assert client.connect() == ACCEPTED
    assert client.subscribe("devices/stock-good/#", "#") == [1, 0x80]
    assert connect(revoked, port=stock).connect() == NOT_AUTHORIZED
    assert connect(good, "stock-other", port=stock).connect() == NOT_AUTHORIZED
    # Stock amqtt completes TLS without a certificate (CERT_OPTIONAL); our plugin refuses.
    assert connect(None, "stock-good", port=stock).connect() == NOT_AUTHORIZED


def test_stock_amqtt_with_our_plugin_still_kicks_revoked_sessions(
        fleet: Fleet, stock: int, connect: Callable[..., Client]) -> None:
    """Even under a stock amqtt, the plugin closes a live session on revocation."""
    device = fleet.device("stock-live")
    client = connect(device, port=stock)
    assert client.connect() == ACCEPTED
    fleet.revoke("stock-live")
    assert client.wait_disconnected(2.0)
