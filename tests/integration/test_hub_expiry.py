"""The hub's expiry figures (issue 14): connected devices whose certificate expires within 7
days and within 1 day, as ``fleet_hub_certificates_expiring{within}`` and in ``/healthz``,
counted over the live sessions when asked, from real certificates of the fleet's CA."""

from __future__ import annotations

import datetime as dt
import re
import urllib.request
from collections.abc import Callable

from tests.integration.fleet import Fleet, RunningHub
from tests.integration.healthz import healthz, wait_for
from tests.integration.mqtt import Client

ACCEPTED = 0
_SAMPLE = re.compile(r'^fleet_hub_certificates_expiring\{within="(\w+)"\} (\S+)$', re.MULTILINE)


def _expiring(hub: RunningHub) -> dict[str, float]:
    """The gauge's samples, by window, as /metrics shows them."""
    url = f"http://127.0.0.1:{hub.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {window: float(value) for window, value in _SAMPLE.findall(text)}


def test_connected_devices_are_counted_by_the_window_their_certificate_ends_in(
        fleet: Fleet, hub: RunningHub, connect: Callable[..., Client]) -> None:
    """Certificates ending in 10 minutes and 3 hours count in both windows, in 3 days only in
    7d, the fleet's default year in neither; a device that leaves stops counting, and a
    refused one never counts."""
    assert _expiring(hub) == {"7d": 0.0, "1d": 0.0}
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)
    devices = [fleet.device_with_validity("exp-minutes", start, now + dt.timedelta(minutes=10)),
               fleet.device_with_validity("exp-hours", start, now + dt.timedelta(hours=3)),
               fleet.device_with_validity("exp-days", start, now + dt.timedelta(days=3)),
               fleet.device("exp-year")]
    clients = {device.device_id: connect(device) for device in devices}
    for client in clients.values():
        assert client.connect() == ACCEPTED
    assert wait_for(lambda: _expiring(hub) == {"7d": 3.0, "1d": 2.0}), _expiring(hub)
    status, body = healthz(hub)
    assert status == 200
    assert body["certificates_expiring"] == {"7d": 3, "1d": 2}

    # A short certificate refused at CONNECT (wrong client id) is never a live session.
    refused = fleet.device_with_validity("exp-refused", start, now + dt.timedelta(hours=1))
    assert connect(refused, "someone-else").connect() != ACCEPTED

    clients["exp-hours"].close()
    assert wait_for(lambda: _expiring(hub) == {"7d": 2.0, "1d": 1.0}), _expiring(hub)
    clients["exp-days"].close()
    assert wait_for(lambda: _expiring(hub) == {"7d": 1.0, "1d": 1.0}), _expiring(hub)
    assert healthz(hub)[1]["certificates_expiring"] == {"7d": 1, "1d": 1}
