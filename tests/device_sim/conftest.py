"""Fixtures: a PKI made with the provisioning library and a real ``fleet-hub serve``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_sim.lab import HubProcess, make_pki, write_hub_config


@dataclass
class Lab:
    root: Path
    pki: Path
    hub: HubProcess

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.hub.port}"


@dataclass(frozen=True)
class SimRun:
    code: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None

    def scenario(self, name: str) -> dict[str, Any]:
        assert self.report is not None
        return next(s for s in self.report["scenarios"] if s["name"] == name)


def fleet_sim(*args: str | Path, report: Path | None = None, timeout: float = 120,
              env: dict[str, str] | None = None) -> SimRun:
    """``fleet-sim ARGS`` as a user runs it (a new process), with its JSON report."""
    argv = [sys.executable, "-m", "device_sim.cli", *map(str, args)]
    if report is not None:
        argv += ["--report", str(report)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)
    data = json.loads(report.read_text()) if report is not None and report.exists() else None
    return SimRun(done.returncode, done.stdout, done.stderr, data)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("sim-lab")
    pki = make_pki(root)
    hub = HubProcess(write_hub_config(root, pki))
    yield Lab(root, pki, hub)
    assert hub.stop() == 0, "".join(hub.log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``scale`` tests run only when asked for (``pytest -m scale``)."""
    if "scale" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="scale test: run with -m scale")
    for item in items:
        if "scale" in item.keywords and "device_sim" in str(item.path):
            item.add_marker(skip)
