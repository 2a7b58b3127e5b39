"""A PKI for a lab and devices enrolled the factory way: their own key, a CSR, ``sign``.

The CSR is :func:`device_sim.factory.csr_pem`'s, the one the simulated devices send; the
tests' fleets and the benchmarks enroll through :func:`enroll` in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from device_sim.errors import EnrollError
from device_sim.factory import csr_pem, new_key, write_key
from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions

TRUST_DOMAIN = "quickstart.fleet.test"


def make_pki(root: Path, *, organisation: str = "Quickstart Fleet",
             trust_domain: str = TRUST_DOMAIN, actor: str | None = "fleet-sim") -> Path:
    """A new PKI in ``root/pki`` with a hub certificate for localhost / 127.0.0.1."""
    pki = root / "pki"
    initialize(pki, PKIConfig(trust_domain=trust_domain, organisation=organisation), None)
    with Authority(pki, actor=actor) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    return pki


@dataclass(frozen=True)
class Enrolled:
    """A device's files in the output folder and its certificate's serial (lowercase hex)."""

    device_id: str
    cert: Path
    key: Path
    serial: str


def enroll(pki: Path, out: Path, device_ids: Sequence[str], *, group: str | None = None,
           renew: bool = False) -> list[Enrolled]:
    """Each device makes a P-256 key (``out/<id>.key``, mode 0600) and a CSR; one ``sign``
    batch writes ``out/<id>.pem``. EnrollError unless every one is issued (or was already)."""
    inputs: list[CSRInput] = []
    for device_id in device_ids:
        key = new_key()
        write_key(out / f"{device_id}.key", key)
        inputs.append(CSRInput(device_id, csr_pem(device_id, key)))
    with Authority(pki) as authority:
        results = authority.issuer().sign(
            inputs, SignOptions(out_dir=out, group=group, renew=renew))
    enrolled: list[Enrolled] = []
    for device_id, result in zip(device_ids, results, strict=True):
        if result.status not in ("issued", "existing") or result.serial is None:
            raise EnrollError(f"{device_id} not issued: {result.status}, {result.reason}",
                              str(pki))
        enrolled.append(Enrolled(device_id, out / f"{device_id}.pem",
                                 out / f"{device_id}.key", result.serial))
    return enrolled
