"""``fleet-provision`` policy show, policy set: the fleet's policy in pki.toml (DESIGN 4, 10).

``policy set`` re-reads pki.toml and rewrites it (atomically, as :meth:`PKIConfig.to_toml`
writes it) while holding the registry's write lock, and audits ``policy.set`` with every
changed key's old and new value in the same transaction: two operators setting at once both
land, one after the other, and the audit log says who changed what.
"""

from __future__ import annotations

from typing import Annotated

import typer

from provisioning.cli._common import (
    DEFAULT_PKI,
    PkiOpt,
    emit_json,
    err,
    open_writer,
    print_columns,
)
from provisioning.config import POLICY_KEYS, load_config, policy_values, with_policy
from provisioning.errors import UsageError
from provisioning.fsutil import atomic_write
from provisioning.pki import PKIPaths
from provisioning.timefmt import iso, utcnow

POLICY_SET_ACTION = "policy.set"


def policy_show(
    pki: PkiOpt = DEFAULT_PKI,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Show the fleet's policy: validity, renew_grace, crl_lifetime_hours.

    Example: fleet-provision policy show --pki fleet-pki --json
    """
    values = policy_values(load_config(PKIPaths(pki).config))
    if as_json:
        emit_json(values)
        return
    print_columns(("key", "value", "what"),
                  [(key, str(values[key]), POLICY_KEYS[key]) for key in POLICY_KEYS])


def _settings(pairs: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            shown = pair if len(pair) <= 40 else pair[:37] + "..."
            raise UsageError(f"want KEY=VALUE, got {shown!r}", "policy set")
        if key in settings:
            raise UsageError("given twice", key)
        settings[key] = value
    return settings


def policy_set(
    pairs: Annotated[list[str], typer.Argument(metavar="KEY=VALUE...",
                                               help="e.g. validity=30d renew_grace=2h")],
    pki: PkiOpt = DEFAULT_PKI,
) -> None:
    """Change the fleet's policy in pki.toml, audited as policy.set with old and new values.

    Certificates already issued keep their validity; a running serve reads pki.toml when it
    starts, so restart it. All keys are checked before anything is written: all or none.

    Example: fleet-provision policy set --pki fleet-pki validity=12h renew_grace=15m
    """
    settings = _settings(pairs)
    with open_writer(pki) as authority:
        path = authority.paths.config
        with authority.registry.write(authority.actor) as tx:
            before = load_config(path)  # under the write lock: no other set is between
            after = with_policy(before, settings)
            old, new = policy_values(before), policy_values(after)
            changes = {key: {"from": old[key], "to": new[key]} for key in settings
                       if old[key] != new[key]}
            if changes:
                atomic_write(path, after.to_toml().encode(), path.stat().st_mode & 0o777)
                tx.audit(iso(utcnow()), POLICY_SET_ACTION, None, None,
                         {"changes": changes, "file": str(path.absolute())})
    if not changes:
        err.print("policy unchanged", markup=False)
        return
    for key, change in changes.items():
        err.print(f"{key}: {change['from']} -> {change['to']}", markup=False)
    err.print(f"wrote {path}; certificates already issued keep theirs; restart a running "
              "serve to apply", markup=False)
