"""The feed source against a real mutual-TLS feed on loopback serving real signed documents.

A snapshot first, then each change by long-poll straight to the watcher (its own refresh is a
minute: only the source's wake-up can publish that fast); a gap asks for a snapshot; refused
documents and an unreachable CA keep the last good state, healthy while it is young; the cache
is written and used at start when the CA is down; past max_age_seconds the state is stale.
Every wait is on a signal (a callback, a request seen by the server), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from hub.config import BindAddress
from hub.errors import RevocationError
from hub.metrics import Metrics, MetricsServer, Readings
from hub.revocation import (
    RevocationWatcher,
    Snapshot,
    SourceState,
    load_ca_bundle,
    refusal,
    unregistered,
)
from hub.revocation.feed import FeedSource
from hub.revocation.feed_cache import FeedCache
from hub.revocation.feed_client import FeedClient
from hub.revocation.feed_verify import FeedVerifier
from provisioning.authority import Authority
from provisioning.registry.feeddoc import Device, b64url, b64url_decode
from tests.hub.cabundle_support import second_intermediate
from tests.hub.feed_support import (
    GATEWAY,
    FeedServer,
    Issued,
    Signer,
    delta,
    revoked,
    snapshot,
    state,
)
from tests.integration.fleet import TRUST_DOMAIN, Fleet

WAIT = 0.2  # the long-poll's wait in these tests (the hub's is 30 s)
V1 = state(1, {"d1": Device(group="ops", password_hash="scrypt$x",
                            certificates={0xA1: "active"})})
V2 = state(2, {"d1": Device(group="ops", password_hash="scrypt$x",
                            certificates={0xA1: "active", 0xA2: "active"}),
               "d2": Device(status="suspended")}, {0xB2: revoked("d2", "on_hold")})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def ca(fleet: Fleet) -> Signer:
    return Signer.issuing(fleet)


def make_source(fleet: Fleet, url: str, cache: Path | None, *, max_age: float = 86400,
                start_budget: float = 10.0, identity: Path | None = None) -> FeedSource:
    """The hub's feed source as configured from hub.toml, with a short wait; its gateway
    certificate is the PKI's server.pem/server.key, or those in the folder *identity*."""
    folder = identity or fleet.pki
    client = FeedClient(url, folder / "server.pem", folder / "server.key",
                        fleet.ca.read_text())
    verifier = FeedVerifier(load_ca_bundle(fleet.ca), TRUST_DOMAIN, GATEWAY)
    return FeedSource(client, verifier,
                      None if cache is None else FeedCache(cache, TRUST_DOMAIN, GATEWAY),
                      max_age_seconds=max_age, certificates=True, wait=WAIT,
                      start_budget=start_budget)


class Watching:
    """A watcher of one feed source, its changes and its state changes as queues."""

    def __init__(self, source: FeedSource) -> None:
        self.source = source
        self.changes: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.states: asyncio.Queue[tuple[SourceState, str | None]] = asyncio.Queue()
        self.watcher = RevocationWatcher.over(
            [source], refresh_seconds=60,
            on_change=lambda _old, new: self.changes.put_nowait(new),
            on_source=lambda _name, st, why: self.states.put_nowait((st, why)))

    async def change(self) -> Snapshot:
        return await asyncio.wait_for(self.changes.get(), 10)

    async def state(self, want: SourceState) -> str | None:
        while True:
            got, why = await asyncio.wait_for(self.states.get(), 10)
            if got is want:
                return why


@asynccontextmanager
async def watching(source: FeedSource) -> AsyncIterator[Watching]:
    watch = Watching(source)
    await watch.watcher.start()
    try:
        yield watch
    finally:
        await watch.watcher.stop()


def _run(scenario: object) -> None:
    asyncio.run(scenario)  # type: ignore[arg-type]


def test_a_snapshot_then_a_change_by_long_poll(fleet: Fleet, ca: Signer, tmp_path: Path) -> None:
    """since=0 gives the snapshot (groups, hashes, serials, refusals in force); the next request
    waits at since=1 and a change at the CA reaches the watcher at once, as a delta."""

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V1).start()
        try:
            async with watching(make_source(fleet, server.url, tmp_path / "c.json")) as watch:
                snap = watch.watcher.snapshot
                assert snap.groups == {"d1": "ops"}
                assert snap.password_hashes == {"d1": "scrypt$x"}
                assert snap.certificates == {"d1": frozenset({0xA1})}
                assert not unregistered(snap, 0xA1, "d1")
                await server.wait_requests(2)  # the long-poll is waiting at the CA
                server.publish(V2)
                new = await watch.change()
                assert refusal(new, 0xB2, "d2") == "on-hold"
                assert refusal(new, 0xCC, "d2") == "device-suspended"
                assert new.certificates == {"d1": frozenset({0xA1, 0xA2})}
                assert watch.source.version == 2
        finally:
            await server.stop()
        assert server.requests[:2] == [(0, "0.2"), (1, "0.2")]
        assert (2, "0.2") in server.requests[2:]
        assert server.peers[0] == f"spiffe://{TRUST_DOMAIN}/gateway/{GATEWAY}"

    _run(scenario())


