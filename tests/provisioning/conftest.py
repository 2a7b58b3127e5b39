"""Fixtures: a real PKI in a temporary folder, real CSRs, the CLI in-process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioning.authority import Authority, initialize
from provisioning.cli import main
from provisioning.config import PKIConfig

TRUST_DOMAIN = "fleet.test"
ORG = "Test Org"


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    initialize(root, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG), None)
    return root


@pytest.fixture
def authority(pki_dir: Path) -> Iterator[Authority]:
    with Authority(pki_dir) as auth:
        yield auth


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``fleet-provision ARGS`` in-process and capture what the operator would see."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def fleet_provision(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """The installed console script's code path, as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "provisioning.cli", *map(str, args)],
        capture_output=True, text=True, check=False, **kwargs,  # type: ignore[call-overload]
    )
