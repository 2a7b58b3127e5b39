"""``fleet-hub``: serve the gateway broker, check a config, read, verify and prune the audit
store, report the audit checks' findings.

Exit codes: 0 done, 1 a runtime failure (e.g. the port is taken), a broken audit chain, or
findings (``audit``), 2 usage or bad config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleetcli import new_app, run_cli
from hub.config import HubConfig, load_config
from hub.errors import AuditError, ConfigError, HubError
from hub.findings.cli import app as quarantine_app

if TYPE_CHECKING:
    from hub.audit.verify import ChainReport

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
    checks = loaded.checks
    sys.stdout.write(f"checks: {checks.action}, warn {checks.warn_days} d, shared window "
                     f"{checks.shared_window_seconds:g} s, RSA >= {checks.min_rsa_bits} bits, "
                     f"curves {', '.join(checks.curves)}, quarantine {checks.quarantine_file}\n")


def _sources(config: HubConfig) -> str:
    rev = config.revocation
    found = [str(x) for x in (rev.registry, rev.crl_file, rev.crl_url, rev.feed)
             if x is not None]
    return " + ".join(found) if found else "NONE (no revocation source!)"


events_app = new_app(
    "Print the audit store: every accept, refusal, ACL denial, kick and finding.\n\n"
    "Example: fleet-hub events --config hub.toml --device sensor-0042 --since 1h --json",
    no_args_is_help=False, invoke_without_command=True)
app.add_typer(events_app, name="events")
PkiOpt = Annotated[Path | None, typer.Option("--pki", help="Read PKI/hub-audit.db (and the "
                                             "PKI's server.pem, ca-chain.pem).")]
SinceOpt = Annotated[str | None, typer.Option("--since", metavar="T",
                                              help="ISO 8601 time or 10m / 2h / 1d")]


def _store(config: Path | None, pki: Path | None, ctx: typer.Context | None = None
           ) -> HubConfig:
    if ctx is not None and config is None and pki is None and isinstance(ctx.obj, dict):
        config, pki = ctx.obj.get("config"), ctx.obj.get("pki")
    return HubConfig.from_pki(pki) if pki is not None and config is None else _load(config)


def _group_json(ctx: typer.Context, as_json: bool) -> bool:
    return as_json or (isinstance(ctx.obj, dict) and bool(ctx.obj.get("json")))


def _since(text: str | None, option: str = "--since") -> float | None:
    from hub.audit import parse_since  # noqa: PLC0415

    try:
        return parse_since(text) if text is not None else None
    except ValueError as exc:
        raise ConfigError(None, option, str(exc)) from None


@events_app.callback()
def events(
    ctx: typer.Context,
    config: ConfigOpt = None,
    pki: PkiOpt = None,
    device: Annotated[str | None, typer.Option("--device", metavar="ID")] = None,
    since: SinceOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Keep printing records as they are committed (from now, or from "
        "--since), one per line, flushed, until SIGINT/SIGTERM or the pipe closes; with "
        "--json, JSON lines with each record's id and hash.")] = False,
) -> None:
    """Print the audit store: every accept, refusal, ACL denial, kick and finding.

    Example: fleet-hub events --config hub.toml --device sensor-0042 --since 1h --json
    """
    if ctx.invoked_subcommand is not None:
        # `events --config hub.toml verify` reads as well as `events verify --config ...`:
        # the subcommand takes --config, --pki (and --json) from here unless given its own.
        for option, given in (("--device", device), ("--since", since), ("--follow", follow)):
            if given:
                raise ConfigError(None, option, f"does not apply to `events "
                                  f"{ctx.invoked_subcommand}`")
        ctx.obj = {"config": config, "pki": pki, "json": as_json}
        return
    from hub.audit import read_records  # noqa: PLC0415

    path = _store(config, pki).audit.path
    start = _since(since)
    if follow:
        _follow(path, start, device, as_json=as_json)
        return
    records = read_records(path, device_id=device, since=start)
    if as_json:
        sys.stdout.write(json.dumps([r.as_json() for r in records], indent=2) + "\n")
        return
    for record in records:
        sys.stdout.write(_text_line(record.as_json()))


def _text_line(row: dict[str, object]) -> str:
    return (f"{row['time']}  {row['event']:9} {row['device_id'] or '-':24} "
            f"{row['serial'] or '-':42} {row['peer'] or '-':22} {row['reason'] or ''}\n")


def _follow(path: Path, since: float | None, device: str | None, *, as_json: bool) -> None:
    """Stream until SIGINT/SIGTERM (exit 0) or until the reader goes away (exit 0)."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from hub.audit.follow import follow  # noqa: PLC0415

    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())

    def started(last: int) -> None:
        # On stderr, so stdout stays pure JSON lines: a supervisor (or a test) knows that
        # every record committed from now on will be printed.
        sys.stderr.write(f"fleet-hub events: following {path} after record #{last}\n")
        sys.stderr.flush()

    try:
        for records in follow(path, stop=stop, since=since, device_id=device, started=started):
            sys.stdout.write("".join(
                json.dumps(r.as_line(), separators=(",", ":")) + "\n" if as_json
                else _text_line(r.as_json()) for r in records))
            sys.stdout.flush()
    except BrokenPipeError:
        # The shipper went away: not an error. Point stdout at /dev/null so the interpreter's
        # own flush at exit does not complain about the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@events_app.command("verify")
