"""``fleet-provision`` init, server-cert, crl: the CA's own certificates and its CRL."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from provisioning.authority import initialize
from provisioning.cli._common import (
    DEFAULT_PKI,
    DaysOpt,
    PassEnvOpt,
    PkiOpt,
    ValidityOpt,
    chosen_validity,
    err,
    open_authority,
    read_passphrase,
)
from provisioning.config import DEFAULT_CRL_HOURS, DEFAULT_VALIDITY, PKIConfig, default_grace
from provisioning.duration import parse_duration
from provisioning.errors import ProvisioningError, UsageError
from provisioning.servercert import issue_server_cert, server_names

_INIT_OPTIONS = {"trust_domain": "--trust-domain", "organisation": "--org",
                 "validity": "--validity", "renew_grace": "--renew-grace",
                 "crl_url": "--crl-url", "ocsp_url": "--ocsp-url",
                 "crl_lifetime_hours": "--crl-hours"}


def init(
    org: Annotated[str, typer.Option("--org", help="Organisation, the O of every subject.")],
    trust_domain: Annotated[str, typer.Option("--trust-domain",
                                              help="SPIFFE trust domain, e.g. fleet.example.com")],
    pki: PkiOpt = DEFAULT_PKI,
    validity: Annotated[str | None, typer.Option(
        "--validity", metavar="DURATION",
        help="The fleet's device certificate lifetime: 90d, 12h, 10m [default: 365d]")] = None,
    days: DaysOpt = None,
    renew_grace: Annotated[str | None, typer.Option(
        "--renew-grace", metavar="DURATION",
        help="How long a renewed certificate stays valid [default: 1h, at most the "
             "validity]")] = None,
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
    lifetime = chosen_validity(validity, days) or DEFAULT_VALIDITY
    grace = (parse_duration(renew_grace, "--renew-grace") if renew_grace is not None
             else default_grace(lifetime))
    try:
        config = PKIConfig(trust_domain=trust_domain, organisation=org, validity=lifetime,
                           renew_grace=grace, crl_url=crl_url,
                           ocsp_url=ocsp_url, crl_lifetime_hours=crl_hours)
    except ProvisioningError as exc:
        key = exc.message.split(":", 1)[0]
        raise UsageError(exc.message.split(": ", 1)[-1], _INIT_OPTIONS.get(key, "init")) from None
    passphrase = read_passphrase(passphrase_env)
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


def server_cert(
    name: Annotated[str, typer.Option("--name", help="Host name of the hub (SAN DNS).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for server.pem/server.key.")],
    pki: PkiOpt = DEFAULT_PKI,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="IP address SAN; repeatable.")]
    = None,
    validity: ValidityOpt = None,
    days: DaysOpt = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Issue a TLS server certificate and key for a hub.

    Example: fleet-provision server-cert --name gw1.local --ip 127.0.0.1 --out fleet-pki
    """
    lifetime = chosen_validity(validity, days)
    host, addresses = server_names(name, ip or [])  # fails before a passphrase prompt
    with open_authority(pki, passphrase_env) as authority:
        cert_path, key_path = issue_server_cert(authority.registry, authority.ca,
                                                authority.config, authority.actor, host,
                                                addresses, out_dir, lifetime, "server")
    err.print(f"wrote {cert_path} (with chain) and {key_path}")


def crl(pki: PkiOpt = DEFAULT_PKI,
        out_file: Annotated[Path | None, typer.Option("--out", metavar="FILE",
                                                      help="Also write the CRL here.")] = None,
        passphrase_env: PassEnvOpt = None) -> None:
    """Sign a fresh CRL into crl.pem (and FILE).

    Example: fleet-provision crl --out /srv/www/fleet.crl.pem
    """
    with open_authority(pki, passphrase_env, sweep=False) as authority:  # publish_crl sweeps
        new = authority.publish_crl(out_file)
    number = new.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    err.print(f"CRL #{number}: {len(new)} revoked, next update "
              f"{new.next_update_utc:%Y-%m-%dT%H:%M:%SZ}")
