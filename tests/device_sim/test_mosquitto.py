"""The same scenarios against Debian's Mosquitto: which of the fleet's expectations it breaks.

Mosquitto is configured as close to the hub's policy as it gets: ``require_certificate``,
``use_identity_as_username``, the fleet CRL and ``pattern readwrite devices/%u/#``. What it
does (recorded here, and in docs/simulator.md): the TLS checks hold; a CRL is read once at
start, so a device revoked later is still admitted and a revoked live session is never
closed; the client id is not bound to the certificate, so a spoofer takes over the victim's
session; a subscription to '#' is granted (then filtered by the ACL on delivery); and by
default it has none of the hub's [limits]: a 200 MB PUBLISH is read on, every retained
message is kept (the flood's bystander still gets its telemetry).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from device_sim.lab import make_pki
from tests.device_sim.brokers import MOSQUITTO, Mosquitto
from tests.device_sim.conftest import SimRun, fleet_sim

pytestmark = pytest.mark.skipif(MOSQUITTO is None,
                                reason="mosquitto missing: ./dev test installs it")

HOLDS = ["fleet-connect", "fleet-steady", "telemetry", "handshake-squatters",
         "no-certificate", "foreign-ca", "expired", "not-yet-valid", "publish-other-device",
         "publish-flood"]
BREAKS = ["revoked-before-connect", "client-id-spoofing", "subscribe-all",
          "revocation-disconnect", "revoked-reconnect", "oversize-packet", "retained-flood"]


@pytest.fixture(scope="module")
def mosquitto_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimRun]:
    root = tmp_path_factory.mktemp("mosquitto")
    pki = make_pki(root)
    broker = Mosquitto(root, pki)
    try:
        yield fleet_sim("run", "--pki", pki, "--broker", f"127.0.0.1:{broker.port}",
                        "--devices", "6", "--rate", "200", "--duration", "1",
                        "--publish-interval", "0.3", "--processes", "1", "--quiet",
                        "--attacks", "--revoke", "0.5", "--revocation-timeout", "2",
                        report=root / "report.json")
    finally:
        broker.stop()


def test_mosquitto_fails_the_run(mosquitto_run: SimRun) -> None:
    """Against Mosquitto the run does not pass: exit code 1, and the table says why."""
    assert mosquitto_run.code == 1, mosquitto_run.stdout + mosquitto_run.stderr
    assert mosquitto_run.report is not None
    assert mosquitto_run.report["passed"] is False
    assert "FAILED: " in mosquitto_run.stdout


@pytest.mark.parametrize("name", HOLDS)
def test_what_mosquitto_gets_right(mosquitto_run: SimRun, name: str) -> None:
    """TLS refusals (with a readable alert), the fleet's traffic and the publish ACL hold."""
    assert mosquitto_run.scenario(name)["passed"], mosquitto_run.scenario(name)


@pytest.mark.parametrize("name", BREAKS)
def test_what_mosquitto_gets_wrong(mosquitto_run: SimRun, name: str) -> None:
    """Revocation after start, client-id binding and wildcard subscriptions do not hold."""
    assert not mosquitto_run.scenario(name)["passed"], mosquitto_run.scenario(name)


def test_how_mosquitto_breaks_them(mosquitto_run: SimRun) -> None:
    """The observed outcomes, as the report words them."""
    observed = {s["name"]: s["observed"] for s in mosquitto_run.report["scenarios"]}  # type: ignore[index]
    # Mosquitto sends an alert ("certificate expired", "unknown ca"), but with TLS 1.3 the
    # client may read the closed socket before it: either way the refusal is in TLS.
    assert observed["expired"].startswith("refused in TLS: ")
    assert observed["foreign-ca"].startswith("refused in TLS: ")
    assert observed["revoked-before-connect"] == "accepted (CONNACK 0)"
    assert observed["client-id-spoofing"] == ("accepted (CONNACK 0); the victim was "
                                              "disconnected")
    assert observed["subscribe-all"].startswith("SUBACK 0x01 (granted); 0 messages")
    assert observed["revocation-disconnect"].startswith("0 of 3 disconnected")
    assert observed["revoked-reconnect"].startswith("0 of 3 refused")
    # message_size_limit defaults to the protocol's maximum (268,435,455), no rate limit, no
    # retained quota: the 200 MB PUBLISH is read on, the flood all comes back, 300 kept.
    assert observed["oversize-packet"] == "still open 3 s after 1,048,576 body bytes"
    assert observed["publish-flood"] == ("atk-00004: 50 of 50 arrived; atk-00003: 5,000 sent, "
                                         "5,000 delivered back to it (still connected)")
    assert observed["retained-flood"].startswith("300 retained messages came back")


def test_report_is_written_anyway(mosquitto_run: SimRun) -> None:
    """A failing run still writes its full JSON report."""
    assert mosquitto_run.report is not None
    assert mosquitto_run.report["revocation"]["revoked"] == 3
    assert mosquitto_run.report["connect"]["count"] == 6
