"""Enrollment: own keys and CSRs, the library in chunks or EST, cached in the fleet folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.enroll import FleetDir, LibraryEnroller
from device_sim.errors import EnrollError
from device_sim.factory import load_key
from device_sim.lab import make_pki
from provisioning.authority import Authority
from tests.device_sim.conftest import Lab, fleet_sim


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path)


def test_each_device_has_its_own_p256_key_and_certificate(pki: Path, tmp_path: Path) -> None:
    """Distinct P-256 keys; each certificate names its device and matches its key."""
    enrollment = FleetDir(tmp_path / "fleet").prepare(pki, 5, LibraryEnroller(pki))
    assert (enrollment.enrolled, enrollment.cached) == (5, 0)
    publics = set()
    for files in enrollment.devices:
        key = load_key(files.key)
        assert isinstance(key.curve, ec.SECP256R1)
        assert files.key.stat().st_mode & 0o777 == 0o600
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == files.device_id
        assert cert.public_key() == key.public_key()
        publics.add(key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    assert len(publics) == 5


def test_cache_is_reused_and_revoked_devices_retired(pki: Path, tmp_path: Path) -> None:
    """A second prepare issues nothing; a revoked device is replaced under a new id."""
    fleet = FleetDir(tmp_path / "fleet")
    first = fleet.prepare(pki, 4, LibraryEnroller(pki))
    again = fleet.prepare(pki, 4, LibraryEnroller(pki))
    assert (again.enrolled, again.cached) == (0, 4)
    assert [d.device_id for d in again.devices] == [d.device_id for d in first.devices]
    with Authority(pki) as authority:
        authority.revoke("sim-00002", None, "keyCompromise")
    third = fleet.prepare(pki, 4, LibraryEnroller(pki))
    assert (third.enrolled, third.cached, third.retired) == (1, 3, 1)
    ids = [d.device_id for d in third.devices]
    assert "sim-00002" not in ids
    assert "sim-00005" in ids
    assert not (tmp_path / "fleet" / "keys" / "sim-00002.key").exists()


def test_ids_of_another_fleet_folder_are_skipped(pki: Path, tmp_path: Path) -> None:
    """Two fleet folders on one PKI never claim the same device id."""
    FleetDir(tmp_path / "a").prepare(pki, 2, LibraryEnroller(pki))
    second = FleetDir(tmp_path / "b").prepare(pki, 2, LibraryEnroller(pki))
    assert [d.device_id for d in second.devices] == ["sim-00003", "sim-00004"]


def test_refused_csrs_are_an_error(pki: Path, tmp_path: Path) -> None:
    """A CA that refuses the fleet (a suspended id) stops the run with the reason."""
    FleetDir(tmp_path / "a").prepare(pki, 1, LibraryEnroller(pki))

    class Refusing(LibraryEnroller):
        def enroll(self, requests: list[tuple[str, bytes]], out_dir: Path,
                   progress: object) -> dict[str, str]:
            return {device_id: "not-in-manifest: no" for device_id, _ in requests}

    with pytest.raises(EnrollError, match=r"1 of 1 CSRs were refused.*not-in-manifest"):
        FleetDir(tmp_path / "b").prepare(pki, 1, Refusing(pki))


@pytest.fixture
def est(lab: Lab) -> Iterator[tuple[str, str]]:
    """``fleet-provision serve`` on the lab's PKI, and an enrollment token for it."""
    with Authority(lab.pki) as authority:
        secret = authority.create_token(f"sim-{os.getpid()}")
    process = subprocess.Popen([sys.executable, "-m", "provisioning.cli", "serve", "--pki",
                                str(lab.pki), "--bind", "127.0.0.1:0"],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    url = None
    for line in process.stderr:
        found = re.search(r"listening on (https://\S+)", line)
        if found:
            url = found[1]
            break
    try:
        assert url is not None, "serve did not start"
        yield url, f"sim-{os.getpid()}:{secret}"
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_enroll_through_the_est_service(lab: Lab, est: tuple[str, str],
                                        tmp_path: Path) -> None:
    """--enroll URL: every device enrolls over EST with the token, then connects."""
    url, token = est
    result = fleet_sim("run", "--pki", lab.pki, "--broker", lab.broker, "--devices", "3",
                       "--duration", "0.5", "--processes", "1", "--quiet", "--enroll", url,
                       "--fleet-dir", tmp_path / "fleet", report=tmp_path / "r.json",
                       env={**os.environ, "FLEET_SIM_TOKEN": token})
    assert result.code == 0, result.stdout + result.stderr
    assert result.report is not None
    assert result.report["enrollment"]["method"] == "est"
    assert result.report["enrollment"]["enrolled"] == 3
    assert result.report["connect"]["count"] == 3
