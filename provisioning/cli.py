"""``fleet-provision``: the factory operator's CA tool (DESIGN section 4).

Exit codes: 0 all done, 1 some input rejected (the rest still done), 2 usage.
Every expected failure is one line on stderr: ``error: <what> (<where>)``.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from rich.console import Console

from fleetcli import new_app, run_cli
from provisioning.authority import Authority, check_group, initialize, server_names
from provisioning.config import DEFAULT_CRL_HOURS, DEFAULT_DAYS, PKIConfig
from provisioning.csr import read_inputs
from provisioning.errors import NotFoundError, PassphraseError, ProvisioningError, UsageError
from provisioning.issuer import SignOptions, SignResult
from provisioning.pki import ENV_PKI, PKIPaths
from provisioning.policy import load_manifest

app = new_app("Fleet CA: mint per-device certificates from factory CSRs, revoke, publish CRLs.")
audit_app = new_app("The hash-chained audit log.")
app.add_typer(audit_app, name="audit")
token_app = new_app("Enrollment tokens for the EST service (HTTP Basic).")
app.add_typer(token_app, name="token")
password_app = new_app("A device's MQTT password: the hub's optional second factor.")
app.add_typer(password_app, name="password")
group_app = new_app("Device groups: the {group} of the hub's ACLs.")
app.add_typer(group_app, name="group")

PkiOpt = Annotated[Path, typer.Option("--pki", envvar=ENV_PKI, help="PKI folder.",
                                      show_default=True)]
PassEnvOpt = Annotated[str | None, typer.Option(
    "--passphrase-env", metavar="VAR",
    help="Environment variable holding the CA key passphrase (prompted for when absent "
         "and the key is encrypted).")]
DEFAULT_PKI = Path("fleet-pki")
MAX_DAYS = 36500
_INIT_OPTIONS = {"trust_domain": "--trust-domain", "organisation": "--org",
                 "default_days": "--days", "crl_url": "--crl-url", "ocsp_url": "--ocsp-url",
                 "crl_lifetime_hours": "--crl-hours"}
DEVICE_STATUSES = ("active", "suspended", "revoked")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _passphrase(env_var: str | None, key_path: Path | None = None) -> bytes | None:
    """From the named environment variable, else a prompt when the key needs one."""
    if env_var is not None:
        value = os.environ.get(env_var)
        if value is None:
            raise UsageError(f"environment variable {env_var} is not set", "--passphrase-env")
        return value.encode()
    if key_path is not None and _encrypted(key_path):
        if not sys.stdin.isatty():
            raise PassphraseError(
                "CA key is encrypted: give its passphrase with --passphrase-env VAR",
                str(key_path))
        return getpass.getpass(f"Passphrase for {key_path}: ").encode()
    return None


def _encrypted(key_path: Path) -> bool:
    try:
        with key_path.open("rb") as fh:
            return b"ENCRYPTED" in fh.readline()
    except OSError:
        return False


def _authority(pki: Path, passphrase_env: str | None) -> Authority:
    return Authority(pki, _passphrase(passphrase_env, PKIPaths(pki).issuing_key))


def _check_days(days: int | None) -> None:
    if days is not None and not 1 <= days <= MAX_DAYS:
        raise UsageError(f"{days} days is out of range (want 1-{MAX_DAYS})", "--days")


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@app.command()
def init(
    org: Annotated[str, typer.Option("--org", help="Organisation, the O of every subject.")],
    trust_domain: Annotated[str, typer.Option("--trust-domain",
                                              help="SPIFFE trust domain, e.g. fleet.example.com")],
    pki: PkiOpt = DEFAULT_PKI,
    days: Annotated[int, typer.Option("--days", help="Default device validity.")] = DEFAULT_DAYS,
    crl_url: Annotated[str | None, typer.Option("--crl-url", help="CRL distribution point "
                                                "put into device certificates.")] = None,
    ocsp_url: Annotated[str | None, typer.Option("--ocsp-url", help="OCSP responder URL "
                                                 "put into device certificates.")] = None,
    crl_hours: Annotated[int, typer.Option("--crl-hours",
                                           help="CRL lifetime (nextUpdate).")] = DEFAULT_CRL_HOURS,
    passphrase_env: PassEnvOpt = None,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="Prompt for a passphrase to "
                                          "encrypt the CA keys.")] = False,
) -> None:
    """Create a PKI folder: root and issuing CA, chain, empty CRL, registry.

    Example: fleet-provision init --pki fleet-pki --org "Acme" --trust-domain fleet.acme.com
    """
    try:
        config = PKIConfig(trust_domain=trust_domain, organisation=org, default_days=days,
                           crl_url=crl_url, ocsp_url=ocsp_url, crl_lifetime_hours=crl_hours)
    except ProvisioningError as exc:
        key = exc.message.split(":", 1)[0]
        raise UsageError(exc.message.split(": ", 1)[-1], _INIT_OPTIONS.get(key, "init")) from None
    passphrase = _passphrase(passphrase_env)
    if passphrase is None and encrypt:
        first = getpass.getpass("New CA key passphrase: ")
        if first != getpass.getpass("Repeat passphrase: "):
            raise UsageError("passphrases do not match", "--encrypt")
        passphrase = first.encode()
    if passphrase is not None and not passphrase:
        raise UsageError("the passphrase is empty", "--passphrase-env")
    paths = initialize(pki, config, passphrase)
    err.print(f"created PKI for {org} ({trust_domain}) in {paths.root}")
    err.print(f"trust bundle for hubs and devices: {paths.chain}")
    err.print(f"the root key {paths.root_key} is needed by no other command: "
              "move it offline")


@app.command("server-cert")
def server_cert(
    name: Annotated[str, typer.Option("--name", help="Host name of the hub (SAN DNS).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for server.pem/server.key.")],
    pki: PkiOpt = DEFAULT_PKI,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="IP address SAN; repeatable.")]
    = None,
    days: Annotated[int | None, typer.Option("--days", help="Validity in days "
                                             "[default: from pki.toml]")] = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Issue a TLS server certificate and key for a hub.

    Example: fleet-provision server-cert --name gw1.local --ip 127.0.0.1 --out fleet-pki
    """
    _check_days(days)
    server_names(name, ip or [])  # a bad name or address fails before a passphrase prompt
    with _authority(pki, passphrase_env) as authority:
        cert_path, key_path = authority.server_cert(name, ip or [], out_dir, days)
    err.print(f"wrote {cert_path} (with chain) and {key_path}")


