"""What every ``fleet-provision`` command module shares: the typer apps, options, consoles.

The commands live in ca.py, issue.py, devices.py, expiring.py, policy.py, service.py,
issuing.py and audit.py; the package's ``__init__`` registers them on these apps in the
order of ``--help``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fleetcli import new_app
from provisioning.authority import Authority
from provisioning.duration import check_validity, parse_duration
from provisioning.errors import PassphraseError, UsageError
from provisioning.pki import ENV_PKI, PKIPaths

app = new_app("Fleet CA: mint per-device certificates from factory CSRs, revoke, publish CRLs.")
audit_app = new_app("The hash-chained audit log.")
app.add_typer(audit_app, name="audit")
token_app = new_app("Enrollment tokens for the EST service (HTTP Basic).")
app.add_typer(token_app, name="token")
password_app = new_app("A device's MQTT password: the hub's optional second factor.")
app.add_typer(password_app, name="password")
group_app = new_app("Device groups: the {group} of the hub's ACLs.")
app.add_typer(group_app, name="group")
policy_app = new_app("The fleet's policy in pki.toml: validity, renew_grace, CRL lifetime.")
app.add_typer(policy_app, name="policy")
issuing_app = new_app("The issuing CA: rotate it under the same root, retire the old one.")
app.add_typer(issuing_app, name="issuing-ca")

PkiOpt = Annotated[Path, typer.Option("--pki", envvar=ENV_PKI, help="PKI folder.",
                                      show_default=True)]
PassEnvOpt = Annotated[str | None, typer.Option(
    "--passphrase-env", metavar="VAR",
    help="Environment variable holding the CA key passphrase (prompted for when absent "
         "and the key is encrypted).")]
ValidityOpt = Annotated[str | None, typer.Option(
    "--validity", metavar="DURATION",
    help="Certificate lifetime: 90d, 12h, 10m (1m to 36500d) [default: from pki.toml]")]
DaysOpt = Annotated[int | None, typer.Option(
    "--days", metavar="N", help="Validity in days: the same as --validity Nd.")]
DEFAULT_PKI = Path("fleet-pki")
MAX_DAYS = 36500

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def read_passphrase(env_var: str | None, key_path: Path | None = None) -> bytes | None:
    """From the named environment variable, else a prompt when the key needs one."""
    if env_var is not None:
        value = os.environ.get(env_var)
        if value is None:
            raise UsageError(f"environment variable {env_var} is not set", "--passphrase-env")
        return value.encode()
    if key_path is not None and encrypted(key_path):
        if not sys.stdin.isatty():
            raise PassphraseError(
                "CA key is encrypted: give its passphrase with --passphrase-env VAR",
                str(key_path))
        return getpass.getpass(f"Passphrase for {key_path}: ").encode()
    return None


def encrypted(key_path: Path) -> bool:
    try:
        with key_path.open("rb") as fh:
            return b"ENCRYPTED" in fh.readline()
    except OSError:
        return False


def open_authority(pki: Path, passphrase_env: str | None, *, sweep: bool = True) -> Authority:
    """The PKI with its issuing key's passphrase, for a command that signs; *sweep* first
    revokes the superseded certificates whose grace is over (:func:`sweep_grace`)."""
    authority = Authority(pki, read_passphrase(passphrase_env, PKIPaths(pki).issuing_key))
    if sweep:
        _sweep(authority, key_optional=False)
    return authority


def open_writer(pki: Path) -> Authority:
    """The PKI for a command that writes the registry without signing (group set, token,
    password, policy set): the grace sweep runs when the issuing key needs no passphrase."""
    authority = Authority(pki)
    _sweep(authority, key_optional=True)
    return authority


def _sweep(authority: Authority, *, key_optional: bool) -> None:
    """DESIGN section 10: any write command may run the superseded sweep
    (:mod:`provisioning.grace`); one indexed read when nothing is due."""
    try:
        swept = authority.sweep_superseded(key_optional=key_optional)
    except BaseException:
        authority.close()
        raise
    if swept:
        err.print(f"revoked {len(swept)} superseded certificate(s) whose renew_grace is over "
                  "(reason superseded)", markup=False)


def check_days(days: int | None) -> None:
    if days is not None and not 1 <= days <= MAX_DAYS:
        raise UsageError(f"{days} days is out of range (want 1-{MAX_DAYS})", "--days")


def chosen_validity(validity: str | None, days: int | None) -> dt.timedelta | None:
    """``--validity DURATION`` or its alias ``--days N`` (both: a usage error); None for
    neither, which means the fleet's validity from pki.toml."""
    if validity is not None and days is not None:
        raise UsageError("--days N is --validity Nd: give one of them", "--days")
    if days is not None:
        check_days(days)
        return dt.timedelta(days=days)
    if validity is not None:
        return check_validity(parse_duration(validity, "--validity"), "--validity")
    return None


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def print_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
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
