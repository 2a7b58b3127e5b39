"""Live sessions lose their connection the moment their certificate stops being good."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.broker import HANG_UP_GRACE
from tests.integration.fleet import Fleet, RunningHub
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135
REFRESH = 0.5


def _kick(hub: RunningHub, device: str, timeout: float = 5.0) -> dict[str, object]:
    kicks = hub.wait_events(device, event="kick", timeout=timeout)
    assert kicks, f"no kick recorded for {device}"
    return kicks[-1]


@pytest.mark.parametrize(("action", "reason"), [("revoke", "revoked"),
                                                ("suspend", "on-hold")])
def test_live_session_is_closed_within_refresh_plus_one_second(
        action: str, reason: str, fleet: Fleet, hub: RunningHub,
        connect: Callable[..., Client]) -> None:
    """revoke/suspend while connected: the hub closes the session and refuses reconnects."""
    name = f"live-{action}"
    device = fleet.device(name)
    client = connect(device)
    assert client.connect() == ACCEPTED
    started = time.monotonic()
    getattr(fleet, action)(name)
    assert client.wait_disconnected(REFRESH + 1.0)
    assert client.disconnected_at is not None
    assert client.disconnected_at - started <= REFRESH + 1.0
    kick = _kick(hub, name)
    assert (kick["reason"], kick["serial"]) == (reason, device.serial)
    assert connect(device).connect() == NOT_AUTHORIZED


def test_session_is_closed_at_certificate_not_after(fleet: Fleet, hub: RunningHub,
                                                    connect: Callable[..., Client]) -> None:
    """A certificate that expires mid-session ends the session at its not-after."""
    now = dt.datetime.now(dt.UTC)
    short = fleet.device_with_validity("short-lived", now - dt.timedelta(minutes=1),
                                       now + dt.timedelta(seconds=3))
    client = connect(short)
    assert client.connect() == ACCEPTED
    assert client.wait_disconnected(8)
    assert _kick(hub, "short-lived")["reason"] == "expired"


@pytest.fixture
def crl_only_hub(fleet: Fleet) -> Iterator[RunningHub]:
    """A gateway that knows revocations only from crl.pem (no registry on this host)."""
    config = fleet.write_config("hub-crl.toml", revocation=f'crl = "pki/crl.pem"\n'
                                f"refresh_seconds = {REFRESH}")
    text = config.read_text().replace('path = "hub-audit.db"', 'path = "hub-crl-audit.db"')
    config.write_text(text)
    running = RunningHub.start(config)
    yield running
    assert running.stop() == 0


def test_crl_file_source_kicks_too(fleet: Fleet, crl_only_hub: RunningHub,
                                   connect: Callable[..., Client]) -> None:
    """With only a CRL, a revocation still closes the live session within the refresh."""
    device = fleet.device("crl-dev")
    client = connect(device, port=crl_only_hub.port)
    assert client.connect() == ACCEPTED
    fleet.revoke("crl-dev")
    assert client.wait_disconnected(REFRESH + 1.0)
    assert _kick(crl_only_hub, "crl-dev")["reason"] == "revoked"


def test_healthz_and_metrics(fleet: Fleet, hub: RunningHub) -> None:
    """/healthz is ok with fresh sources; /metrics counts accepts, refusals and kicks."""
    import json
    import urllib.request

    assert hub.metrics_port is not None
    base = f"http://127.0.0.1:{hub.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:  # noqa: S310
        assert response.status == 200
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    assert "# TYPE fleet_hub_connects_accepted_total counter" in text
    assert 'fleet_hub_revocation_source_up{source="registry"} 1' in text


def test_stale_crl_makes_healthz_fail_but_keeps_the_list(
        fleet: Fleet, tmp_path: Path, connect: Callable[..., Client]) -> None:
    """A CRL past nextUpdate is still enforced, and /healthz says degraded (503)."""
    import json
    import urllib.error
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from provisioning.authority import Authority

    device = fleet.device("stale-dev")
    fleet.revoke("stale-dev")
    with Authority(fleet.pki) as authority:
        ca = authority.ca
        current = x509.load_pem_x509_crl((fleet.pki / "crl.pem").read_bytes())
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
                   .last_update(now - dt.timedelta(days=2))
                   .next_update(now - dt.timedelta(days=1))
                   .add_extension(x509.CRLNumber(10_000), critical=False))
        for entry in current:
            builder = builder.add_revoked_certificate(entry)
        stale = builder.sign(ca.key, hashes.SHA256())
    crl_path = tmp_path / "stale.pem"
    crl_path.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    config = fleet.write_config("hub-stale.toml",
                                revocation=f'crl = "{crl_path}"\nrefresh_seconds = 0.5')
    config.write_text(config.read_text().replace('"hub-audit.db"', '"hub-stale-audit.db"'))
    running = RunningHub.start(config)
    try:
        client = connect(device, port=running.port)
        assert client.connect() == NOT_AUTHORIZED
        url = f"http://127.0.0.1:{running.metrics_port}/healthz"
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(url, timeout=5)
        assert failure.value.code == 503
        body = json.loads(failure.value.read())
        assert body["status"] == "degraded"
        assert body["revocation"][0]["stale"] is True
        failure.value.close()
    finally:
        assert running.stop() == 0


def _mqtt_connect(client_id: str, keepalive: int = 60) -> bytes:
    name = client_id.encode()
    body = (b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
            + len(name).to_bytes(2, "big") + name)
    return bytes([0x10, len(body)]) + body


def _silent_client(port: int, ca: Path, device: Any) -> socket.socket:
    """TLS + CONNECT + CONNACK through a memory BIO; afterwards it never reads TLS again.

    Returns the raw TCP socket, so a test sees the TCP close itself, not the TLS goodbye.
    """
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(device.cert), str(device.key))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)

    def pump(step: Callable[[], object]) -> object:
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                assert data, "the hub closed the connection during set-up"
                incoming.write(data)
                continue
            raw.sendall(outgoing.read())
            return result

    pump(tls.do_handshake)
    pump(lambda: tls.write(_mqtt_connect(device.device_id)))
    connack = pump(lambda: tls.read(4))
    assert connack == b"\x20\x02\x00\x00"
    return raw


def test_revoked_device_that_ignores_the_tls_goodbye_is_cut_off(
        fleet: Fleet, hub: RunningHub) -> None:
    """A revoked device cannot hold the socket by never reading the TLS close_notify."""
    device = fleet.device("silent-revoked")
    raw = _silent_client(hub.port, fleet.ca, device)
    try:
        fleet.revoke("silent-revoked")
        deadline = time.monotonic() + REFRESH + 1.0 + HANG_UP_GRACE + 0.5
        closed = False
        while not closed and time.monotonic() < deadline:
            raw.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                closed = raw.recv(65536) == b""
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
        assert closed, "the TCP connection of a kicked device is still open"
        assert _kick(hub, "silent-revoked")["reason"] == "revoked"
    finally:
        raw.close()


def test_registry_revocation_is_seen_long_before_refresh_seconds(
        fleet: Fleet, connect: Callable[..., Client]) -> None:
    """The registry is looked at every 0.1 s: refresh_seconds = 5 still kicks within 1 s."""
    config = fleet.write_config("hub-slow.toml", refresh=5)
    config.write_text(config.read_text().replace('"hub-audit.db"', '"hub-slow-audit.db"'))
    running = RunningHub.start(config)
    try:
        device = fleet.device("fast-poll")
        client = connect(device, port=running.port)
        assert client.connect() == ACCEPTED
        started = time.monotonic()
        fleet.revoke("fast-poll")
        assert client.wait_disconnected(3.0)
        assert client.disconnected_at is not None
        assert client.disconnected_at - started < 1.0
    finally:
        assert running.stop() == 0


# -- issue 11: a damaged registry, a CRL stale on arrival ----------------------------------------


def _source_events(hub: RunningHub, want: int, timeout: float = 5.0) -> list[str]:
    """The reasons of the audit's "source" records, once *want* of them have landed."""
    rows = hub.wait_events(event="source", want=want, timeout=timeout)
    return [str(r["reason"]) for r in rows]


