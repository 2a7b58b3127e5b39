"""``fleet-provision serve``: enrollment (EST, RFC 7030), the CRL and OCSP (RFC 6960) over HTTPS.

Two processes: the HTTP side (``service.py``; ``channel.py``, its handle on the CA worker
process) and the CA worker process (``engine.py``), with the picklable values they exchange
in ``messages.py``. The worker is a new interpreter that imports :mod:`provisioning.est.engine`
alone, so this package loads its HTTP side only when one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioning.est.messages import SERVICE_ACTOR
    from provisioning.est.service import (
        EnrollmentService,
        ensure_server_cert,
        parse_bind,
        run,
        serve_until,
        tls_context,
    )

_HOMES = {"SERVICE_ACTOR": "messages", "EnrollmentService": "service",
          "ensure_server_cert": "service", "parse_bind": "service", "run": "service",
          "serve_until": "service", "tls_context": "service"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = ["SERVICE_ACTOR", "EnrollmentService", "ensure_server_cert", "parse_bind", "run",
           "serve_until", "tls_context"]
