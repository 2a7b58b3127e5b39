"""Who may read the feed: a gateway certificate the CA issued (DESIGN section 9).

The service's TLS context requests an optional client certificate and verifies its chain to
``ca-chain.pem`` but not its validity times (``_NO_CHECK_TIME`` in
:mod:`provisioning.est.serve`, so a client hears why it is refused): the dates are checked
here. Then the certificate must name exactly one gateway of this trust domain (SAN URI
``spiffe://<trust domain>/gateway/<name>``), allow clientAuth (EKU), and its serial must be
one the CA issued as a server certificate (a ``server.issue`` audit event, naming the same
URI). A device certificate chains to the same CA and allows clientAuth too, but names a
``/device/`` URI and is in no ``server.issue`` event; a certificate the issuing key signed
that the CA never recorded is refused as well.

Refusals are data (:class:`Refusal`), one line each, shown to the client with a 403.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from provisioning.identity import gateway_spiffe_id, host_name_problem
from provisioning.serial import format_serial
from provisioning.timefmt import iso

__all__ = ["Gateway", "Refusal", "identify", "issued_by_ca"]


@dataclass(frozen=True, slots=True)
class Gateway:
    """A client certificate that names a gateway (not yet checked against the registry)."""

    name: str
    uri: str
    serial: int

    @property
    def serial_text(self) -> str:
        return format_serial(self.serial)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client may not read the feed: ``reason`` is shown and audited."""

    reason: str
    serial: str | None = None


def identify(der: bytes | None, trust_domain: str, now: dt.datetime) -> Gateway | Refusal:
    """The gateway a TLS-verified client certificate names, or why it names none."""
    if der is None:
        return Refusal("the feed needs mutual TLS with a gateway certificate "
                       "(fleet-provision server-cert); got no client certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return Refusal("the client certificate cannot be parsed")
    serial = format_serial(cert.serial_number)
    if now > cert.not_valid_after_utc:
        return Refusal(f"client certificate {serial} expired at "
                       f"{iso(cert.not_valid_after_utc)}", serial)
    if now < cert.not_valid_before_utc:
        return Refusal(f"client certificate {serial} is not valid before "
                       f"{iso(cert.not_valid_before_utc)}", serial)
    prefix = gateway_spiffe_id(trust_domain, "")
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    named = [uri for uri in uris if uri.startswith(prefix)]
    if len(named) != 1:
        shown = ", ".join(uris[:3]) or "none"
        return Refusal(f"client certificate {serial} is not a gateway certificate: want one "
                       f"SAN URI {prefix}<name>, got {shown}", serial)
    name = named[0][len(prefix):]
    if host_name_problem(name) is not None:
        return Refusal(f"client certificate {serial} names the gateway {name[:80]!r}, "
                       "which is not a host name", serial)
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return Refusal(f"client certificate {serial} does not allow clientAuth "
                       "(extended key usage)", serial)
    return Gateway(name, named[0], cert.serial_number)


def issued_by_ca(gateway: Gateway, issued: Mapping[int, str | None]) -> Refusal | None:
    """None when the CA recorded *gateway*'s certificate as a server certificate it issued
    for that very URI (an event from before URIs were recorded names none: the serial then
    suffices); else why not."""
    if gateway.serial not in issued:
        return Refusal(f"client certificate {gateway.serial_text} is no gateway certificate "
                       "this CA issued (no server.issue event for it)", gateway.serial_text)
    recorded = issued[gateway.serial]
    if recorded is not None and recorded != gateway.uri:
        return Refusal(f"client certificate {gateway.serial_text} was issued for {recorded}, "
                       f"not {gateway.uri}", gateway.serial_text)
    return None