def _registry_state(status: int, body: dict[str, Any]) -> tuple[int, bool]:
    [registry] = [s for s in body["revocation"] if s["name"] == "registry"]
    return status, bool(registry["ok"])


def test_a_registry_overwritten_truncated_or_replaced_is_down_until_restored(
        tmp_path: Path) -> None:
    """Garbage written over registry.db in place (same inode), a garbage file put in its place
    (new inode), a truncated file: each time /healthz turns 503 with the registry not ok and
    its reason, the audit store gets "registry down: ...", the last good list stays in force
    (a suspended device is still refused, an active one still admitted); restoring the backup
    brings 200 and "registry up" back."""
    from provisioning.registry import Registry
    from tests.integration.healthz import wait_healthz

    fleet = Fleet.create(tmp_path / "own")
    good, held = fleet.device("reg-good"), fleet.device("reg-held")
    fleet.suspend("reg-held")
    registry = fleet.pki / "registry.db"
    backup = tmp_path / "backup.db"
    with Registry(registry) as db:
        db.conn.execute("VACUUM INTO ?", (str(backup),))
    config = fleet.write_config("hub-registry.toml",
                                revocation=f'registry = "pki/registry.db"\n'
                                f"refresh_seconds = {REFRESH}")
    running = RunningHub.start(config)
    clients: list[Client] = []

    def connects(device: Any) -> int | None:
        client = Client(running.port, fleet.ca, device.cert, device.key, device.device_id)
        clients.append(client)
        return client.connect()

    def damage(how: str) -> None:
        size = registry.stat().st_size
        if how == "in-place":
            with registry.open("r+b") as file:
                file.write(b"\xa5" * size)
        elif how == "new-inode":
            junk = tmp_path / "junk.db"
            junk.write_bytes(b"\x5a" * size)
            junk.replace(registry)
        else:
            with registry.open("r+b") as file:
                file.truncate(0)

    try:
        assert _registry_state(*wait_healthz(running, lambda s, _b: s == 200)) == (200, True)
        for round_, how in enumerate(("in-place", "new-inode", "truncated")):
            damage(how)
            _, body = wait_healthz(running, lambda s, b: _registry_state(s, b) == (503, False))
            [report] = body["revocation"]
            assert report["last_error"], report
            assert report["entries"] == 1  # the last good list: reg-held's certificate
            assert connects(held) == NOT_AUTHORIZED, how
            assert connects(good) == ACCEPTED, how
            # An operator's restore with the CA stopped: the old WAL files go with the old file.
            restored = tmp_path / f"restore-{how}.db"
            restored.write_bytes(backup.read_bytes())
            restored.replace(registry)
            for suffix in ("-wal", "-shm"):
                Path(f"{registry}{suffix}").unlink(missing_ok=True)
            wait_healthz(running, lambda s, b: _registry_state(s, b) == (200, True))
            reasons = _source_events(running, 2 * round_ + 2)
            assert len(reasons) == 2 * round_ + 2, reasons
            down, up = reasons[-2:]
            assert down.startswith("registry down: the registry is "), down
            assert up == "registry up"
        assert connects(held) == NOT_AUTHORIZED
    finally:
        for client in clients:
            client.close()
        assert running.stop() == 0


