"""``fleet-sim``: thousands of virtual devices exercising mutual TLS, attacks and revocation.

Exit codes: 0 every expectation held, 1 some observed outcome differed (or the CA refused
the fleet), 2 usage. Every expected failure is one line on stderr: ``error: <what> (<where>)``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from device_sim.abuse import Limits
from device_sim.brokers import parse_brokers
from device_sim.defender import lab_watch, parse_hub_metrics
from device_sim.display import Display
from device_sim.errors import SimError, UsageError
from device_sim.fleet import RunSettings, run_fleet
from device_sim.lab import (
    CAServiceProcess,
    Gateways,
    HubProcess,
    gateway_name,
    make_pki,
    write_gateway_config,
    write_hub_config,
)
from device_sim.lab.policy import policy, rotation_service
from device_sim.report import render
from device_sim.rotation import RotateSettings
from fleetcli import new_app, run_cli
from provisioning.duration import format_duration, parse_duration
from provisioning.errors import ProvisioningError
from provisioning.pki import PKI

app = new_app("Virtual device fleets: per-device certificates, mutual TLS, attacks, revocation.")

DEFAULT_PKI = Path("fleet-pki")
TOKEN_ENV = "FLEET_SIM_TOKEN"  # noqa: S105  (the name of a variable, not a secret)
QUICKSTART_DEVICES = 500
MAX_GATEWAYS = 32
DEFAULT_VALIDITY = "4m"  # --rotate: DESIGN section 10's example
DEFAULT_RENEW_AT = 0.67
DEFAULT_ROUNDS = 2

out = Console(highlight=False, soft_wrap=True)


def _token(env_var: str) -> tuple[str, str]:
    value = os.environ.get(env_var)
    if not value or ":" not in value:
        raise UsageError(f"--enroll needs an enrollment token in ${env_var} as NAME:SECRET "
                         "(fleet-provision token create prints one)", "--token-env")
    name, _, secret = value.partition(":")
    return name, secret


def _finish(report: dict[str, Any], report_file: Path | None) -> None:
    render(report, out)
    if report_file is not None:
        try:
            report_file.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write the report: {exc.strerror}", str(report_file),
                             ) from None
    if not report["passed"]:
        raise typer.Exit(1)


@app.command()
def run(
    broker: Annotated[list[str], typer.Option(
        "--broker", metavar="HOST:PORT",
        help="The MQTT broker (mutual TLS). Several: repeat the option or give a "
             "comma-separated list; devices are spread over them round-robin.")],
    devices: Annotated[int, typer.Option("--devices", min=1, max=1_000_000,
                                         help="Fleet size.")],
    pki: Annotated[Path, typer.Option("--pki", envvar="FLEET_PKI", help="PKI folder.")]
    = DEFAULT_PKI,
    rate: Annotated[float, typer.Option("--rate", min=0.1,
                                        help="Connects per second (ramp).")] = 200.0,
    duration: Annotated[float, typer.Option(
        "--duration", min=0, help="Seconds the whole fleet stays connected.")] = 10.0,
    publish_interval: Annotated[float, typer.Option(
        "--publish-interval", min=0.05, help="Seconds between telemetry messages.")] = 5.0,
    revoke: Annotated[float, typer.Option(
        "--revoke", min=0.0, max=1.0, metavar="FRACTION",
        help="Revoke this fraction of the connected devices mid-run.")] = 0.0,
    attacks: Annotated[bool, typer.Option("--attacks", help="Add the attack scenarios.")]
    = False,
    processes: Annotated[int | None, typer.Option(
        "--processes", min=1, max=256,
        help="Worker processes [default: one per 1,000 devices, up to the CPUs]")] = None,
    report: Annotated[Path | None, typer.Option("--report", metavar="FILE",
                                                help="Write the report as JSON.")] = None,
    fleet_dir: Annotated[Path | None, typer.Option(
        "--fleet-dir", metavar="DIR",
        help="Device keys and certificates, kept for the next run [default: PKI/sim-fleet]",
    )] = None,
    enroll: Annotated[str | None, typer.Option(
        "--enroll", metavar="URL",
        help="Enroll through the EST service at URL instead of the library.")] = None,
    token_env: Annotated[str, typer.Option(
        "--token-env", metavar="VAR",
        help="Environment variable holding the enrollment token as NAME:SECRET.")]
    = TOKEN_ENV,
    connect_timeout: Annotated[float, typer.Option("--connect-timeout", min=0.1,
                                                   help="Seconds per connect.")] = 30.0,
    revocation_timeout: Annotated[float, typer.Option(
        "--revocation-timeout", min=0.1,
        help="Seconds a revoked live device may stay connected.")] = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No live progress.")] = False,
    hub_metrics: Annotated[list[str] | None, typer.Option(
        "--hub-metrics", metavar="HOST:PORT",
        help="With --attacks: each broker's metrics listener (same order as --broker), "
             "where the defender scenarios read the hub's findings.")] = None,
    rotate: Annotated[bool, typer.Option(
        "--rotate", help="The devices renew their certificates (EST simplereenroll) and "
        "switch to them mid-run; the report adds a rotation object.")] = False,
    validity: Annotated[str | None, typer.Option(
        "--validity", metavar="DURATION",
        help="With --rotate: the certificates' lifetime (the PKI's policy for the run) "
             "[default: 4m]")] = None,
    renew_at: Annotated[float | None, typer.Option(
        "--renew-at", min=0.1, max=0.9, metavar="FRACTION",
        help="With --rotate: renew at this fraction of a certificate's life [default: 0.67]",
    )] = None,
    renew_grace: Annotated[str | None, typer.Option(
        "--renew-grace", metavar="DURATION",
        help="With --rotate: how long a replaced certificate stays valid [default: an "
             "eighth of the validity]")] = None,
    no_renew: Annotated[int | None, typer.Option(
        "--no-renew", min=0, metavar="N",
        help="With --rotate: N devices do not renew and must be closed at their not-after "
             "[default: 2, fewer in a fleet under 8]")] = None,
    rounds: Annotated[int | None, typer.Option(
        "--rounds", min=1, max=100,
        help="With --rotate: hold until every renewing device has renewed this many times "
             "(and at least --duration) [default: 2]")] = None,
) -> None:
    """Enroll a fleet, connect it to a broker, attack, revoke, and report.

    Example: fleet-sim run --pki fleet-pki --broker 127.0.0.1:8883 --devices 1000 --attacks
    --revoke 0.05 --report report.json

    Rotation: fleet-sim run --pki fleet-pki --broker 127.0.0.1:8883 --devices 100 --rotate
    --validity 4m --renew-at 0.67
    """
    brokers = parse_brokers(broker)
    (host, port), several = brokers[0], len(brokers) > 1
    PKI(pki)  # a missing or incomplete PKI is a usage error now, not mid-run
    if enroll is not None and not enroll.startswith(("https://", "http://")):
        raise UsageError(f"{enroll!r} is not an http(s) URL", "--enroll")
    if hub_metrics and not attacks:
        raise UsageError("needs --attacks", "--hub-metrics")
    settings = RunSettings(
        pki=pki, host=host, port=port, brokers=tuple(brokers) if several else (),
        devices=devices, rate=rate, duration=duration,
        publish_interval=publish_interval, revoke=revoke, attacks=attacks,
        processes=processes, fleet_dir=fleet_dir, enroll_url=enroll,
        enroll_token=_token(token_env) if enroll is not None else None,
        connect_timeout=connect_timeout, revocation_timeout=revocation_timeout,
        hub_watch=parse_hub_metrics(hub_metrics or [], len(brokers)))
    given = {"--validity": validity, "--renew-at": renew_at, "--renew-grace": renew_grace,
             "--no-renew": no_renew, "--rounds": rounds}
    if not rotate:
        for option, value in given.items():
            if value is not None:
                raise UsageError("needs --rotate", option)
        with Display(quiet=quiet) as display:
            result = run_fleet(settings, display)
        _finish(result, report)
        return
    life = parse_duration(validity or DEFAULT_VALIDITY, "--validity")
    if renew_grace is not None:
        grace = parse_duration(renew_grace, "--renew-grace")
    elif enroll is not None:  # the service's own, which it read when it started
        grace = parse_duration(policy(pki)["renew_grace"], "renew_grace")
    else:
        grace = dt.timedelta(seconds=max(1, int(life.total_seconds() / 8)))
    if grace >= life and enroll is None:  # with --enroll the service's policy is checked
        raise UsageError(f"{format_duration(grace)} is not shorter than the validity "
                         f"{format_duration(life)}", "--renew-grace")
    told = no_renew if no_renew is not None else min(2, devices // 4)
    if told >= devices:
        raise UsageError(f"{told} of {devices} devices would not renew; want fewer",
                         "--no-renew")
    with rotation_service(pki, format_duration(life), format_duration(grace),
                          enroll) as est_url, Display(quiet=quiet) as display:
        display.phase(f"renewing through {est_url} (validity {format_duration(life)}, "
                      f"renew_grace {format_duration(grace)})")
        result = run_fleet(replace(settings, rotate=RotateSettings(
            est_url, life, grace, renew_at=renew_at or DEFAULT_RENEW_AT, no_renew=told,
            rounds=rounds or DEFAULT_ROUNDS)), display)
    _finish(result, report)


@app.command()
def quickstart(
    devices: Annotated[int, typer.Option("--devices", min=1, max=20_000,
                                         help="Fleet size.")] = QUICKSTART_DEVICES,
    gateways: Annotated[int, typer.Option(
        "--gateways", min=1, max=MAX_GATEWAYS,
        help="1: one hub on the CA's registry. More: the CA service and that many hubs fed "
             "by its fleet-state feed, the devices spread over them.")] = 1,
    report: Annotated[Path | None, typer.Option("--report", metavar="FILE",
                                                help="Write the report as JSON.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No live progress.")] = False,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the temporary folder (PKI, registry, hub audit) and print its "
        "path.")] = False,
) -> None:
    """The whole story in a temporary folder: PKI, hub, enrollment, attacks, revocation.

    Example: fleet-sim quickstart --gateways 3
    """
    started = time.monotonic()
    # TemporaryDirectory(delete=False) needs Python 3.12.
    folder = (contextlib.nullcontext(tempfile.mkdtemp(prefix="fleet-sim-")) if keep
              else tempfile.TemporaryDirectory(prefix="fleet-sim-"))
    with Display(quiet=quiet) as display, folder as tmp:
        root = Path(tmp)
        if gateways == 1:
            result, config = _one_hub(root, devices, display)
        else:
            result, config = _fed_gateways(root, devices, gateways, display)
        display.phase(f"done in {time.monotonic() - started:.1f} s")
        if keep:
            sys.stderr.write(f"fleet-sim: kept {root} (fleet-hub events --config {config})\n")
    _finish(result, report)


def _quickstart_settings(pki: Path, endpoints: list[tuple[str, int]], devices: int,
                         config: Path, hubs: list[tuple[HubProcess, Path]]) -> RunSettings:
    (host, port), several = endpoints[0], len(endpoints) > 1
    return RunSettings(pki=pki, host=host, port=port, devices=devices, rate=500.0,
                       duration=3.0, publish_interval=2.0, revoke=0.05, attacks=True,
                       limits=Limits.from_hub_config(config),
                       brokers=tuple(endpoints) if several else (),
                       hub_watch=tuple(lab_watch(h.metrics_port, c) for h, c in hubs))


def _one_hub(root: Path, devices: int, display: Display) -> tuple[dict[str, Any], Path]:
    """A PKI and one hub watching its registry and CRL (same host): the classic story."""
    display.phase(f"creating a PKI and a hub certificate in {root}")
    pki = make_pki(root)
    config = write_hub_config(root, pki)
    display.phase(f"starting fleet-hub serve --config {config}")
    with HubProcess(config) as hub:
        display.phase(f"hub ready on {hub.host}:{hub.port}")
        result = run_fleet(_quickstart_settings(pki, [("127.0.0.1", hub.port)], devices,
                                                config, [(hub, config)]), display)
        display.phase("stopping the hub")
    return result, config


def _fed_gateways(root: Path, devices: int, count: int,
                  display: Display) -> tuple[dict[str, Any], Path]:
    """The CA service and *count* gateways that know the fleet only from its feed (DESIGN
    section 9); the devices dealt out round-robin, revocations made at the CA."""
    display.phase(f"creating a PKI in {root}")
    pki = make_pki(root)
    display.phase(f"starting fleet-provision serve --pki {pki} (EST and the fleet-state feed)")
    with CAServiceProcess(pki) as ca:
        names = [gateway_name(i) for i in range(count)]
        display.phase(f"CA service ready at {ca.url}; {count} gateways ({', '.join(names)}), "
                      f"each with its own certificate, fed by {ca.feed_url}")
        configs = [write_gateway_config(root, pki, name, ca.feed_url) for name in names]
        with Gateways(configs) as hubs:
            display.phase("gateways ready: " + ", ".join(
                f"{name} on {hub.host}:{hub.port}" for name, hub in zip(names, hubs,
                                                                         strict=True)))
            result = run_fleet(_quickstart_settings(pki, hubs.endpoints, devices, configs[0],
                                                    list(zip(hubs, configs, strict=True))),
                               display)
            display.phase("stopping the gateways")
        display.phase("stopping the CA service")
    for row, name, config in zip(result["brokers"], names, configs, strict=True):
        row["gateway"], row["config"] = name, str(config)
    return result, configs[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per failure, exit codes 0/1/2 (fleetcli.run_cli)."""
    return run_cli(app, argv, prog_name="fleet-sim",
                   errors=((SimError, None), (ProvisioningError, None)))


if __name__ == "__main__":
    sys.exit(main())
