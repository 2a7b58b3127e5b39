"""``fleet-provision`` devices, device, group set, revoke, suspend, resume: the fleet's devices."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from provisioning.authority import Authority, check_group
from provisioning.cli._common import (
    DEFAULT_PKI,
    PassEnvOpt,
    PkiOpt,
    emit_json,
    err,
    open_authority,
    open_writer,
    out,
    print_columns,
)
from provisioning.errors import NotFoundError, UsageError

DEVICE_STATUSES = ("active", "suspended", "revoked")

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
    with open_authority(pki, passphrase_env) as authority:
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


def suspend(device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
            pki: PkiOpt = DEFAULT_PKI, passphrase_env: PassEnvOpt = None) -> None:
    """Put a device's certificates on hold (certificateHold); resume lifts it.

    Example: fleet-provision suspend sensor-0042
    """
    with open_authority(pki, passphrase_env) as authority:
        change = authority.suspend(device_id)
    err.print(f"suspended {device_id}: {len(change.serials)} certificate(s) on hold"
              if change.crl_number else f"{device_id} is already suspended")


def resume(device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
           pki: PkiOpt = DEFAULT_PKI, passphrase_env: PassEnvOpt = None) -> None:
    """Lift a hold put by suspend.

    Example: fleet-provision resume sensor-0042
    """
    with open_authority(pki, passphrase_env) as authority:
        change = authority.resume(device_id)
    err.print(f"resumed {device_id}: {len(change.serials)} certificate(s) back in service"
              if change.crl_number else f"{device_id} is not suspended")


def _current_cert(certs: list[Any]) -> Any:
    live = [c for c in certs if c.status in ("active", "on_hold")]
    return (live or certs or [None])[-1]


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
        emit_json(rows)
        return
    print_columns(("device", "status", "group", "serial", "not after"),
                   [[row[key] or "-" for key in ("device_id", "status", "group", "serial",
                                                  "not_after")] for row in rows])


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
        emit_json(data)
        return
    out.print(f"{dev.device_id}  status={dev.status}  group={dev.group or '-'}  "
              f"created={dev.created_at}", markup=False)
    print_columns(("serial", "status", "issued", "not after", "revoked", "reason"),
                   [(c.serial, c.status, c.issued_at, c.not_after, c.revoked_at or "-",
                     c.reason or "-") for c in certs])


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
    with open_writer(pki) as authority:
        moves = authority.set_group(device_ids, group)
    for move in moves:
        if move.moved:
            was = f"group {move.previous}" if move.previous is not None else "no group"
            err.print(f"moved {move.device_id} to group {group} (was in {was})", markup=False)
        else:
            err.print(f"{move.device_id} is already in group {group}", markup=False)
