"""The fleet's SPIFFE trust domain: the ``<domain>`` of ``spiffe://<domain>/device/<id>`` admitted.

A certificate from the fleet's CA that names another trust domain is refused
(``wrong-trust-domain``, DESIGN section 5): a CA shared by several fleets, or one that once
issued under another domain, must not let those devices in. The domain is, first found wins:

1. ``[auth] trust_domain`` (with ``--pki``: ``trust_domain`` from the folder's ``pki.toml``);
2. the registry: the ``trust_domain`` in the detail of its first ``pki.init`` audit event,
   read through the registry's read-only view (:mod:`provisioning.registry.view`). That event
   is written once by ``fleet-provision init`` and sealed in the hash chain, and it is in the
   one file the hub is told to read; the ``pki.toml`` next to ``registry.db`` is an editable
   file the hub may not even have;
3. the hub's gateway certificate toward the feed (``revocation.feed_cert``), then its server
   certificate (``listener.server_cert``): a SAN URI ``spiffe://<domain>/gateway/<name>``,
   which ``fleet-provision server-cert`` adds.

With a feed, the ``<name>`` of ``feed_cert``'s gateway URI is the hub's gateway name: a feed
document served to another gateway is refused (:func:`feed_gateway`).

When none names it, the hub refuses to start: admitting any domain would make the check void.
Reading the registry and the certificate is blocking work: call :func:`resolve_trust_domain`
from a worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from hub.config import HubConfig
from hub.errors import ConfigError
from provisioning.identity import is_valid_trust_domain
from provisioning.registry.view import FleetView, FleetViewError

__all__ = ["TrustDomain", "certificate_trust_domain", "feed_gateway", "gateway_identity",
           "registry_trust_domain", "resolve_trust_domain"]

log = logging.getLogger("hub.trust")

_SPIFFE: Final = "spiffe://"
_GATEWAY_PATH: Final = "/gateway/"


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """The fleet's trust domain and where the hub learnt it (for the log and the docs)."""

    name: str
    origin: str  # "auth.trust_domain" | "the registry's pki.init event" | "the server certificate"


def resolve_trust_domain(config: HubConfig) -> TrustDomain:
    """The configured domain, else the registry's, else the server certificate's.

    Raises ConfigError naming ``auth.trust_domain`` when none of them gives one.
    """
    if config.auth.trust_domain is not None:
        return TrustDomain(config.auth.trust_domain, "auth.trust_domain")
    registry = config.revocation.registry
    if registry is not None:
        found = registry_trust_domain(registry)
        if found is not None:
            return TrustDomain(found, "the registry's pki.init event")
    feed_cert = config.revocation.feed_cert
    if feed_cert is not None and (found := certificate_trust_domain(feed_cert)) is not None:
        return TrustDomain(found, "the feed certificate")
    found = certificate_trust_domain(config.listener.server_cert)
    if found is not None:
        return TrustDomain(found, "the server certificate")
    tried = "the registry's pki.init event, " if registry is not None else ""
    raise ConfigError(
        config.source, "auth.trust_domain",
        f"not set, and neither {tried}nor a spiffe://<domain>/gateway/<name> URI in "
        "listener.server_cert names the fleet's trust domain: set it, e.g. "
        'trust_domain = "fleet.example.com"')


def registry_trust_domain(path: Path) -> str | None:
    """``trust_domain`` of the registry's first ``pki.init`` event; None if it cannot say."""
    try:
        view = FleetView(path)
    except FleetViewError as exc:
        log.warning("cannot open the registry %s for its trust domain: %s", path,
                    exc.__cause__ or exc)
        return None
    try:
        return view.trust_domain()
    except FleetViewError as exc:
        log.warning("cannot read the trust domain from the registry %s: %s", path,
                    exc.__cause__ or exc)
        return None
    finally:
        view.close()


def certificate_trust_domain(path: Path) -> str | None:
    """The domain of a ``spiffe://<domain>/gateway/<name>`` URI in the first certificate of
    *path* (the hub's own); None when there is none or they disagree."""
    domains = {domain for domain, _ in _gateway_uris(path)}
    return domains.pop() if len(domains) == 1 else None


def gateway_identity(path: Path) -> tuple[str, str] | None:
    """``(domain, name)`` of the one ``spiffe://<domain>/gateway/<name>`` URI in the first
    certificate of *path*; None when there is none, several, or the file is no certificate."""
    found = _gateway_uris(path)
    return found.pop() if len(found) == 1 else None


def _gateway_uris(path: Path) -> set[tuple[str, str]]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    found = set()
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.startswith(_SPIFFE):
            continue
        domain, sep, name = uri[len(_SPIFFE):].partition(_GATEWAY_PATH)
        if sep and name and is_valid_trust_domain(domain):
            found.add((domain, name))
    return found


def feed_gateway(config: HubConfig) -> tuple[str, str]:
    """``(domain, name)`` of the hub's gateway certificate toward the feed.

    Raises ConfigError naming ``revocation.feed_cert`` when the feed is set and the
    certificate names no gateway: the CA serves a document to one gateway by that name.
    """
    path = config.revocation.feed_cert
    if config.revocation.feed is None or path is None:
        raise ConfigError(config.source, "revocation.feed", "no feed configured")
    found = gateway_identity(path)
    if found is None:
        raise ConfigError(
            config.source, "revocation.feed_cert",
            f"{path} carries no (single) SAN URI spiffe://<trust-domain>/gateway/<name>: the "
            "feed serves gateways by that name; make one with fleet-provision server-cert")
    return found
