"""``fleet-provision`` token, password, serve: the enrollment service and what it checks."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from provisioning.authority import Authority
from provisioning.cli._common import (
    DEFAULT_PKI,
    PassEnvOpt,
    PkiOpt,
    emit_json,
    err,
    open_writer,
    read_passphrase,
)
from provisioning.errors import NotFoundError, UsageError
from provisioning.pki import PKIPaths
from provisioning.policy import load_manifest


def token_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Token name: the HTTP Basic user.")],
    pki: PkiOpt = DEFAULT_PKI,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"name", "secret"}.')] = False,
) -> None:
    """Create an enrollment token; its secret is printed once and stored only hashed.

    Example: fleet-provision token create --pki fleet-pki line7-station
    """
    with open_writer(pki) as authority:
        secret = authority.create_token(name)
    if as_json:
        emit_json({"name": name, "secret": secret})
    else:
        sys.stdout.write(secret + "\n")
    err.print(f"created enrollment token {name}; its secret is shown only now (HTTP Basic "
              f"user {name}, password = the secret)", markup=False)


def token_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    pki: PkiOpt = DEFAULT_PKI,
) -> None:
    """Revoke an enrollment token: the service refuses its secret from the next request on.

    Example: fleet-provision token revoke --pki fleet-pki line7-station
    """
    with open_writer(pki) as authority:
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
    with open_writer(pki) as authority:
        if authority.registry.device(device_id) is None:
            raise NotFoundError(f"no device {device_id!r} in the registry", str(pki))
        authority.set_password(device_id, _new_password(device_id, password_env))
    err.print(f"password set for {device_id}", markup=False)


def password_clear(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
    pki: PkiOpt = DEFAULT_PKI,
) -> None:
    """Remove a device's MQTT password.

    Example: fleet-provision password clear --pki fleet-pki sensor-0042
    """
    with open_writer(pki) as authority:
        if authority.registry.device(device_id) is None:
            raise NotFoundError(f"no device {device_id!r} in the registry", str(pki))
        authority.set_password(device_id, None)
    err.print(f"password cleared for {device_id}", markup=False)


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
    passphrase = read_passphrase(passphrase_env, PKIPaths(pki).issuing_key)
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
