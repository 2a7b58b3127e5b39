"""``fleet-provision`` audit verify: the hash-chained audit log."""

from __future__ import annotations

import typer

from provisioning.authority import Authority
from provisioning.cli._common import DEFAULT_PKI, PkiOpt, err, out


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
