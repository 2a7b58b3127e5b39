"""``fleet-provision`` sign: CSRs checked against policy, device certificates issued."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from provisioning.authority import check_group
from provisioning.cli._common import (
    DEFAULT_PKI,
    DaysOpt,
    PassEnvOpt,
    PkiOpt,
    ValidityOpt,
    chosen_validity,
    emit_json,
    err,
    open_authority,
    out,
)
from provisioning.csr import read_inputs
from provisioning.issuer import SignOptions, SignResult
from provisioning.policy import load_manifest


def sign(
    csrs: Annotated[list[Path], typer.Argument(metavar="CSR_OR_DIR...",
                                               help="CSR files or folders of *.csr")],
    pki: PkiOpt = DEFAULT_PKI,
    manifest: Annotated[Path | None, typer.Option("--manifest",
                                                  help="Allowed device ids, one a line.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Device group.")] = None,
    validity: ValidityOpt = None,
    days: DaysOpt = None,
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
    lifetime = chosen_validity(validity, days)
    if group is not None:
        check_group(group)
    allowed = load_manifest(manifest) if manifest is not None else None
    inputs, problems = read_inputs(csrs)
    target = out_dir if out_dir is not None else pki / "certs"
    with open_authority(pki, passphrase_env) as authority:
        target.mkdir(parents=True, exist_ok=True)
        options = SignOptions(manifest=allowed, group=group, validity=lifetime,
                              out_dir=target, renew=renew)
        results = [SignResult(src, None, "rejected", reason=why) for src, why in problems]
        results += authority.issuer().sign(inputs, options)
    if as_json:
        emit_json([r.to_json() for r in results])
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