def test_a_gap_asks_for_a_snapshot(fleet: Fleet, ca: Signer, caplog: pytest.LogCaptureFixture,
                                   ) -> None:
    """A delta whose base is not the version in force: the next request is since=0, and the
    snapshot it brings is applied; no refusal is counted."""
    caplog.set_level(logging.INFO, "hub.revocation")

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V1).start()
        try:
            async with watching(make_source(fleet, server.url, None)) as watch:
                await server.wait_requests(2)
                server.forced.append(ca.sign(delta(state(5), state(6), server.issued.next())))
                server.publish(V2)  # the waiting request answers 1 -> 2; the next is forced
                await watch.change()
                await server.wait_requests(4)
                assert server.requests[2][0] == 2
                assert server.requests[3][0] == 0
                assert watch.source.version == 2
                assert sum(watch.source.refused.values()) == 0
        finally:
            await server.stop()

    _run(scenario())
    assert any("asking for a snapshot" in r.getMessage() for r in caplog.records)


def test_a_tampered_document_is_refused_counted_and_the_state_kept(
        fleet: Fleet, ca: Signer) -> None:
    """A delta lifting a hold, its payload altered after signing: refused (signature), the hold
    stays, the source is reported down once and up again on the next good answer."""

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V2).start()
        try:
            async with watching(make_source(fleet, server.url, None)) as watch:
                envelope = json.loads(ca.sign(delta(V2, state(3), server.issued.next())))
                doc = json.loads(b64url_decode(envelope["payload"], "payload"))
                doc["gateway"] = GATEWAY + " "  # any change breaks the signature
                envelope["payload"] = b64url(json.dumps(doc).encode())
                server.forced.append(json.dumps(envelope).encode())
                why = await watch.state(SourceState.DOWN)
                assert why == ("refused a document (signature): its signature does not "
                               "verify")
                assert watch.source.refused["signature"] == 1
                assert refusal(watch.watcher.snapshot, 0xB2, "d2") == "on-hold"
                assert watch.source.health(0).grace
                assert await watch.state(SourceState.UP) is None  # the next answer is good
                assert watch.source.status(0).refused["signature"] == 1
        finally:
            await server.stop()

    _run(scenario())


def test_an_unreachable_ca_keeps_the_state_and_healthz_200_until_max_age(
        fleet: Fleet, ca: Signer) -> None:
    """The CA goes away: the source is down (metric 0, one audit-worthy state change) but
    in its grace, so /healthz stays 200 with the feed's version and age; the CA back on the
    same port: caught up (the state it moved to meanwhile arrives)."""

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V1).start()
        port = int(server.url.split(":")[2].split("/")[0])
        source = make_source(fleet, server.url, None)
        async with watching(source) as watch:
            await server.wait_requests(2)
            await server.stop()
            why = await watch.state(SourceState.DOWN)
            assert why is not None
            assert why.startswith(("cannot reach the CA", "no answer"))
            health = source.health(dt.datetime.now(dt.UTC).timestamp())
            assert (health.ok, health.grace, health.stale) == (False, True, False)
            assert watch.watcher.healthy
            metrics = MetricsServer(BindAddress("127.0.0.1", 0), Metrics(), Readings(
                watch.watcher.health,
                feed=lambda: source.status(dt.datetime.now(dt.UTC).timestamp())))
            await metrics.start()
            try:
                async with aiohttp.ClientSession() as http, http.get(
                        f"http://127.0.0.1:{metrics.port}/healthz") as answer:
                    assert answer.status == 200
                    body = await answer.json()
                async with aiohttp.ClientSession() as http, http.get(
                        f"http://127.0.0.1:{metrics.port}/metrics") as answer:
                    text = await answer.text()
            finally:
                await metrics.stop()
            assert body["revocation"][0]["ok"] is False
            assert body["feed"]["version"] == 1
            assert body["feed"]["stale"] is False
            assert body["feed"]["gateway"] == GATEWAY
            assert "fleet_hub_feed_version 1.0" in text
            assert 'fleet_hub_feed_refused_total{reason="signature"} 0.0' in text
            assert 'fleet_hub_revocation_source_up{source="feed"} 0.0' in text
            back = FeedServer(fleet, ca, V1)
            back.publish(V2)
            await back.start(port)
            try:
                assert refusal(await watch.change(), 0xB2, "d2") == "on-hold"
                await watch.state(SourceState.UP)
            finally:
                await back.stop()

    _run(scenario())