@app.command()
def sign(
    csrs: Annotated[list[Path], typer.Argument(metavar="CSR_OR_DIR...",
                                               help="CSR files or folders of *.csr")],
    pki: PkiOpt = DEFAULT_PKI,
    manifest: Annotated[Path | None, typer.Option("--manifest",
                                                  help="Allowed device ids, one a line.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Device group.")] = None,
    days: Annotated[int | None, typer.Option("--days", help="Validity in days "
                                             "[default: from pki.toml]")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder for <device-id>.pem [default: PKI/certs]")] = None,
    renew: Annotated[bool, typer.Option("--renew", help="Replace a device's active "
                                        "certificate when the CSR has a new key.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Validate CSRs against policy and issue device certificates.

    Example: fleet-provision sign --manifest line7.txt --group sensors --out certs csrs/
    """
    _check_days(days)
    if group is not None:
        check_group(group)
    allowed = load_manifest(manifest) if manifest is not None else None
    inputs, problems = read_inputs(csrs)
    target = out_dir if out_dir is not None else pki / "certs"
    with _authority(pki, passphrase_env) as authority:
        target.mkdir(parents=True, exist_ok=True)
        options = SignOptions(manifest=allowed, group=group, days=days, out_dir=target,
                              renew=renew)
        results = [SignResult(src, None, "rejected", reason=why) for src, why in problems]
        results += authority.issuer().sign(inputs, options)
    if as_json:
        _emit_json([r.to_json() for r in results])
    else:
        for r in results:
            line = f"{r.status:9} {r.device_id or '-':24} {r.serial or '-':42} {r.source}"
            out.print(line + (f"  ({r.reason})" if r.reason else ""), markup=False)
    noted: set[str | None] = set()
    for r in results:
        if r.note is not None and r.device_id not in noted:  # one line per device
            noted.add(r.device_id)
            err.print(f"note: {r.note}", markup=False)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("issued", "existing",
                                                                  "rejected")}
    err.print(f"{counts['issued']} issued, {counts['existing']} existing, "
              f"{counts['rejected']} rejected; certificates in {target}")
    if counts["rejected"]:
        raise typer.Exit(1)


@app.command()
def revoke(
    device_ids: Annotated[list[str], typer.Argument(metavar="DEVICE_ID...")],
    pki: PkiOpt = DEFAULT_PKI,
    serial: Annotated[str | None, typer.Option("--serial", metavar="HEX",
                                               help="Revoke only this certificate.")] = None,
    reason: Annotated[str, typer.Option("--reason", help="RFC 5280 reason, e.g. "
                                        "keyCompromise.")] = "unspecified",
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Revoke a device (all its certificates) or one certificate; rewrites crl.pem.

    Several devices are revoked in one transaction with one new CRL, all or none.

    Example: fleet-provision revoke sensor-0042 --reason keyCompromise
    """
    if serial is not None and len(device_ids) > 1:
        raise UsageError("--serial names one certificate: give one DEVICE_ID with it",
                         "--serial")
    with _authority(pki, passphrase_env) as authority:
        if len(device_ids) == 1:
            changes = [authority.revoke(device_ids[0], serial, reason)]
        else:
            changes = authority.revoke_many(device_ids, reason)
    for change in changes:
        if change.serials:
            err.print(f"revoked {len(change.serials)} certificate(s) of {change.device_id}: "
                      f"{', '.join(change.serials)}; crl.pem is CRL #{change.crl_number}")
        else:
            err.print(f"nothing to revoke: {change.device_id} has no unrevoked certificate "
                      f"(crl.pem is CRL #{change.crl_number})")


@app.command()
def suspend(device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
            pki: PkiOpt = DEFAULT_PKI, passphrase_env: PassEnvOpt = None) -> None:
    """Put a device's certificates on hold (certificateHold); resume lifts it.

    Example: fleet-provision suspend sensor-0042
    """
    with _authority(pki, passphrase_env) as authority:
        change = authority.suspend(device_id)
    err.print(f"suspended {device_id}: {len(change.serials)} certificate(s) on hold"
              if change.crl_number else f"{device_id} is already suspended")


@app.command()
def resume(device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
           pki: PkiOpt = DEFAULT_PKI, passphrase_env: PassEnvOpt = None) -> None:
    """Lift a hold put by suspend.

    Example: fleet-provision resume sensor-0042
    """
    with _authority(pki, passphrase_env) as authority:
        change = authority.resume(device_id)
    err.print(f"resumed {device_id}: {len(change.serials)} certificate(s) back in service"
              if change.crl_number else f"{device_id} is not suspended")


@app.command()
def crl(pki: PkiOpt = DEFAULT_PKI,
        out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE",
                                                      help="Also write the CRL here.")] = None,
        passphrase_env: PassEnvOpt = None) -> None:
    """Sign a fresh CRL into crl.pem (and FILE).

    Example: fleet-provision crl --out /srv/www/fleet.crl.pem
    """
    with _authority(pki, passphrase_env) as authority:
        new = authority.publish_crl(out_file)
    number = new.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    err.print(f"CRL #{number}: {len(new)} revoked, next update "
              f"{new.next_update_utc:%Y-%m-%dT%H:%M:%SZ}")


def _print_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Aligned plain columns, never wrapped or cut at the terminal's width.

    A rich table fitted to the terminal cut 40-digit serials (issue 11 defect 14), and
    ``revoke --serial`` needs them whole; a long line is the terminal's to wrap.
    """
    widths = [max([len(header), *(len(row[i]) for row in rows)])
              for i, header in enumerate(headers)]
    for line in (headers, *rows):
        sys.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                             strict=True))
                         .rstrip() + "\n")


def _current_cert(certs: list[Any]) -> Any:
    live = [c for c in certs if c.status in ("active", "on_hold")]
    return (live or certs or [None])[-1]


@app.command()
def devices(
    pki: PkiOpt = DEFAULT_PKI,
    status: Annotated[str | None, typer.Option("--status", help="active, suspended or "
                                               "revoked")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List devices with their current certificate.

    Example: fleet-provision devices --status active --json
    """
    if status is not None and status not in DEVICE_STATUSES:
        raise UsageError(f"unknown status {status!r}; want one of "
                         f"{', '.join(DEVICE_STATUSES)}", "--status")
    with Authority(pki) as authority:
        rows: list[dict[str, str | None]] = []
        for dev in authority.registry.devices(status):
            cert = _current_cert(authority.registry.certificates(dev.device_id))
            rows.append({"device_id": dev.device_id, "status": dev.status, "group": dev.group,
                         "serial": cert.serial if cert else None,
                         "not_after": cert.not_after if cert else None})
    if as_json:
        _emit_json(rows)
        return
    _print_columns(("device", "status", "group", "serial", "not after"),
                   [[row[key] or "-" for key in ("device_id", "status", "group", "serial",
                                                  "not_after")] for row in rows])


@app.command()
def device(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
    pki: PkiOpt = DEFAULT_PKI,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one device and its certificate history.

    Example: fleet-provision device sensor-0042
    """
    with Authority(pki) as authority:
        dev = authority.registry.device(device_id)
        if dev is None:
            raise NotFoundError(f"no device {device_id!r} in the registry", str(pki))
        certs = authority.registry.certificates(device_id)
    data = {"device_id": dev.device_id, "status": dev.status, "group": dev.group,
            "created": dev.created_at, "updated": dev.updated_at, "metadata": dev.metadata,
            "certificates": [{"serial": c.serial, "status": c.status, "issued": c.issued_at,
                              "not_before": c.not_before, "not_after": c.not_after,
                              "sha256": c.fingerprint, "revoked_at": c.revoked_at,
                              "reason": c.reason} for c in certs]}
    if as_json:
        _emit_json(data)
        return
    out.print(f"{dev.device_id}  status={dev.status}  group={dev.group or '-'}  "
              f"created={dev.created_at}", markup=False)
    _print_columns(("serial", "status", "issued", "not after", "revoked", "reason"),
                   [(c.serial, c.status, c.issued_at, c.not_after, c.revoked_at or "-",
                     c.reason or "-") for c in certs])


@audit_app.command("verify")
def audit_verify(pki: PkiOpt = DEFAULT_PKI) -> None:
    """Recompute the audit chain; name the first broken record.

    Example: fleet-provision audit verify --pki fleet-pki
    """
    with Authority(pki) as authority:
        report = authority.registry.verify_audit()
    if not report.ok:
        err.print(f"error: audit chain broken at event #{report.broken_at}: {report.problem} "
                  f"({authority.paths.registry})", markup=False)
        raise typer.Exit(1)
    out.print(f"audit chain ok: {report.count} events")


@group_app.command("set")
def group_set(
    device_ids: Annotated[list[str], typer.Argument(metavar="DEVICE_ID...")],
    group: Annotated[str, typer.Option("--group", metavar="G",
                                       help="The group (same rules as a device id).")],
    pki: PkiOpt = DEFAULT_PKI,
) -> None:
    """Move devices to a group in one transaction, each move audited: all or none.

    An unknown device id fails the whole command (exit 1) and moves nobody.

    Example: fleet-provision group set --pki fleet-pki --group operators sensor-0001 sensor-0002
    """
    check_group(group)
    with Authority(pki) as authority:
        moves = authority.set_group(device_ids, group)
    for move in moves:
        if move.moved:
            was = f"group {move.previous}" if move.previous is not None else "no group"
            err.print(f"moved {move.device_id} to group {group} (was in {was})", markup=False)
        else:
            err.print(f"{move.device_id} is already in group {group}", markup=False)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Token name: the HTTP Basic user.")],
    pki: PkiOpt = DEFAULT_PKI,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"name", "secret"}.')] = False,
) -> None:
    """Create an enrollment token; its secret is printed once and stored only hashed.

    Example: fleet-provision token create --pki fleet-pki line7-station
    """
    with Authority(pki) as authority:
        secret = authority.create_token(name)
    if as_json:
        _emit_json({"name": name, "secret": secret})
    else:
        sys.stdout.write(secret + "\n")
    err.print(f"created enrollment token {name}; its secret is shown only now (HTTP Basic "
              f"user {name}, password = the secret)", markup=False)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    pki: PkiOpt = DEFAULT_PKI,
) -> None:
    """Revoke an enrollment token: the service refuses its secret from the next request on.

    Example: fleet-provision token revoke --pki fleet-pki line7-station
    """
    with Authority(pki) as authority:
        changed = authority.revoke_token(name)
    err.print(f"revoked enrollment token {name}" if changed
              else f"enrollment token {name} was already revoked", markup=False)


def _new_password(device_id: str, env_var: str | None) -> str:
    if env_var is not None:
        value = os.environ.get(env_var)
        if value is None:
            raise UsageError(f"environment variable {env_var} is not set", "--password-env")
    elif sys.stdin.isatty():
        value = getpass.getpass(f"MQTT password for {device_id}: ")
        if value != getpass.getpass("Repeat password: "):
            raise UsageError("passwords do not match", "password set")
    else:
        raise UsageError("no password: give --password-env VAR, or run on a terminal to be "
                         "prompted", "--password-env")
    if not value:
        raise UsageError("the password is empty", (env_var and "--password-env") or "password set")
    return value


@password_app.command("set")
def password_set(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
    pki: PkiOpt = DEFAULT_PKI,
    password_env: Annotated[str | None, typer.Option(
        "--password-env", metavar="VAR",
        help="Environment variable holding the password (prompted for on a terminal).")] = None,
) -> None:
    """Store the hash of a device's MQTT password; the hub checks it when [auth] password = true.

    Example: fleet-provision password set --pki fleet-pki sensor-0042 --password-env MQTT_PW
    """
    with Authority(pki) as authority:
        if authority.registry.device(device_id) is None:
            raise NotFoundError(f"no device {device_id!r} in the registry", str(pki))
        authority.set_password(device_id, _new_password(device_id, password_env))
    err.print(f"password set for {device_id}", markup=False)


@password_app.command("clear")
def password_clear(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
    pki: PkiOpt = DEFAULT_PKI,
) -> None:
    """Remove a device's MQTT password.

    Example: fleet-provision password clear --pki fleet-pki sensor-0042
    """
    with Authority(pki) as authority:
        if authority.registry.device(device_id) is None:
            raise NotFoundError(f"no device {device_id!r} in the registry", str(pki))
        authority.set_password(device_id, None)
    err.print(f"password cleared for {device_id}", markup=False)


@app.command()
def serve(
    pki: PkiOpt = DEFAULT_PKI,
    bind: Annotated[str, typer.Option("--bind", metavar="HOST:PORT",
                                      help="HTTPS listener; port 0 picks a free port.")]
    = "127.0.0.1:8443",
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", metavar="FILE",
        help="Server certificate with chain (default: PKI/est-server.pem, made for the bind "
             "host and reused).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", metavar="FILE",
                                                 help="Key of --tls-cert.")] = None,
    http_bind: Annotated[str | None, typer.Option(
        "--http-bind", metavar="HOST:PORT",
        help="Also serve /crl and /ocsp (only those) over plain HTTP here.")] = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Run the enrollment service: EST (RFC 7030), /crl and OCSP (RFC 6960) over HTTPS.

    Example: fleet-provision serve --pki fleet-pki --bind 0.0.0.0:8443 --http-bind 0.0.0.0:8080
    """
    from provisioning import est  # noqa: PLC0415  (aiohttp only for this command)

    host, port = est.parse_bind(bind)
    http = est.parse_bind(http_bind, "--http-bind") if http_bind else None
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("give --tls-cert and --tls-key together", "--tls-cert")
    passphrase = _passphrase(passphrase_env, PKIPaths(pki).issuing_key)
    with Authority(pki, passphrase, actor=est.SERVICE_ACTOR) as authority:
        _ = authority.ca  # a missing or wrong passphrase fails now, not on the first request
        manifest_path = authority.config.manifest_path(authority.paths.root)
        manifest = load_manifest(manifest_path) if manifest_path is not None else None
        if tls_cert is None or tls_key is None:
            tls_cert, tls_key = est.ensure_server_cert(authority, host)
        tls = est.tls_context(tls_cert, tls_key, authority.paths.chain)
        service = est.EnrollmentService(authority, tls, manifest)
        est.run(service, host, port, http)
    stats = service.statistics()
    err.print(f"stopped: {stats.jobs} queued items in {stats.batches} batches (largest "
              f"{stats.largest_batch}), {stats.signed} certificates issued", markup=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per failure, DESIGN section 8 exit codes (fleetcli.run_cli)."""
    return run_cli(app, argv, prog_name="fleet-provision", errors=((ProvisioningError, None),))


if __name__ == "__main__":
    sys.exit(main())
