"""``fleet-hub``: serve the gateway broker, check a config, read the audit store.

Exit codes: 0 done, 1 a runtime failure (e.g. the port is taken), 2 usage or bad config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fleetcli import new_app, run_cli
from hub.config import HubConfig, load_config
from hub.errors import ConfigError, HubError
from hub.findings.cli import app as quarantine_app

app = new_app("The edge-gateway MQTT broker that admits only valid, unrevoked device "
              "certificates.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", envvar="FLEET_HUB_CONFIG",
                                                help="hub.toml")]


def _load(config: Path | None, pki: Path | None = None, bind: str | None = None) -> HubConfig:
    if config is not None and pki is not None:
        raise ConfigError(None, "--config", "give --config or --pki, not both")
    if config is not None:
        if bind is not None:
            raise ConfigError(None, "--bind", "only with --pki; set [listener] bind in the "
                              "config instead")
        return load_config(config)
    if pki is not None:
        return HubConfig.from_pki(pki, bind)
    raise ConfigError(None, "--config", "missing: give --config hub.toml or --pki DIR")


@app.command()
def serve(
    config: ConfigOpt = None,
    pki: Annotated[Path | None, typer.Option("--pki", help="Serve on defaults drawn from a PKI "
                                             "folder holding server.pem/server.key.")] = None,
    bind: Annotated[str | None, typer.Option("--bind", metavar="HOST:PORT",
                                             help="With --pki [default: 0.0.0.0:8883]")]
    = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Serve MQTT over mutual TLS until SIGINT/SIGTERM.

    Example: fleet-hub serve --config /etc/fleet-hub/hub.toml
    """
    # Imported here so `check` and `events` start without loading amqtt.
    from hub.app import configure_logging, run, serve_hub  # noqa: PLC0415
    from hub.broker import HubBroker  # noqa: PLC0415

    loaded = _load(config, pki, bind)
    configure_logging(log_level.upper())

    def ready(broker: HubBroker) -> None:
        where = f"{loaded.listener.bind.host}:{broker.port}"
        server = broker.hub_runtime.metrics_server
        extra = f", metrics on {loaded.metrics.bind.host}:{server.port}" \
            if server is not None and loaded.metrics.bind is not None else ""
        sys.stderr.write(f"fleet-hub ready: listening on {where}{extra}\n")
        sys.stderr.flush()

    run(serve_hub(loaded, ready=ready))


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate a config without serving.

    Example: fleet-hub check --config hub.toml
    """
    loaded = _load(config)
    if loaded.revocation.feed is not None:
        from hub.trust import feed_gateway  # noqa: PLC0415 - reads a certificate

        domain, name = feed_gateway(loaded)
        sys.stdout.write(f"feed: {loaded.revocation.feed} as gateway {name} of {domain}, "
                         f"cache {loaded.revocation.feed_cache}, max age "
                         f"{loaded.revocation.max_age_seconds:g} s\n")
    acl = loaded.acl
    sys.stdout.write(f"config ok: listen {loaded.listener.bind}, client CA "
                     f"{loaded.listener.client_ca}, revocation "
                     f"{_sources(loaded)}, audit {loaded.audit.path}, "
                     f"{len(acl.defaults.publish)} publish / {len(acl.defaults.subscribe)} "
                     f"subscribe rules, {len(acl.groups)} group(s)\n")
    limits = loaded.limits
    sys.stdout.write(f"limits: packet {limits.max_packet_bytes} B, topic "
                     f"{limits.max_topic_bytes} B, {limits.max_subscriptions} subscriptions, "
                     f"{limits.publish_rate:g} msg/s and {limits.publish_bytes_rate} B/s per "
                     f"device ({limits.on_rate_limit}), {limits.max_retained_per_device} "
                     f"retained / {limits.max_retained_bytes} B per device, "
                     f"{limits.max_pending_tls} pending TLS per address\n")


def _sources(config: HubConfig) -> str:
    rev = config.revocation
    found = [str(x) for x in (rev.registry, rev.crl_file, rev.crl_url, rev.feed)
             if x is not None]
    return " + ".join(found) if found else "NONE (no revocation source!)"


@app.command()
def events(
    config: ConfigOpt = None,
    pki: Annotated[Path | None, typer.Option("--pki", help="Read PKI/hub-audit.db.")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="ID")] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="T",
                                              help="ISO 8601 time or 10m / 2h / 1d")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the audit store: every accept, refusal, ACL denial and kick.

    Example: fleet-hub events --config hub.toml --device sensor-0042 --since 1h --json
    """
    from hub.audit import parse_since, read_events  # noqa: PLC0415

    path = (HubConfig.from_pki(pki).audit.path if pki is not None and config is None
            else _load(config).audit.path)
    try:
        start = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise ConfigError(None, "--since", str(exc)) from None
    rows = read_events(path, device_id=device, since=start)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    for row in rows:
        sys.stdout.write(f"{row['time']}  {row['event']:9} {row['device_id'] or '-':24} "
                         f"{row['serial'] or '-':42} {row['peer'] or '-':22} "
                         f"{row['reason'] or ''}\n")


app.add_typer(quarantine_app, name="quarantine")


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per failure, exit codes 0/1/2 (fleetcli.run_cli)."""
    return run_cli(app, argv, prog_name="fleet-hub",
                   errors=((ConfigError, 2), (HubError, 1)))


if __name__ == "__main__":
    sys.exit(main())
