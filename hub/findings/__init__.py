"""The gateway's audit checks (issue 15, DESIGN section 11): findings from what the hub sees.

Authentication says whether a certificate may connect; these checks say whether what it does
once in looks like misuse or trouble ahead: one certificate in two boxes, two certificates
fighting over one client id, expiry coming, a revoked session that outlived its kick, a
certificate the registry never recorded, a weak key. Each finding is an audit ``finding`` row
with evidence and a Prometheus counter; with ``[checks] action = "quarantine"`` a misuse
finding also closes and refuses the certificate at this gateway until an operator clears it.

Nothing here runs on the CONNECT path beyond O(1) dict work: the broker hands over take-overs
and admissions, and :mod:`~hub.findings.engine` does the rest after the accept (a sweep each
second, key inspection in a worker thread, cached per serial).

Modules:

- :mod:`~hub.findings.model`: the check names and :class:`Finding`;
- :mod:`~hub.findings.takeovers`: certificate-shared and client-id-conflict from take-overs;
- :mod:`~hub.findings.sweep`: certificate-expiring, ca-expiring, revoked-still-connected;
- :mod:`~hub.findings.keys`: weak-key (RSA size, EC curve);
- :mod:`~hub.findings.quarantine`: the quarantined serials, on disk across restarts;
- :mod:`~hub.findings.reporter`: audit row and counter, once per check and subject per period;
- :mod:`~hub.findings.engine`: the hub's findings, wiring the above to the runtime;
- :mod:`~hub.findings.cli`: ``fleet-hub quarantine list|clear``.
"""

from __future__ import annotations

from hub.findings.model import CHECKS, MISUSE, Finding

__all__ = ["CHECKS", "MISUSE", "Finding"]
