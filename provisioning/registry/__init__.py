"""The registry (DESIGN section 3): the one owner of the SQLite schema and of all SQL on it.

    schema.py        tables, columns, statuses, meta keys, version (stdlib-only)
    migrations.py    the schema's migrations (sqlite-utils)
    audit.py         the hash chain: seal, verify
    store.py         Registry: the CA's connection, reads, ``write()`` transactions
    expiry.py        the read of ``expiring``: certificates in service ending before a time
    transactions.py  Transaction: the audit chain plus the writes named for CA actions,
                     from issuance.py, revocation.py, devices.py, tokens.py
    view.py          FleetView: the read-only view of the fleet's state (stdlib-only)

The authority, issuer, CRL, token and EST code decide; they write through the named
transactions and read through :class:`Registry`, and never spell SQL. The hub (and the
fleet-state feed) read through :mod:`provisioning.registry.view` alone.

Import rule: ``import provisioning.registry.view`` loads the stdlib, :mod:`.schema`,
:mod:`provisioning.serial`, :mod:`provisioning.identity` and :mod:`provisioning.errors`,
never sqlite-utils or cryptography. So this ``__init__`` imports nothing eagerly: the names
below (``from provisioning.registry import Registry``) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioning.registry._sql import IN_BATCH
    from provisioning.registry.audit import detail_json
    from provisioning.registry.schema import SCHEMA_VERSION
    from provisioning.registry.store import (
        BUSY_TIMEOUT_S,
        CertificateRow,
        DeviceRow,
        Registry,
        connect,
        operator,
    )
    from provisioning.registry.transactions import Transaction

__all__ = ["BUSY_TIMEOUT_S", "IN_BATCH", "SCHEMA_VERSION", "CertificateRow", "DeviceRow",
           "Registry", "Transaction", "connect", "detail_json", "operator"]

_HOMES = {"SCHEMA_VERSION": "schema", "Transaction": "transactions", "detail_json": "audit",
          "IN_BATCH": "_sql"}


def __getattr__(name: str) -> Any:
    """``from provisioning.registry import Registry`` (PEP 562: loaded when first asked)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_HOMES.get(name, 'store')}")
    return getattr(module, name)