def test_a_crl_stale_on_arrival_does_not_readmit_a_revoked_device(
        fleet: Fleet, tmp_path: Path, connect: Callable[..., Client]) -> None:
    """CRL only: after a higher-numbered CRL that is already past its nextUpdate and lacks a
    revoked device, that device is still refused (the last good list stays in force, united
    with the stale one, whose own revocation is enforced too), /healthz is 503 with the
    source stale and why, and the audit store says "crl-file stale: ..."."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from provisioning.authority import Authority
    from tests.integration.healthz import wait_healthz

    revoked, other = fleet.device("arrive-revoked"), fleet.device("arrive-other")
    fleet.revoke("arrive-revoked")
    crl_path = tmp_path / "crl.pem"
    crl_path.write_bytes((fleet.pki / "crl.pem").read_bytes())
    config = fleet.write_config("hub-arrive.toml",
                                revocation=f'crl = "{crl_path}"\nrefresh_seconds = {REFRESH}')
    config.write_text(config.read_text().replace('"hub-audit.db"', '"hub-arrive-audit.db"'))
    running = RunningHub.start(config)
    try:
        assert connect(revoked, port=running.port).connect() == NOT_AUTHORIZED
        with Authority(fleet.pki) as authority:
            ca = authority.ca
            current = x509.load_pem_x509_crl(crl_path.read_bytes())
            number = current.extensions.get_extension_for_class(x509.CRLNumber).value
            now = dt.datetime.now(dt.UTC)
            stale = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
                     .last_update(now - dt.timedelta(days=2))
                     .next_update(now - dt.timedelta(days=1))  # a CA clock two days slow
                     .add_extension(x509.CRLNumber(number.crl_number + 1), critical=False)
                     .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                              .serial_number(int(other.serial, 16))
                                              .revocation_date(now).build())
                     .sign(ca.key, hashes.SHA256()))
        crl_path.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
        _, body = wait_healthz(running, lambda s, b: s == 503 and b["revocation"][0]["stale"])
        [report] = body["revocation"]
        assert report["ok"] is True
        assert report["entries"] == len(list(current)) + 1  # the good list and arrive-other
        assert "arrived already past its nextUpdate" in report["warning"]
        assert connect(revoked, port=running.port).connect() == NOT_AUTHORIZED
        assert connect(other, port=running.port).connect() == NOT_AUTHORIZED
        [reason] = _source_events(running, 1)
        assert reason.startswith("crl-file stale: CRL number ")
    finally:
        assert running.stop() == 0


def test_two_crls_in_one_file_refuse_the_revoked_of_both_issuers(
        fleet: Fleet, tmp_path: Path, connect: Callable[..., Client]) -> None:
    """An issuing-CA rotation's crl.pem (contract C1): the PEM CRLs of both intermediates in
    one file. A device of each is connected; once each issuer's CRL lists its device, both
    sessions are closed as revoked and both are refused on reconnect, while a third device of
    the new intermediate stays."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.hub.cabundle_support import leaf_from, second_intermediate
    from tests.hub.revocation_support import make_crl
    from tests.integration.healthz import healthz

    second = second_intermediate(fleet.pki)
    bundle = tmp_path / "ca-chain.pem"
    bundle.write_bytes(second.cert.public_bytes(serialization.Encoding.PEM)
                       + fleet.ca.read_bytes())
    crls = tmp_path / "crl.pem"

    def publish(number: int, *revoked: str) -> None:
        """The new issuer's CRL, then the first issuer's crl.pem, rewritten atomically."""
        new = make_crl(second.key, second.cert.subject, number,
                       [(int(s, 16), x509.ReasonFlags.key_compromise) for s in revoked])
        staged = tmp_path / "crl.pem.new"
        staged.write_bytes(new.public_bytes(serialization.Encoding.PEM)
                           + (fleet.pki / "crl.pem").read_bytes())
        staged.replace(crls)

    publish(1)
    config = fleet.write_config("hub-two-crls.toml", extra=(
        f'[listener]\nclient_ca = "{bundle}"\n'
        f'[audit]\npath = "{tmp_path / "audit.db"}"\n'),
        revocation=f'crl = "{crls}"\nrefresh_seconds = {REFRESH}')
    devices = tmp_path / "devices"
    devices.mkdir()
    old = fleet.device("two-crl-old")
    new = leaf_from(fleet.pki, second, "two-crl-new", devices)
    stays = leaf_from(fleet.pki, second, "two-crl-stays", devices)
    running = RunningHub.start(config)
    try:
        clients = {d.device_id: connect(d, port=running.port) for d in (old, new, stays)}
        assert [c.connect() for c in clients.values()] == [ACCEPTED] * 3
        fleet.revoke("two-crl-old")  # the PKI's crl.pem: the first issuer's CRL
        publish(2, new.serial)
        for name in ("two-crl-old", "two-crl-new"):
            assert clients[name].wait_disconnected(10), name
            assert _kick(running, name)["reason"] == "revoked"
        assert connect(old, port=running.port).connect() == NOT_AUTHORIZED
        assert connect(new, port=running.port).connect() == NOT_AUTHORIZED
        assert not clients["two-crl-stays"].disconnected.is_set()
        status, body = healthz(running)
        assert status == 200
        [source] = body["revocation"]
        first_issuer = x509.load_pem_x509_crl((fleet.pki / "crl.pem").read_bytes())
        assert (source["name"], source["ok"], source["stale"], source["entries"]) == (
            "crl-file", True, False, len(first_issuer) + 1)  # the module's earlier ones too
    finally:
        assert running.stop() == 0, "".join(running.log)
