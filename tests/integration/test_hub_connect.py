"""Connect-time checks of DESIGN section 5, seen from a real paho client, and audited."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135  # paho 2 reports CONNACK 0x05 as reason 135


def _last_event(hub: RunningHub, device: str | None = None, *, want: int = 1,
                timeout: float = 5.0) -> dict[str, object]:
    """The audit store is written in batches off the loop: wait for the record to land."""
    rows = hub.wait_events(device, want=want, timeout=timeout)
    assert rows, "no audit record"
    return rows[-1]


def test_valid_device_is_accepted_and_audited(fleet: Fleet, hub: RunningHub,
                                              connect: Callable[..., Client]) -> None:
    """A device with a valid certificate and matching client id gets CONNACK 0."""
    device = fleet.device("valid-1")
    client = connect(device)
    assert client.connect() == ACCEPTED
    assert client.session_present is False
    event = _last_event(hub, "valid-1")
    assert event["event"] == "accept"
    assert event["serial"] == device.serial
    assert str(event["peer"]).startswith("127.0.0.1:")


def test_no_certificate_fails_the_handshake(fleet: Fleet, hub: RunningHub,
                                            connect: Callable[..., Client]) -> None:
    """Without a client certificate TLS fails: no CONNACK at all; audited as no-certificate."""
    before = len(hub.events())
    client = connect(None, "nobody")
    assert client.connect() is None
    rows = hub.wait_events(want=before + 1)
    assert rows[-1]["event"] == "reject"
    assert rows[-1]["reason"] == "no-certificate"


def test_foreign_ca_is_untrusted(hub: RunningHub, tmp_path: Path,
                                 connect: Callable[..., Client]) -> None:
    """A certificate with the right SAN from another fleet's CA fails the handshake."""
    rogue = Fleet.create(tmp_path / "rogue").device("valid-1")
    before = len(hub.events())
    assert connect(rogue).connect() is None
    event = _last_event(hub, want=before + 1)
    assert (event["event"], event["reason"]) == ("reject", "untrusted")


def test_expired_and_not_yet_valid(fleet: Fleet, hub: RunningHub,
                                   connect: Callable[..., Client]) -> None:
    """Expired and future certificates from our own CA fail the handshake, each by name."""
    now = dt.datetime.now(dt.UTC)
    expired = fleet.device_with_validity("old-1", now - dt.timedelta(days=30),
                                         now - dt.timedelta(days=1))
    future = fleet.device_with_validity("new-1", now + dt.timedelta(days=1),
                                        now + dt.timedelta(days=30))
    for device, reason in ((expired, "expired"), (future, "not-yet-valid")):
        before = len(hub.events())
        assert connect(device).connect() is None
        event = _last_event(hub, want=before + 1)
        assert (event["event"], event["reason"]) == ("reject", reason)


def test_revoked_device_is_refused(fleet: Fleet, hub: RunningHub,
                                   connect: Callable[..., Client]) -> None:
    """A revoked certificate completes TLS but gets CONNACK 5, audited with its serial."""
    device = fleet.device("stolen-1")
    with hub.revocation_change():  # the hub re-reads the registry every refresh (0.5 s)
        fleet.revoke("stolen-1")
    client = connect(device)
    assert client.connect() == NOT_AUTHORIZED
    event = _last_event(hub, "stolen-1")
    assert (event["event"], event["reason"], event["serial"]) == ("reject", "revoked",
                                                                  device.serial)


def test_suspended_device_is_refused_until_resumed(fleet: Fleet, hub: RunningHub,
                                                   connect: Callable[..., Client]) -> None:
    """On hold: refused as on-hold; after resume the same certificate is accepted again."""
    device = fleet.device("held-1")
    with hub.revocation_change():
        fleet.suspend("held-1")
    assert connect(device).connect() == NOT_AUTHORIZED
    assert _last_event(hub, "held-1")["reason"] == "on-hold"
    with hub.revocation_change():
        fleet.resume("held-1")
    assert connect(device).connect() == ACCEPTED


def test_client_id_must_match_the_certificate(fleet: Fleet, hub: RunningHub,
                                              connect: Callable[..., Client]) -> None:
    """Another device's client id with my certificate: CONNACK 5, reason client-id-mismatch."""
    device = fleet.device("honest-1")
    assert connect(device, "someone-else").connect() == NOT_AUTHORIZED
    event = _last_event(hub, "honest-1")
    assert (event["event"], event["reason"]) == ("reject", "client-id-mismatch")


def test_username_is_ignored_for_identity(fleet: Fleet, hub: RunningHub,
                                          connect: Callable[..., Client]) -> None:
    """A username such as 'admin' changes nothing: the certificate alone names the device."""
    device = fleet.device("plain-1")
    client = connect(device, username="admin", password="anything")
    assert client.connect() == ACCEPTED
    assert client.subscribe("#", "devices/plain-1/#") == [0x80, 1]


def test_sighup_rotates_the_server_certificate(fleet: Fleet, tmp_path: Path,
                                               connect: Callable[..., Client]) -> None:
    """After server-cert writes a new pair and the hub gets SIGHUP, new handshakes use it."""
    import shutil
    import signal
    import ssl

    from cryptography import x509

    from provisioning.authority import Authority

    served = tmp_path / "served"
    served.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(fleet.pki / name, served / name)
    config = fleet.write_config("hub-rotate.toml")
    config.write_text(config.read_text()
                      .replace('"pki/server.pem"', f'"{served / "server.pem"}"')
                      .replace('"pki/server.key"', f'"{served / "server.key"}"')
                      .replace('"hub-audit.db"', '"hub-rotate-audit.db"'))
    running = RunningHub.start(config)
    try:
        def served_serial() -> int:
            # TLS 1.3: the client side finishes before the hub asks for a certificate.
            pem = ssl.get_server_certificate(("127.0.0.1", running.port))
            return x509.load_pem_x509_certificate(pem.encode()).serial_number

        before = served_serial()
        with Authority(fleet.pki) as authority:
            authority.server_cert("localhost", ["127.0.0.1"], served)
        running.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while served_serial() == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served_serial() != before
        device = fleet.device("after-rotation")
        assert connect(device, port=running.port).connect() == ACCEPTED
        assert running.process.poll() is None
    finally:
        assert running.stop() == 0
