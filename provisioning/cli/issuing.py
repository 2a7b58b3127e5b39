"""``fleet-provision issuing-ca rotate|retire|show``: rolling the issuing CA under the same
root (DESIGN section 10; :mod:`provisioning.rotation` does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from provisioning.cli._common import (
    DEFAULT_PKI,
    PassEnvOpt,
    PkiOpt,
    emit_json,
    err,
    open_authority,
    print_columns,
    read_passphrase,
)
from provisioning.pki import PKIPaths
from provisioning.rotation import cn
from provisioning.rotation import retire as retire_ca
from provisioning.rotation import rotate as rotate_ca
from provisioning.rotation import show as show_cas
from provisioning.serial import format_serial
from provisioning.timefmt import iso

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON array instead of columns.")]


def rotate(
    pki: PkiOpt = DEFAULT_PKI,
    root_key: Annotated[Path | None, typer.Option(
        "--root-key", metavar="PATH",
        help="Where the root CA key is (kept offline) [default: PKI/root-ca.key]")] = None,
    root_passphrase_env: Annotated[str | None, typer.Option(
        "--root-passphrase-env", metavar="VAR",
        help="Environment variable holding the root key's passphrase [default: the "
             "issuing key's, else a prompt when the root key is encrypted].")] = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Make a new issuing CA under the same root; the old one stays live until retire.

    New and renewed certificates, CRLs, OCSP answers and the feed are signed by the new
    one; ca-chain.pem and crl.pem carry both. The root key is needed this once.

    Example: fleet-provision issuing-ca rotate --pki fleet-pki --root-key /media/usb/root-ca.key
    """
    key_path = root_key if root_key is not None else PKIPaths(pki).root_key
    with open_authority(pki, passphrase_env) as authority:
        if root_passphrase_env is not None:
            root_passphrase = read_passphrase(root_passphrase_env, key_path)
        else:
            root_passphrase = authority.passphrase or read_passphrase(None, key_path)
        done = rotate_ca(authority, key_path, root_passphrase)
    err.print(f"new issuing CA {cn(done.new)} (serial {format_serial(done.new.serial_number)}, "
              f"until {iso(done.new.not_valid_after_utc)}) signs from now on", markup=False)
    err.print(f"the old one, {cn(done.old)}, is retiring: {done.retiring_cert}; "
              "ca-chain.pem and crl.pem carry both", markup=False)
    err.print("distribute ca-chain.pem to hubs without the feed, then run fleet-provision "
              "issuing-ca retire once no certificate of the old one is in service",
              markup=False)


def retire(pki: PkiOpt = DEFAULT_PKI, passphrase_env: PassEnvOpt = None) -> None:
    """Drop the retiring issuing CA once no certificate it signed is in service.

    Refused (exit 1) while any active, superseded or held certificate it signed has not
    expired: revoke them or wait.

    Example: fleet-provision issuing-ca retire --pki fleet-pki
    """
    with open_authority(pki, passphrase_env) as authority:
        done = retire_ca(authority)
    if done is None:
        err.print("nothing to retire: only the current issuing CA is live", markup=False)
        return
    err.print(f"retired {cn(done.old)} (serial {format_serial(done.old.serial_number)}): its "
              f"key is deleted, its certificate kept in {done.retired_cert}; ca-chain.pem and "
              "crl.pem carry the current issuing CA only", markup=False)


def show(pki: PkiOpt = DEFAULT_PKI, as_json: JsonOpt = False) -> None:
    """List the live issuing CAs, current first, with how many certificates each signed are
    still in service (no key needed).

    Example: fleet-provision issuing-ca show --pki fleet-pki --json
    """
    from provisioning.authority import Authority  # noqa: PLC0415

    with Authority(pki) as authority:
        found = show_cas(authority)
    rows = [{"subject": cn(i.cert), "serial": format_serial(i.cert.serial_number),
             "not_after": iso(i.cert.not_valid_after_utc),
             "status": "current" if i.current else "retiring",
             "certificates": i.in_service, "last_certificate_expires": i.latest_not_after}
            for i in found]
    if as_json:
        emit_json(rows)
        return
    print_columns(["STATUS", "SUBJECT", "SERIAL", "NOT AFTER", "IN SERVICE", "LAST EXPIRES"],
                  [[str(r["status"]), str(r["subject"]), str(r["serial"]), str(r["not_after"]),
                    str(r["certificates"]), str(r["last_certificate_expires"] or "-")]
                   for r in rows])
