"""``device`` and ``devices`` print whole serials at any terminal width (issue 11 defect 14:
a rich table fitted to 120 columns cut them, and ``revoke --serial`` needs them whole)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.provisioning.conftest import CliResult, fleet_provision
from tests.provisioning.csrs import make_csr

# A wide device id, group and both timestamps push the serial out of a fitted table.
DEVICE = "sensor-with-a-rather-long-factory-identifier-0001"


@pytest.fixture
def renewed(pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> list[str]:
    """A device with two certificates (the first superseded); returns their serials."""
    for name in ("first", "second"):
        (tmp_path / f"{name}.csr").write_bytes(make_csr(cn=DEVICE))
    assert cli("sign", "--pki", pki_dir, "--group", "line-7-operators", "--out",
               tmp_path / "o", tmp_path / "first.csr").code == 0
    assert cli("sign", "--pki", pki_dir, "--renew", "--out", tmp_path / "o",
               tmp_path / "second.csr").code == 0
    shown = json.loads(cli("device", "--pki", pki_dir, DEVICE, "--json").out)
    serials = [c["serial"] for c in shown["certificates"]]
    assert len(serials) == 2
    assert all(len(s) >= 38 for s in serials)  # 159 random bits
    return serials


def _run(columns: int, *args: str | Path) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "25"}
    done = fleet_provision(*args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("columns", [80, 40])
def test_device_prints_every_serial_whole(columns: int, renewed: list[str],
                                          pki_dir: Path) -> None:
    """Each certificate's serial is one whole word of the output at 80 and 40 columns."""
    words = _run(columns, "device", "--pki", pki_dir, DEVICE).split()
    for serial in renewed:
        assert serial in words
    assert "…" not in words


@pytest.mark.parametrize("columns", [80, 40])
def test_devices_prints_the_current_serial_whole(columns: int, renewed: list[str],
                                                 pki_dir: Path) -> None:
    """devices lists the current (renewed) certificate's serial whole, one line per device."""
    lines = _run(columns, "devices", "--pki", pki_dir).splitlines()
    assert lines[0].split() == ["device", "status", "group", "serial", "not", "after"]
    assert lines[1].split()[:4] == [DEVICE, "active", "line-7-operators", renewed[-1]]


def test_a_printed_serial_revokes_that_certificate(renewed: list[str], pki_dir: Path,
                                                   cli: Callable[..., CliResult]) -> None:
    """Copied from ``device``'s output at 80 columns, a serial works for revoke --serial."""
    rows = _run(80, "device", "--pki", pki_dir, DEVICE).splitlines()
    superseded = next(line.split()[0] for line in rows if " superseded " in line)
    assert superseded == renewed[0]
    result = cli("revoke", "--pki", pki_dir, DEVICE, "--serial", superseded)
    assert result.code == 0, result.err
    shown = json.loads(cli("device", "--pki", pki_dir, DEVICE, "--json").out)
    assert [c["status"] for c in shown["certificates"]] == ["revoked", "active"]
