"""[auth] password = true: the MQTT password is a second factor checked against the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.integration.fleet import Fleet, RunningHub
from tests.integration.healthz import revocation_version, wait_version_above
from tests.integration.mqtt import Client

ACCEPTED, NOT_AUTHORIZED = 0, 135


@pytest.fixture(scope="module")
def password_hub(fleet: Fleet) -> Iterator[RunningHub]:
    config = fleet.write_config("hub-password.toml", password=True)
    config.write_text(config.read_text().replace('"hub-audit.db"', '"hub-password-audit.db"'))
    running = RunningHub.start(config)
    yield running
    assert running.stop() == 0


def _set_password(fleet: Fleet, device_id: str, secret: str) -> None:
    done = subprocess.run([sys.executable, "-m", "provisioning.cli", "password", "set",
                           "--pki", str(fleet.pki), device_id, "--password-env", "DEV_PW"],
                          env={**os.environ, "DEV_PW": secret}, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_password_is_required_and_checked(fleet: Fleet, password_hub: RunningHub,
                                          connect: Callable[..., Client]) -> None:
    """No password, a wrong one, or none set: refused (bad-password); the right one: in."""
    device = fleet.device("pw-dev")
    unset = connect(device, port=password_hub.port, username="pw-dev", password="x")
    assert unset.connect() == NOT_AUTHORIZED
    with password_hub.revocation_change():
        _set_password(fleet, "pw-dev", "correct horse")
    assert connect(device, port=password_hub.port).connect() == NOT_AUTHORIZED
    wrong = connect(device, port=password_hub.port, username="pw-dev", password="wrong")
    assert wrong.connect() == NOT_AUTHORIZED
    right = connect(device, port=password_hub.port, username="ignored-name",
                    password="correct horse")
    assert right.connect() == ACCEPTED
    reasons = [r["reason"] for r in password_hub.wait_events("pw-dev", event="reject", want=3)]
    assert reasons == ["bad-password"] * 3


def test_password_does_not_replace_the_certificate(fleet: Fleet, password_hub: RunningHub,
                                                   connect: Callable[..., Client]) -> None:
    """The right password with another device's certificate is still a client-id mismatch."""
    fleet.device("pw-owner")
    with password_hub.revocation_change():
        _set_password(fleet, "pw-owner", "s3cret")
    other = fleet.device("pw-other")
    client = connect(other, "pw-owner", port=password_hub.port, username="pw-owner",
                     password="s3cret")
    assert client.connect() == NOT_AUTHORIZED


def _rejects(hub: RunningHub, device: str, want: int, timeout: float = 5.0) -> list[str]:
    rows = hub.wait_events(device, event="reject", want=want, timeout=timeout)
    return [str(r["reason"]) for r in rows]


def test_the_password_is_compared_byte_for_byte(fleet: Fleet, password_hub: RunningHub,
                                                connect: Callable[..., Client]) -> None:
    """"secret" is admitted; "secret\\0" (scrypt's HMAC pads its key with zero bytes, so the
    hash alone cannot tell them apart) and "secret" plus a byte that is not UTF-8 are refused."""
    device = fleet.device("pw-exact")
    before = revocation_version(password_hub)
    _set_password(fleet, "pw-exact", "secret")
    wait_version_above(password_hub, before)
    for wrong in (b"secret\x00", b"secret\x00\x00", b"secret\xff"):
        client = connect(device, port=password_hub.port, username="pw-exact", password=wrong)
        assert client.connect() == NOT_AUTHORIZED, wrong
    right = connect(device, port=password_hub.port, username="pw-exact", password=b"secret")
    assert right.connect() == ACCEPTED
    assert _rejects(password_hub, "pw-exact", 3) == ["bad-password"] * 3


def test_bytes_that_are_not_utf8_never_match_a_secret(fleet: Fleet, password_hub: RunningHub,
                                                      connect: Callable[..., Client]) -> None:
    """A password that is not UTF-8 is refused, even against the secret its lenient decoding
    gives (U+FFFD for each bad byte) and against the secret spelt like Python's repr of it
    (what stock amqtt's CONNECT decoder hands over for such a password)."""
    raw = b"\xff\xfesecret"
    for device_id, secret in (("pw-replaced", raw.decode("utf-8", "replace")),
                              ("pw-repr", str(raw))):
        device = fleet.device(device_id)
        before = revocation_version(password_hub)
        _set_password(fleet, device_id, secret)
        wait_version_above(password_hub, before)
        client = connect(device, port=password_hub.port, username=device_id, password=raw)
        assert client.connect() == NOT_AUTHORIZED, device_id
        assert _rejects(password_hub, device_id, 1) == ["bad-password"]