def test_the_cache_is_written_and_used_at_start_when_the_ca_is_down(
        fleet: Fleet, ca: Signer, tmp_path: Path) -> None:
    """Each accepted change is cached; a hub started while the CA is down enforces it."""
    cache = tmp_path / "fleet-state.json"

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V1).start()
        url = server.url
        try:
            async with watching(make_source(fleet, url, cache)) as watch:
                await server.wait_requests(2)
                server.publish(V2)
                await watch.change()
        finally:
            await server.stop()  # stopping the watcher above waited for the cache write
        async with watching(make_source(fleet, url, cache, start_budget=0.5)) as watch:
            snap = watch.watcher.snapshot
            assert refusal(snap, 0xB2, "d2") == "on-hold"
            assert snap.groups == {"d1": "ops"}
            assert snap.certificates == {"d1": frozenset({0xA1, 0xA2})}
            assert watch.source.version == 2
            await watch.state(SourceState.DOWN)  # and it says the CA is unreachable

    _run(scenario())
    cached = json.loads(cache.read_text())
    assert (cached["version"], cached["base"], cached["gateway"]) == (2, 0, GATEWAY)


def test_a_damaged_cache_is_ignored_and_no_state_means_no_start(
        fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage in feed_cache is logged and not used; with the CA down too there is no state,
    and the watcher does not start (the hub exits naming revocation.feed)."""
    cache = tmp_path / "fleet-state.json"
    cache.write_text('{"format": "fleet-state/1", "version": ')

    async def scenario() -> None:
        source = make_source(fleet, "https://127.0.0.1:9/feed", cache, start_budget=0.5)
        with pytest.raises(RevocationError, match="cannot reach the CA"):
            await RevocationWatcher.over([source]).start()
        assert source.data is None

    _run(scenario())
    assert any("is damaged" in r.getMessage() for r in caplog.records)


def test_a_cache_for_another_gateway_is_ignored(fleet: Fleet, tmp_path: Path, ca: Signer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "fleet-state.json"
    cache.write_text(json.dumps(snapshot(V2, "2026-12-03T12:00:00.000Z", gateway="gw-9")))

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V1).start()
        try:
            async with watching(make_source(fleet, server.url, cache)) as watch:
                assert watch.source.version == 1  # from the CA, not the cache
        finally:
            await server.stop()

    _run(scenario())
    assert any("for gateway 'gw-9'" in r.getMessage() for r in caplog.records)


def test_past_max_age_the_state_is_stale_and_still_enforced(
        fleet: Fleet, ca: Signer) -> None:
    """A CA whose documents were issued two hours ago, max_age one hour: stale at once
    (unhealthy, warned), the refusals enforced; fresh documents clear it."""

    async def scenario() -> None:
        server = FeedServer(fleet, ca, V2)
        server.issued = Issued(dt.timedelta(hours=-2))
        await server.start()
        try:
            async with watching(make_source(fleet, server.url, None, max_age=3600)) as watch:
                why = await watch.state(SourceState.STALE)
                assert why is not None
                assert "more than max_age_seconds (3600 s)" in why
                now = dt.datetime.now(dt.UTC).timestamp()
                assert watch.source.health(now).stale
                assert not watch.watcher.healthy
                age = watch.source.status(now).state_age_seconds
                assert age is not None
                assert age > 7000
                assert refusal(watch.watcher.snapshot, 0xB2, "d2") == "on-hold"
                server.issued.offset = dt.timedelta(0)  # the next heartbeat is fresh
                await watch.state(SourceState.UP)
                assert watch.watcher.healthy
        finally:
            await server.stop()

    _run(scenario())


def test_reload_tls_presents_a_rotated_gateway_certificate_on_the_next_request(
        fleet: Fleet, ca: Signer, tmp_path: Path) -> None:
    """SIGHUP's part for the feed: server.pem/server.key re-issued, reload_tls(), and the next
    request carries the new certificate (the one in flight finishes on its connection)."""
    identity = tmp_path / "gw"
    identity.mkdir()
    with Authority(fleet.pki) as authority:
        authority.server_cert(GATEWAY, ["127.0.0.1"], identity)

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V1).start()
        try:
            source = make_source(fleet, server.url, None, identity=identity)
            async with watching(source) as watch:
                await server.wait_requests(2)
                with Authority(fleet.pki) as authority:
                    authority.server_cert(GATEWAY, ["127.0.0.1"], identity)
                source.reload_tls()
                server.publish(V2)
                await watch.change()
                await server.wait_requests(3)
        finally:
            await server.stop()
        assert server.serials[0] == server.serials[1]
        assert server.serials[2] != server.serials[1]

    _run(scenario())


V3 = state(3, dict(V2.devices), {**V2.revoked, 0xC3: revoked("d3")})


@pytest.mark.parametrize(("answer", "down"), [
    pytest.param("http-403", "the CA answered HTTP 403: forced refusal", id="http-403"),
    pytest.param("truncated", "refused a document (envelope): not the feed's JWS envelope "
                 "(truncated?)", id="truncated"),
    pytest.param("rollback", "refused a document (rollback): its version goes back",
                 id="rollback"),
    pytest.param("other-gateway", "refused a document (gateway): it was served to another "
                 "gateway", id="other-gateway"),
])
def test_a_bad_answer_keeps_the_state_and_the_next_good_one_is_taken(
        fleet: Fleet, ca: Signer, answer: str, down: str) -> None:
    """Whatever is wrong with one answer, the state in force stays (here: version 3, d3's
    revocation) and the source says why, once; the next good answer brings it back up."""

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, V2).start()
        try:
            async with watching(make_source(fleet, server.url, None)) as watch:
                await server.wait_requests(2)
                bad: dict[str, bytes | int] = {
                    "http-403": 403,
                    "truncated": ca.sign(snapshot(V3, server.issued.next()))[:-20],
                    "rollback": ca.sign(snapshot(V1, server.issued.next())),
                    "other-gateway": ca.sign(snapshot(V3, server.issued.next(), "gw-2")),
                }
                server.forced.append(bad[answer])
                server.publish(V3)  # the waiting request takes 2 -> 3; the next is the bad one
                assert refusal(await watch.change(), 0xC3, "d3") == "revoked"
                assert await watch.state(SourceState.DOWN) == down
                assert refusal(watch.watcher.snapshot, 0xC3, "d3") == "revoked"
                assert watch.source.version == 3
                await watch.state(SourceState.UP)
                counted = sum(watch.source.refused.values())
                assert counted == (0 if answer == "http-403" else 1)
        finally:
            await server.stop()

    _run(scenario())


def test_the_feeds_issuers_are_verified_and_told_and_survive_a_restart(
        fleet: Fleet, ca: Signer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Contract C1: each document's issuers are checked against client_ca's roots; a changed
    set goes to on_issuers (the hub's trust). After a rotation the CA signs with the new
    intermediate, which client_ca does not list (the root signed it: accepted). An issuer of
    another root is left out, logged. The cache keeps them for a start with the CA down."""
    caplog.set_level(logging.WARNING, "hub.revocation")
    second = second_intermediate(fleet.pki)
    foreign = second_intermediate(Fleet.create(tmp_path / "other").pki)
    told: asyncio.Queue[tuple[str, ...] | None] = asyncio.Queue()

    def tell(certs: tuple[x509.Certificate, ...] | None) -> None:
        told.put_nowait(None if certs is None else tuple(
            c.subject.rfc4514_string() for c in certs))

    async def next_told() -> tuple[str, ...] | None:
        return await asyncio.wait_for(told.get(), 10)

    first, new = ca.cert.subject.rfc4514_string(), second.cert.subject.rfc4514_string()
    cache = tmp_path / "c.json"

    async def scenario() -> None:
        server = await FeedServer(fleet, ca, state(1, issuers=(ca.cert,))).start()
        try:
            source = make_source(fleet, server.url, cache)
            source.on_issuers = tell
            async with watching(source) as watch:
                assert await next_told() == (first,)
                server.signer = Signer(second.key, second.cert)  # rotated
                server.publish(state(2, {"d1": Device(status="suspended")},
                                     issuers=(second.cert, ca.cert)))
                await watch.change()
                assert await next_told() == (new, first)
                server.publish(state(3, issuers=(foreign.cert, second.cert)))
                await watch.change()
                assert await next_told() == (new,)
                assert watch.source.ok
        finally:
            await server.stop()
        restarted = make_source(fleet, server.url, cache, start_budget=0.5)
        restarted.on_issuers = tell
        async with watching(restarted):
            assert await next_told() == (new,)
            assert [c.subject.rfc4514_string() for c in restarted.issuers or ()] == [new]

    _run(scenario())
    # Once by the first source, once by the one restarted from the cache.
    warnings = [r.getMessage() for r in caplog.records if "issuers refused" in r.getMessage()]
    assert len(warnings) == 2
    assert "issuers[0]" in warnings[0]
    assert "not signed by a root of client_ca; the others are taken" in warnings[0]
