"""One hub's moving parts: revocation watcher, audit store, metrics and the gatekeeper.

Shared by ``fleet-hub`` (which builds it) and by our amqtt plugins when a stock amqtt loads
them from its own configuration (then the plugin builds it from ``hub.toml``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from hub.acl import AclPolicy
from hub.audit import AuditStore
from hub.cabundle import BundleWatcher
from hub.config import HubConfig
from hub.errors import ConfigError, RevocationError
from hub.findings.engine import Findings
from hub.gatekeeper import Gatekeeper
from hub.identity import DeviceIdentity
from hub.metrics import Metrics, MetricsServer, Readings
from hub.revocation import RevocationWatcher, Snapshot, SourceState, load_ca_bundle
from hub.revocation.feed import FeedSource
from hub.revocation.feed_state import FeedStatus
from hub.trust import TrustDomain, feed_gateway, resolve_trust_domain

log = logging.getLogger("hub")

SYS_PREFIX = "$"


class HubRuntime:
    """Start order: audit (so nothing is lost), the trust domain (fail if none is known),
    revocation (fail if no source), metrics."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        # The feed serves this gateway by the name in its certificate: none is a config error.
        self.gateway = feed_gateway(config) if config.revocation.feed is not None else None
        self.metrics = Metrics()
        self.audit = AuditStore(config.audit.path)
        # client_ca, re-read when the file changes (issuing-CA rotation, DESIGN section 10).
        self.client_ca = BundleWatcher(config.listener.client_ca, load_ca_bundle,
                                       audit=self.audit)
        self.watcher = RevocationWatcher(config.revocation, self.client_ca.bundle.certificates,
                                         on_change=self._revocation_changed,
                                         on_source=self._source_changed,
                                         # The fleet's serials: registered_only refuses the
                                         # others; without it, only the
                                         # unregistered-certificate check reads them
                                         # (hub.findings), and a change of them alone is
                                         # no new revocation version. A feed carries them
                                         # anyway; a registry is asked per serial instead
                                         # (a fleet-wide read per change grew a rotating
                                         # gateway's memory with the fleet).
                                         certificates=config.auth.registered_only
                                         or config.revocation.feed is not None,
                                         versioned_certificates=config.auth.registered_only)
        self.feed = next((s for s in self.watcher.sources if isinstance(s, FeedSource)), None)
        if self.feed is not None:  # the feed's issuing CAs join the trust (contract C1)
            self.feed.on_issuers = self.client_ca.announce
        self.client_ca.subscribe(
            lambda bundle: partial(self.watcher.replace_ca_certs, bundle.certificates,
                                   bundle.pem))
        self.gatekeeper = Gatekeeper(config.auth, self.watcher, self.audit, self.metrics)
        self.findings = Findings(config.checks, self.gatekeeper, self.audit,
                                 lambda: self.client_ca.bundle, config.listener.client_ca,
                                 registry=config.revocation.registry)
        self.acl: AclPolicy = config.acl
        self.metrics_server: MetricsServer | None = None
        self.started = False

    async def start(self) -> None:
        self.audit.open()
        try:
            # A registry read and a certificate parse: off the event loop.
            domain = await asyncio.to_thread(resolve_trust_domain, self.config)
            log.info("trust domain %s (from %s)", domain.name, domain.origin)
            self._check_feed_domain(domain)
            self.gatekeeper.trust_domain = domain.name
            await self._start_watcher()
            self.client_ca.start()
            await self.findings.start()
            if self.config.metrics.bind is not None:
                self.metrics_server = MetricsServer(
                    self.config.metrics.bind, self.metrics, Readings(
                        self.watcher.health,
                        extra=lambda: {"fleet_hub_audit_dropped_total":
                                       float(self.audit.statistics().dropped)},
                        revocation_version=lambda: self.watcher.snapshot.version,
                        feed=self._feed_status if self.feed is not None else None,
                        expiring=self.gatekeeper.expiring, client_ca=self.client_ca.status,
                        findings=self.findings.counts))
                await self.metrics_server.start()
        except BaseException:
            await self.findings.stop()
            await self.client_ca.stop()
            await self.watcher.stop()
            self.audit.close()
            raise
        self.started = True

    def _check_feed_domain(self, domain: TrustDomain) -> None:
        """The feed's documents are checked against feed_cert's domain: it must be the fleet's."""
        if self.gateway is not None and self.gateway[0] != domain.name:
            raise ConfigError(self.config.source, "auth.trust_domain", f"{domain.name} (from "
                              f"{domain.origin}) is not the trust domain of "
                              f"revocation.feed_cert ({self.gateway[0]})")

    async def _start_watcher(self) -> None:
        try:
            await self.watcher.start()
        except RevocationError as exc:
            feed = self.feed
            if feed is None or feed.data is not None:
                raise
            # No cache and no snapshot within the start budget: the hub has no state to
            # enforce, and refusing everyone is not a start (docs/gateway.md).
            cache = self.config.revocation.feed_cache
            raise ConfigError(self.config.source, "revocation.feed",
                              f"no fleet state: no usable cache at {cache} and no snapshot "
                              f"from {feed.where}: {feed.last_error}") from exc

    def _feed_status(self) -> FeedStatus | None:
        return None if self.feed is None else self.feed.status(time.time())

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.findings.stop()
        await self.gatekeeper.drain()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.client_ca.stop()
        await self.watcher.stop()
        self.audit.close()

    def _revocation_changed(self, old: Snapshot, new: Snapshot) -> None:
        self.gatekeeper.revocation_changed(old, new)

    def _source_changed(self, name: str, state: SourceState, why: str | None) -> None:
        """A revocation source went down, stale or came back: on the record, not just the log."""
        reason = f"{name} {state.value}" + (f": {why}" if why else "")
        self.audit.record("source", reason=reason)

    # -- authorisation used by the broker and the plugins --------------------------------------

    def topic_allowed(self, identity: DeviceIdentity | None, peer: str, topic: str,
                      action: str) -> bool:
        """ACL for publish and subscribe of an admitted device (*identity*; None: refused);
        the username plays no part (DESIGN section 5)."""
        if action == "receive":
            return True  # delivery is bounded by the subscription, checked when it was made
        if identity is None:
            return False
        device_id = identity.device_id
        # The group as the registry says now: a device enrolled a moment ago, or moved to
        # another group, gets its group's rules without reconnecting.
        group = self.watcher.snapshot.groups.get(device_id)
        if action == "subscribe":
            allowed = self.acl.may_subscribe(device_id, group, topic)
        else:
            allowed = self.acl.may_publish(device_id, group, topic)
        if not allowed:
            self.metrics.acl_denied(action)
            self.audit.record("acl-deny", device_id=device_id, serial=identity.serial_hex,
                              peer=peer, reason=f"{action} {topic}")
        return allowed