def events_verify(
    ctx: typer.Context,
    config: ConfigOpt = None,
    pki: PkiOpt = None,
    anchor: Annotated[list[str] | None, typer.Option(
        "--anchor", metavar="ID:HASH", help="A record as a copy kept elsewhere has it (the id "
        "and hash of an `events --follow --json` line): it must still be in the store, "
        "unchanged (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Recompute the audit chain and its checkpoints; name the first altered or missing
    record. Exit 0 intact, 1 broken.

    Example: fleet-hub events verify --config hub.toml
    """
    from hub.audit.checkpoint import CheckpointTrust  # noqa: PLC0415
    from hub.audit.verify import verify_store  # noqa: PLC0415

    loaded = _store(config, pki, ctx)
    as_json = _group_json(ctx, as_json)
    anchors = [_anchor(text) for text in anchor or ()]
    trust = CheckpointTrust.load(loaded.listener.server_cert, loaded.listener.client_ca)
    report = verify_store(loaded.audit.path, trust, anchors)
    if as_json:
        sys.stdout.write(json.dumps(_report_json(report), indent=2) + "\n")
    if report.problem is not None:
        if not as_json:
            sys.stderr.write(f"error: audit chain broken at {report.problem} "
                             f"({loaded.audit.path})\n")
        raise typer.Exit(1)
    if not as_json:
        sys.stdout.write(_report_text(report))


def _anchor(text: str) -> tuple[int, str]:
    number, _, digest = text.partition(":")
    if not number.isdigit() or len(digest) != 64 \
            or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(None, "--anchor", f"want ID:HASH (a record id, 64 hex digits), got "
                          f"{text!r}")
    return int(number), digest


def _report_json(report: ChainReport) -> dict[str, object]:
    from hub.audit import format_time  # noqa: PLC0415

    problem = report.problem
    return {
        "ok": report.ok, "records": report.records,
        "first_id": report.first[0] if report.first else None,
        "last_id": report.last[0] if report.last else None,
        "checkpoints": len(report.checkpoints), "pruned": report.pruned,
        "anchors": report.anchors, "notes": list(report.notes),
        "migrated": None if report.migrated is None else dict(report.migrated),
        "problem": None if problem is None else {
            "record_id": problem.record_id, "checkpoint_id": problem.checkpoint_id,
            "time": None if problem.time is None else format_time(problem.time),
            "what": problem.what},
    }


def _report_text(report: ChainReport) -> str:
    from hub.audit import format_time  # noqa: PLC0415

    span = ""
    if report.first is not None and report.last is not None:
        span = (f" #{report.first[0]}..#{report.last[0]} ({format_time(report.first[1])} .. "
                f"{format_time(report.last[1])})")
    lines = [f"audit chain ok: {report.records} records{span}"]
    if report.checkpoints:
        newest = report.checkpoints[-1]
        lines.append(f"  {len(report.checkpoints)} signed checkpoint(s), {report.pruned} "
                     f"records pruned; newest: {newest.describe()}")
    if report.anchors:
        lines.append(f"  {report.anchors} anchor(s) match")
    lines.extend(f"  {note}" for note in report.notes)
    migrated = report.migrated
    if migrated is not None:
        when = migrated.get("time")
        lines.append(f"  {migrated.get('records')} records written by a version "
                     f"{migrated.get('from_version')} hub were sealed on upgrade"
                     f"{f' at {format_time(when)}' if isinstance(when, float) else ''}: "
                     "the chain vouches for them from then on only")
    return "".join(line + "\n" for line in lines)


@events_app.command("prune")
def events_prune(
    ctx: typer.Context,
    before: Annotated[str, typer.Option("--before", metavar="T", help="Prune records older "
                                        "than this: ISO 8601 time or 90d / 12w")],
    config: ConfigOpt = None,
    pki: PkiOpt = None,
) -> None:
    """Delete the records older than --before, leaving a checkpoint signed with the hub's TLS
    key so that `events verify` still proves what is left. Refused (exit 1) on a broken chain.

    Example: fleet-hub events prune --config hub.toml --before 90d
    """
    from hub.audit import format_time  # noqa: PLC0415
    from hub.audit.checkpoint import CheckpointTrust, load_signer  # noqa: PLC0415
    from hub.audit.prune import prune  # noqa: PLC0415

    loaded = _store(config, pki, ctx)
    cutoff = _since(before, "--before")
    assert cutoff is not None  # noqa: S101 - before is a required option
    listener = loaded.listener
    signer = load_signer(listener.server_cert, listener.server_key, loaded.source or pki)
    trust = CheckpointTrust.load(listener.server_cert, listener.client_ca)
    path = loaded.audit.path
    done = prune(path, before=cutoff, signer=signer, trust=trust)
    if done.refused is not None:
        raise AuditError(f"not pruning: the audit chain is broken at {done.refused}; "
                         f"see fleet-hub events verify ({path})")
    if done.checkpoint is None:
        sys.stdout.write(f"nothing to prune: no record older than {format_time(cutoff)}; "
                         f"{done.kept} records kept\n")
        return
    checkpoint = done.checkpoint
    sys.stdout.write(f"pruned {checkpoint.count} records #{checkpoint.first_id}.."
                     f"#{checkpoint.head_id} (older than {format_time(cutoff)}); "
                     f"{checkpoint.describe()} signed; {done.kept} records kept\n")


@app.command()
def audit(
    config: ConfigOpt = None,
    pki: PkiOpt = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="T", help="ISO 8601 time or 10m / 2h / 1d [default: every "
        "finding the store still holds]")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The findings of the hub's audit checks, grouped by check and device. Exit 1 when there
    is any, 0 when none.

    Example: fleet-hub audit --config hub.toml --since 24h --json
    """
    from hub.audit import format_time  # noqa: PLC0415
    from hub.audit.findings import read_findings  # noqa: PLC0415

    start = _since(since)
    groups = read_findings(_store(config, pki).audit.path, since=start)
    if as_json:
        sys.stdout.write(json.dumps([g.as_json() for g in groups], indent=2) + "\n")
    elif not groups:
        window = f" since {format_time(start)}" if start is not None else ""
        sys.stdout.write(f"no findings{window}\n")
    else:
        sys.stdout.write(f"{'CHECK':26} {'DEVICE':24} {'COUNT':>5}  {'FIRST':24} {'LAST':24} "
                         "SERIAL\n")
        for group in groups:
            sys.stdout.write(f"{group.check:26} {group.device_id or '-':24} {group.count:5}  "
                             f"{format_time(group.first):24} {format_time(group.last):24} "
                             f"{group.serial or '-'}\n")
            if group.evidence is not None:
                text = json.dumps(group.evidence, separators=(",", ":"))
                sys.stdout.write(f"    evidence: {text[:160]}{'…' if len(text) > 160 else ''}"
                                 "\n")
        total = sum(g.count for g in groups)
        sys.stdout.write(f"{total} finding(s) in {len(groups)} group(s)\n")
    if groups:
        raise typer.Exit(1)


app.add_typer(quarantine_app, name="quarantine")


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per failure, exit codes 0/1/2 (fleetcli.run_cli)."""
    return run_cli(app, argv, prog_name="fleet-hub",
                   errors=((ConfigError, 2), (HubError, 1)))


if __name__ == "__main__":
    sys.exit(main())
