"""``fleet-provision serve``: enrollment (EST, RFC 7030), the CRL and OCSP (RFC 6960) over HTTPS,
and the fleet-state feed for gateways (``/feed``, :mod:`provisioning.feed`).

Two processes, and each module's docstring says which side it lives on:

    HTTP side (the event loop; aiohttp)      CA worker process (SQLite, the CA key)
      service.py  the app, listeners, audit    engine.py     batches of jobs, one transaction
      routes.py   the request handlers                       each; CRL and OCSP answers
      serve.py    bind, TLS, server cert, run  authorize.py  token or client certificate ->
      channel.py  EngineChannel: the pipe to                 who is enrolling
                  the worker, futures
                        messages.py: the picklable jobs, replies and audit events between them

The feed's follower reads the registry read-only (a FleetView, in a thread of the HTTP
process); its documents are signed by the worker (``FeedSignJob``). The worker is a new
interpreter that imports :mod:`provisioning.est.engine` alone, so this
package loads its HTTP side only when one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioning.est.messages import SERVICE_ACTOR
    from provisioning.est.serve import (
        ensure_server_cert,
        parse_bind,
        run,
        serve_until,
        tls_context,
    )
    from provisioning.est.service import EnrollmentService

_HOMES = {"SERVICE_ACTOR": "messages", "EnrollmentService": "service",
          "ensure_server_cert": "serve", "parse_bind": "serve", "run": "serve",
          "serve_until": "serve", "tls_context": "serve"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = ["SERVICE_ACTOR", "EnrollmentService", "ensure_server_cert", "parse_bind", "run",
           "serve_until", "tls_context"]
