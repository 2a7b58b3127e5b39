"""The fleet policy a rotation run needs, and the CA service's own certificate under it.

A run on minute-scale certificates sets the PKI's ``validity`` and ``renew_grace`` through
``fleet-provision policy set`` (the public command: checked, atomic, audited as
``policy.set``) and puts the old values back afterwards, so a rehearsal does not leave the
fleet issuing four-minute certificates.

``fleet-provision serve`` issues its own TLS certificate (``est-server.pem``) with the
fleet's validity when the one on disk has less than 30 days left: under a 4-minute policy
it would issue one that ends mid-run, every start. :func:`ensure_service_cert` issues it for
a year first (the service then keeps it). :func:`rotation_service` does all of it around a
run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509

from device_sim.errors import UsageError
from device_sim.lab.gateways import CAServiceProcess
from provisioning.authority import Authority

SERVICE_CERT_DAYS = 365
SERVICE_CERT_MIN_LEFT = dt.timedelta(days=31)  # serve re-issues below 30 days


def _provision(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "provisioning.cli", *args],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UsageError(f"fleet-provision {args[0]} {args[1]} failed: "
                         f"{done.stderr.strip() or done.returncode}", "--pki")
    return done.stdout


def policy(pki: Path) -> dict[str, str]:
    """``policy show --json``: validity, renew_grace (and the CRL lifetime) as text."""
    return {key: str(value) for key, value in
            json.loads(_provision("policy", "show", "--pki", str(pki), "--json")).items()}


def set_policy(pki: Path, validity: str, renew_grace: str) -> dict[str, str]:
    """``policy set validity=... renew_grace=...``; returns the values it replaced."""
    before = policy(pki)
    if (before["validity"], before["renew_grace"]) != (validity, renew_grace):
        _provision("policy", "set", "--pki", str(pki), f"validity={validity}",
                   f"renew_grace={renew_grace}")
    return {"validity": before["validity"], "renew_grace": before["renew_grace"]}


def ensure_service_cert(pki: Path, host: str = "127.0.0.1") -> None:
    """``est-server.pem`` for *host* valid a year, unless the one there has a month left."""
    try:
        cert = x509.load_pem_x509_certificates((pki / "est-server.pem").read_bytes())[0]
        if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > SERVICE_CERT_MIN_LEFT:
            return
    except (OSError, ValueError, IndexError):
        pass
    with Authority(pki, actor="fleet-sim") as authority:
        authority.server_cert("localhost", [host], pki, days=SERVICE_CERT_DAYS,
                              basename="est-server")


@contextlib.contextmanager
def rotation_service(pki: Path, validity: str, renew_grace: str,
                     url: str | None = None) -> Iterator[str]:
    """The EST service a rotation run renews through; yields its URL.

    With *url* (``--enroll``: a service the operator runs) the PKI's policy must already be
    *validity* and *renew_grace* (the service read them when it started). Without, the
    policy is set, the
    service started on a free loopback port for the run, then stopped and the policy put
    back as it was.
    """
    if url is not None:
        current = policy(pki)
        for key, want, option in (("validity", validity, "--validity"),
                                  ("renew_grace", renew_grace, "--renew-grace")):
            if current[key] != want:
                raise UsageError(
                    f"the PKI's {key} is {current[key]}, not {want}: run fleet-provision "
                    f"policy set --pki {pki} validity={validity} renew_grace={renew_grace} "
                    "and restart the service, or leave --enroll out", option)
        yield url
        return
    before = set_policy(pki, validity, renew_grace)
    try:
        ensure_service_cert(pki)
        with CAServiceProcess(pki) as service:
            yield service.url
    finally:
        set_policy(pki, before["validity"], before["renew_grace"])
