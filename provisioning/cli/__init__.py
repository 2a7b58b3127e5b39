"""``fleet-provision``: the factory operator's CA tool (DESIGN section 4).

Exit codes: 0 all done, 1 some input rejected (the rest still done), 2 usage.
Every expected failure is one line on stderr: ``error: <what> (<where>)``.

The commands live in ca.py, issue.py, devices.py, expiring.py, policy.py, service.py,
issuing.py and audit.py, the apps and the options they share in _common.py; they are
registered here, in the order ``--help`` lists them.
"""

from __future__ import annotations

from fleetcli import run_cli
from provisioning.cli import audit, ca, devices, expiring, issue, issuing, policy, service
from provisioning.cli._common import (
    app,
    audit_app,
    group_app,
    issuing_app,
    password_app,
    policy_app,
    token_app,
)
from provisioning.errors import ProvisioningError

__all__ = ["app", "main"]

app.command()(ca.init)
app.command("server-cert")(ca.server_cert)
app.command()(issue.sign)
app.command()(devices.revoke)
app.command()(devices.suspend)
app.command()(devices.resume)
app.command()(ca.crl)
app.command()(devices.devices)
app.command()(devices.device)
app.command()(expiring.expiring)
audit_app.command("verify")(audit.audit_verify)
group_app.command("set")(devices.group_set)
policy_app.command("show")(policy.policy_show)
policy_app.command("set")(policy.policy_set)
issuing_app.command("rotate")(issuing.rotate)
issuing_app.command("retire")(issuing.retire)
issuing_app.command("show")(issuing.show)
token_app.command("create")(service.token_create)
token_app.command("revoke")(service.token_revoke)
password_app.command("set")(service.password_set)
password_app.command("clear")(service.password_clear)
app.command()(service.serve)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per failure, DESIGN section 8 exit codes (fleetcli.run_cli)."""
    return run_cli(app, argv, prog_name="fleet-provision", errors=((ProvisioningError, None),))

