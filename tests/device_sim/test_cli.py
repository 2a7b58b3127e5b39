"""Usage errors: one line ``error: <what> (<where>)`` on stderr, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.cli import main
from tests.device_sim.brokers import free_port
from tests.device_sim.conftest import Lab, fleet_sim


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--broker", "nowhere", "--devices", "1"], "is not HOST:PORT (--broker)"),
    (["--broker", "127.0.0.1:99999", "--devices", "1"], "is not HOST:PORT (--broker)"),
    (["--broker", "127.0.0.1:8883", "--devices", "0"], "'--devices'"),
    (["--broker", "127.0.0.1:8883", "--devices", "1", "--revoke", "1.5"], "'--revoke'"),
    (["--broker", "127.0.0.1:8883", "--devices", "1", "--processes", "0"], "'--processes'"),
    (["--devices", "1"], "--broker"),
    (["--broker", "127.0.0.1:8883", "--devices", "1", "--bogus"], "--bogus"),
])
def test_bad_options(args: list[str], fragment: str, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """Bad or missing options name the option, in one line, exit 2."""
    assert main(["run", "--pki", str(tmp_path), *args]) == 2
    assert fragment in _one_line_error(capsys.readouterr().err)


def test_missing_pki(tmp_path: Path) -> None:
    """A PKI folder that does not exist is a usage error naming the folder (real process)."""
    result = fleet_sim("run", "--pki", tmp_path / "none", "--broker", "127.0.0.1:8883",
                       "--devices", "1")
    assert result.code == 2
    assert str(tmp_path / "none") in _one_line_error(result.stderr)


def test_unreachable_broker(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening at --broker: said before any device is enrolled."""
    assert main(["run", "--pki", str(lab.pki), "--broker", f"127.0.0.1:{free_port()}",
                    "--devices", "1", "--quiet"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "cannot reach the broker" in line
    assert line.endswith("(--broker)")


def test_enroll_needs_a_token(lab: Lab, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--enroll without $FLEET_SIM_TOKEN says how to get one."""
    monkeypatch.delenv("FLEET_SIM_TOKEN", raising=False)
    assert main(["run", "--pki", str(lab.pki), "--broker", lab.broker, "--devices", "1",
                    "--enroll", "https://127.0.0.1:1"]) == 2
    assert "NAME:SECRET" in _one_line_error(capsys.readouterr().err)


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Bare ``fleet-sim`` shows the commands and exits 2."""
    assert main([]) == 2
    assert "quickstart" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "fragment"), [
    (["--validity", "4m"], "needs --rotate (--validity)"),
    (["--renew-at", "0.5"], "needs --rotate (--renew-at)"),
    (["--rotate", "--validity", "4x"], "(--validity)"),
    (["--rotate", "--validity", "4m", "--renew-grace", "4m"], "(--renew-grace)"),
    (["--rotate", "--no-renew", "3"], "(--no-renew)"),
    (["--rotate", "--renew-at", "0.95"], "'--renew-at'"),
])
def test_rotate_options(args: list[str], fragment: str, lab: Lab,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """--rotate's options need --rotate; a bad duration, a grace not shorter than the
    validity, every device told not to renew, a fraction out of range: one line naming the
    option, exit 2, before anything is started or changed."""
    before = (lab.pki / "pki.toml").read_bytes()
    assert main(["run", "--pki", str(lab.pki), "--broker", lab.broker, "--devices", "3",
                 "--quiet", *args]) == 2
    assert fragment in _one_line_error(capsys.readouterr().err)
    assert (lab.pki / "pki.toml").read_bytes() == before


def test_rotate_with_a_service_on_another_validity(
        lab: Lab, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--rotate --enroll URL: the service's PKI must already issue --validity certificates
    (it read pki.toml when it started); otherwise the line says what to run."""
    monkeypatch.setenv("FLEET_SIM_TOKEN", "t:s")
    assert main(["run", "--pki", str(lab.pki), "--broker", lab.broker, "--devices", "3",
                 "--quiet", "--rotate", "--validity", "4m", "--enroll",
                 "https://127.0.0.1:1"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "validity is 365d, not 4m" in line
    assert "policy set" in line
    assert line.endswith("(--validity)")
