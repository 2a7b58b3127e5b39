"""The hub's revocation view: registry, CRL file and CRL URL sources against a real PKI."""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.config import RevocationConfig
from hub.errors import HubError
from hub.revocation import (
    MemorySource,
    RevocationError,
    RevocationSource,
    RevocationWatcher,
    Snapshot,
    SourceCallback,
    SourceData,
    SourceHealth,
    SourceState,
    load_ca_bundle,
    refusal,
)
from provisioning.registry import Registry
from tests.hub.revocation_support import (
    CrlServer,
    Fleet,
    der,
    make_crl,
    make_fleet,
    pem,
)

HOLD = x509.ReasonFlags.certificate_hold
KEY_COMPROMISE = x509.ReasonFlags.key_compromise
LOGGER = "hub.revocation"
OnChange = Callable[[Snapshot, Snapshot], None]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path, "d1", "d2", "d3")


def watcher_for(fleet: Fleet, *, registry: bool = False, crl_file: Path | None = None,
                crl_url: str | None = None, refresh: float = 60.0,
                on_change: OnChange | None = None,
                states: list[tuple[str, SourceState, str | None]] | None = None,
                ) -> RevocationWatcher:
    config = RevocationConfig(registry=fleet.registry if registry else None, crl_file=crl_file,
                              crl_url=crl_url, refresh_seconds=refresh)
    on_source = None if states is None else (
        lambda name, state, why: states.append((name, state, why)))
    return RevocationWatcher(config, load_ca_bundle(fleet.chain), on_change,
                             on_source=on_source)


def only(watcher: RevocationWatcher) -> SourceHealth:
    [health] = watcher.health()
    return health


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


# -- refusal -----------------------------------------------------------------------------------

SNAP = Snapshot(revoked={1: "revoked", 2: "on-hold"},
                devices={"held": "suspended", "gone": "revoked"}, password_hashes={}, version=1)


@pytest.mark.parametrize(
    ("serial", "device_id", "expected"),
    [
        (1, "ok", "revoked"),
        (2, "ok", "on-hold"),
        (1, "held", "revoked"),  # the certificate is checked before its device
        (2, "gone", "on-hold"),
        (3, "held", "device-suspended"),
        (3, "gone", "device-revoked"),
        (3, "ok", None),
    ],
)
def test_refusal_reports_the_certificate_before_the_device(
        serial: int, device_id: str, expected: str | None) -> None:
    """refusal() names the certificate's state first, then the device's; None when allowed."""
    assert refusal(SNAP, serial, device_id) == expected


# -- the registry ------------------------------------------------------------------------------


def test_registry_suspend_resume_and_revoke_are_reflected_after_refresh(fleet: Fleet) -> None:
    """Suspend puts the certificate on hold and the device suspended; resume lifts both; revoke
    revokes both; each shows after one refresh()."""
    d1, d2 = fleet.serials["d1"], fleet.serials["d2"]

    async def scenario() -> None:
        watcher = watcher_for(fleet, registry=True)
        await watcher.start()
        try:
            assert refusal(watcher.snapshot, d1, "d1") is None
            with fleet.authority() as auth:
                auth.suspend("d1")
            assert await watcher.refresh() is True
            snap = watcher.snapshot
            assert dict(snap.revoked) == {d1: "on-hold"}
            assert dict(snap.devices) == {"d1": "suspended"}
            assert refusal(snap, d1, "d1") == "on-hold"

            with fleet.authority() as auth:
                auth.resume("d1")
            assert await watcher.refresh() is True
            assert refusal(watcher.snapshot, d1, "d1") is None
            assert dict(watcher.snapshot.devices) == {}

            with fleet.authority() as auth:
                auth.revoke("d2", None, "keyCompromise")
            assert await watcher.refresh() is True
            assert dict(watcher.snapshot.revoked) == {d2: "revoked"}
            assert refusal(watcher.snapshot, d2, "d2") == "revoked"
            assert refusal(watcher.snapshot, 12345, "d2") == "device-revoked"
            health = only(watcher)
            assert (health.name, health.ok, health.stale, health.entries) == (
                "registry", True, False, 1)
            assert health.next_update is None
            assert watcher.healthy
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_unchanged_registry_reports_no_change_and_keeps_the_version(fleet: Fleet) -> None:
    """A refresh of an untouched registry, or after a CA action that refuses nobody (a new
    device), changes nothing: refresh() is False and the snapshot version stays."""

    async def scenario() -> None:
        watcher = watcher_for(fleet, registry=True)
        await watcher.start()
        try:
            version = watcher.snapshot.version
            assert await watcher.refresh() is False
            fleet.issue("d4")
            assert await watcher.refresh() is False
            assert watcher.snapshot.version == version
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_registry_password_hashes_and_groups_are_read_without_writing(fleet: Fleet) -> None:
    """password_hashes and groups come from the registry's devices; the hub never writes it."""
    fleet.issue("op1", group="operators")
    with Registry(fleet.registry) as registry, registry.write("test") as tx:
        tx.execute("UPDATE devices SET password_hash = ? WHERE device_id = ?",
                   ("scrypt$stored", "d1"))
        tx.audit("2030-01-01T00:00:00Z", "device.password", "d1")
    before = hashlib.sha256(fleet.registry.read_bytes()).hexdigest()

    async def scenario() -> Snapshot:
        watcher = watcher_for(fleet, registry=True)
        await watcher.start()
        await watcher.refresh()
        await watcher.stop()
        return watcher.snapshot

    snap = asyncio.run(scenario())
    assert dict(snap.password_hashes) == {"d1": "scrypt$stored"}
    assert dict(snap.groups) == {"op1": "operators"}
    assert hashlib.sha256(fleet.registry.read_bytes()).hexdigest() == before


def test_a_replaced_registry_file_is_reopened(fleet: Fleet, tmp_path: Path) -> None:
    """A registry restored over the old file (a new inode) is read afresh: the hub does not
    keep reading the replaced file through its open connection."""
    backup = tmp_path / "backup.db"
    with Registry(fleet.registry) as registry:
        registry.conn.execute("VACUUM INTO ?", (str(backup),))

    async def scenario() -> None:
        watcher = watcher_for(fleet, registry=True)
        await watcher.start()
        try:
            with fleet.authority() as auth:
                auth.revoke("d1", None, "keyCompromise")
            assert await watcher.refresh() is True
            assert fleet.serials["d1"] in watcher.snapshot.revoked
            # An operator's restore with the CA stopped: the old WAL files go with the old file.
            backup.replace(fleet.registry)
            for suffix in ("-wal", "-shm"):
                Path(f"{fleet.registry}{suffix}").unlink(missing_ok=True)
            assert await watcher.refresh() is True
            assert dict(watcher.snapshot.revoked) == {}
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_a_deleted_registry_keeps_its_last_good_data(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """When the registry disappears, its last list stays in force and the source is not ok."""

    async def scenario() -> None:
        watcher = watcher_for(fleet, registry=True)
        with fleet.authority() as auth:
            auth.suspend("d1")
        await watcher.start()
        try:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{fleet.registry}{suffix}").unlink(missing_ok=True)
            assert await watcher.refresh() is False
            health = only(watcher)
            assert not health.ok
            assert health.last_error == "no such file"
            assert health.entries == 1
            assert refusal(watcher.snapshot, fleet.serials["d1"], "d1") == "on-hold"
        finally:
            await watcher.stop()

    caplog.set_level(logging.INFO, LOGGER)
    asyncio.run(scenario())
    assert warnings_of(caplog) == [
        f"revocation source registry ({fleet.registry}) cannot be used: no such file; "
        "keeping its last good list of 1 entries"]


# -- CRL file ----------------------------------------------------------------------------------


def test_crl_file_revocation_and_hold_are_reflected(fleet: Fleet) -> None:
    """A revoke and a suspend rewrite crl.pem; the CRL-file source picks both up, with the
    device table and password hashes left empty (a CRL knows only serials)."""
    d1, d2 = fleet.serials["d1"], fleet.serials["d2"]

    async def scenario() -> None:
        watcher = watcher_for(fleet, crl_file=fleet.crl)
        await watcher.start()
        try:
            assert dict(watcher.snapshot.revoked) == {}
            with fleet.authority() as auth:
                auth.revoke("d1", None, "keyCompromise")
                auth.suspend("d2")
            assert await watcher.refresh() is True
            snap = watcher.snapshot
            assert dict(snap.revoked) == {d1: "revoked", d2: "on-hold"}
            assert dict(snap.devices) == {}
            assert dict(snap.password_hashes) == {}
            health = only(watcher)
            assert (health.name, health.ok, health.stale, health.entries) == (
                "crl-file", True, False, 2)
            assert health.next_update is not None
            assert health.next_update > time.time()
            assert await watcher.refresh() is False  # same file: not even re-read
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_a_der_crl_file_is_accepted(fleet: Fleet, tmp_path: Path) -> None:
    """A CRL in DER is read as well as one in PEM."""
    ca = fleet.issuing_ca()
    path = tmp_path / "crl.der"
    path.write_bytes(der(make_crl(ca.key, ca.cert.subject, 9, [(77, KEY_COMPROMISE)])))

    async def scenario() -> Snapshot:
        watcher = watcher_for(fleet, crl_file=path)
        await watcher.start()
        await watcher.stop()
        return watcher.snapshot

    assert dict(asyncio.run(scenario()).revoked) == {77: "revoked"}


def test_sources_are_united(fleet: Fleet, tmp_path: Path) -> None:
    """The snapshot is the union: a serial listed by either source is refused, and 'revoked'
    in either source outranks 'on-hold' in the other, whichever comes first."""
    with fleet.authority() as auth:
        auth.revoke("d1", None, "keyCompromise")
        auth.suspend("d2")
    ca = fleet.issuing_ca()
    d1, d2 = fleet.serials["d1"], fleet.serials["d2"]
    extra = tmp_path / "other.pem"
    extra.write_bytes(pem(make_crl(ca.key, ca.cert.subject, 50,
                                   [(d1, HOLD), (d2, KEY_COMPROMISE), (4242, HOLD)])))

    async def scenario() -> Snapshot:
        watcher = watcher_for(fleet, registry=True, crl_file=extra)
        await watcher.start()
        await watcher.stop()
        assert [h.name for h in watcher.health()] == ["registry", "crl-file"]
        return watcher.snapshot

    snap = asyncio.run(scenario())
    assert dict(snap.revoked) == {d1: "revoked", d2: "revoked", 4242: "on-hold"}
    assert dict(snap.devices) == {"d1": "revoked", "d2": "suspended"}


@pytest.mark.parametrize("signer", ["foreign-key-same-name", "foreign-ca"])
def test_a_crl_not_signed_by_a_client_ca_is_refused_and_the_last_good_kept(
        fleet: Fleet, signer: str, caplog: pytest.LogCaptureFixture) -> None:
    """A CRL whose signature does not verify against the client_ca certificate of its issuer
    (or whose issuer is no client_ca CA) is refused: the last good list stays, ok=False, and
    the warning is logged once however many refreshes see it."""
    caplog.set_level(logging.INFO, LOGGER)
    d1 = fleet.serials["d1"]
    ca = fleet.issuing_ca()
    name = ca.cert.subject if signer == "foreign-key-same-name" else x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "Rogue CA")])
    forged = make_crl(ec.generate_private_key(ec.SECP256R1()), name, 1000,
                      [(fleet.serials["d2"], KEY_COMPROMISE)])

    async def scenario() -> None:
        with fleet.authority() as auth:
            auth.revoke("d1", None, "keyCompromise")
        watcher = watcher_for(fleet, crl_file=fleet.crl)
        await watcher.start()
        try:
            fleet.crl.write_bytes(pem(forged))
            assert await watcher.refresh() is False
            assert await watcher.refresh() is False
            assert dict(watcher.snapshot.revoked) == {d1: "revoked"}
            health = only(watcher)
            assert not health.ok
            assert not watcher.healthy
            assert health.last_error is not None
            assert ("signature does not verify" if signer == "foreign-key-same-name"
                    else "is not a CA of the client_ca bundle") in health.last_error
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert len(warnings_of(caplog)) == 1


def test_a_crl_rollback_is_refused(fleet: Fleet) -> None:
    """A genuine but older CRL (lower CRL number) put back in place is refused as a rollback;
    the newer list stays in force."""
    old = fleet.crl.read_bytes()
    d1 = fleet.serials["d1"]

    async def scenario() -> None:
        watcher = watcher_for(fleet, crl_file=fleet.crl)
        await watcher.start()
        try:
            with fleet.authority() as auth:
                auth.revoke("d1", None, "keyCompromise")
            assert await watcher.refresh() is True
            fleet.crl.write_bytes(old)
            assert await watcher.refresh() is False
            assert dict(watcher.snapshot.revoked) == {d1: "revoked"}
            health = only(watcher)
            assert not health.ok
            assert health.last_error is not None
            assert "refusing a rollback" in health.last_error
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_a_stale_crl_is_used_and_flagged(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """A first CRL that arrives past its nextUpdate still refuses its serials (better than
    nothing), but its source is stale, the watcher unhealthy, and a warning says so once. A good
    CRL with a lower number after it is no rollback: both are enforced."""
    caplog.set_level(logging.INFO, LOGGER)
    ca = fleet.issuing_ca()
    good = fleet.crl.read_bytes()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    fleet.crl.write_bytes(pem(make_crl(ca.key, ca.cert.subject, fleet.crl_number() + 1,
                                       [(fleet.serials["d3"], HOLD)], next_update=past)))

    async def scenario() -> None:
        watcher = watcher_for(fleet, crl_file=fleet.crl)
        await watcher.start()
        try:
            await watcher.refresh()
            assert refusal(watcher.snapshot, fleet.serials["d3"], "d3") == "on-hold"
            health = only(watcher)
            assert health.ok
            assert health.stale
            assert health.next_update == pytest.approx(past.timestamp(), abs=1)
            assert health.warning is not None
            assert "no earlier good CRL" in health.warning
            assert not watcher.healthy
            fleet.crl.write_bytes(good)
            await watcher.refresh()
            health = only(watcher)
            assert (health.ok, health.stale) == (True, True)
            assert refusal(watcher.snapshot, fleet.serials["d3"], "d3") == "on-hold"
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    first, second = warnings_of(caplog)
    assert "arrived already past its nextUpdate" in first
    assert "still using its list of 1 entries" in first
    assert "enforced together with CRL number" in second


def test_a_deleted_or_garbage_crl_file_keeps_the_last_good_list(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """Deleting crl.pem or filling it with garbage keeps the last good list with ok=False
    (one warning per new error); a good CRL again makes the source ok and says so."""
    caplog.set_level(logging.INFO, LOGGER)
    d1 = fleet.serials["d1"]

    async def scenario() -> None:
        with fleet.authority() as auth:
            auth.revoke("d1", None, "keyCompromise")
        good = fleet.crl.read_bytes()
        watcher = watcher_for(fleet, crl_file=fleet.crl)
        await watcher.start()
        try:
            fleet.crl.unlink()
            assert await watcher.refresh() is False
            assert only(watcher).last_error == "no such file"
            fleet.crl.write_bytes(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
            assert await watcher.refresh() is False
            health = only(watcher)
            assert not health.ok
            assert health.last_error is not None
            assert health.last_error.startswith("not a valid CRL")
            assert dict(watcher.snapshot.revoked) == {d1: "revoked"}
            fleet.crl.write_bytes(good)
            assert await watcher.refresh() is False  # the same list again: no content change
            assert only(watcher).ok
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert len(warnings_of(caplog)) == 2
    assert any("is ok again" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)


# -- CRL URL -----------------------------------------------------------------------------------


def test_url_source_fetches_revalidates_and_survives_the_server_going_down(fleet: Fleet) -> None:
    """The URL source loads the CRL, revalidates it with a conditional GET (304 Not Modified:
    no change), takes a new CRL, keeps its last good list through an HTTP error and a dead
    server, and recovers when the server answers again."""
    d1 = fleet.serials["d1"]

    async def scenario() -> None:
        server = await CrlServer(fleet.crl.read_bytes()).start()
        watcher = watcher_for(fleet, crl_url=server.url)
        await watcher.start()
        try:
            assert server.requests == 1
            assert await watcher.refresh() is False
            assert server.not_modified == 1
            assert only(watcher).ok

            with fleet.authority() as auth:
                auth.revoke("d1", None, "keyCompromise")
            server.body = der(x509.load_pem_x509_crl(fleet.crl.read_bytes()))
            assert await watcher.refresh() is True
            assert dict(watcher.snapshot.revoked) == {d1: "revoked"}

            server.status = 503
            assert await watcher.refresh() is False
            health = only(watcher)
            assert (health.name, health.ok) == ("crl-url", False)
            assert health.last_error is not None
            assert health.last_error.startswith("HTTP 503")
            server.status = None
            assert await watcher.refresh() is False
            assert only(watcher).ok

            await server.stop()
            assert await watcher.refresh() is False
            health = only(watcher)
            assert not health.ok
            assert health.last_error is not None
            assert health.last_error.startswith("cannot fetch the CRL")
            assert dict(watcher.snapshot.revoked) == {d1: "revoked"}
        finally:
            await watcher.stop()
            await server.stop()

    asyncio.run(scenario())


def test_https_url_is_verified_against_the_client_ca_bundle(fleet: Fleet, tmp_path: Path) -> None:
    """An https CRL server whose certificate the fleet CA issued is trusted through the
    client_ca bundle; one from another CA fails TLS verification and nothing loads."""
    with fleet.authority() as auth:
        cert, key = auth.server_cert("localhost", ["127.0.0.1"], tmp_path / "srv")
    ours = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ours.load_cert_chain(cert, key)
    theirs = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(theirs)

    async def scenario() -> None:
        good = await CrlServer(fleet.crl.read_bytes(), ours).start()
        bad = await CrlServer(fleet.crl.read_bytes(), theirs).start()
        try:
            watcher = watcher_for(fleet, crl_url=good.url)
            await watcher.start()
            assert only(watcher).ok
            await watcher.stop()
            watcher = watcher_for(fleet, crl_url=bad.url)
            with pytest.raises(RevocationError, match="certificate verify failed"):
                await watcher.start()
        finally:
            await good.stop()
            await bad.stop()

    asyncio.run(scenario())


def test_start_survives_one_dead_source_and_reports_it(fleet: Fleet) -> None:
    """With the registry readable and the CRL URL dead, start() succeeds on the registry and
    the URL source shows ok=False with its error: the hub is up but unhealthy."""

    async def scenario() -> None:
        server = await CrlServer(b"").start()
        url = server.url
        await server.stop()  # nothing listens on that port any more
        watcher = watcher_for(fleet, registry=True, crl_url=url)
        await watcher.start()
        try:
            registry, crl_url = watcher.health()
            assert registry.ok
            assert (crl_url.name, crl_url.ok, crl_url.last_success) == ("crl-url", False, None)
            assert not watcher.healthy
        finally:
            await watcher.stop()

    asyncio.run(scenario())


# -- start, on_change and the refresh loop -----------------------------------------------------


def test_start_with_no_loadable_source_raises_one_line(fleet: Fleet, tmp_path: Path) -> None:
    """When no source can be loaded, start() raises a RevocationError (a HubError) whose
    message is one line naming every source and its problem."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\x01 not a CRL\n\n")
    config = RevocationConfig(registry=tmp_path / "missing.db", crl_file=garbage)
    watcher = RevocationWatcher(config, load_ca_bundle(fleet.chain))
    with pytest.raises(RevocationError) as caught:
        asyncio.run(watcher.start())
    message = str(caught.value)
    assert isinstance(caught.value, HubError)
    assert "\n" not in message
    assert message.startswith("no revocation source could be loaded: ")
    assert f"registry {tmp_path / 'missing.db'}: no such file" in message
    assert f"crl-file {garbage}: not a valid CRL" in message


def test_start_with_no_source_configured_raises() -> None:
    """A watcher with no source at all refuses to start rather than allow everyone."""
    with pytest.raises(RevocationError, match="no revocation source configured"):
        asyncio.run(RevocationWatcher(RevocationConfig(), []).start())


def test_on_change_gets_old_and_new_only_when_content_changes(fleet: Fleet) -> None:
    """on_change is called with (old, new) on each content change, never for a refresh that
    changed nothing, and a failing callback does not stop the new list taking effect."""
    calls: list[tuple[Snapshot, Snapshot]] = []

    def on_change(old: Snapshot, new: Snapshot) -> None:
        calls.append((old, new))
        raise RuntimeError("a buggy integrator")

    async def scenario() -> None:
        watcher = watcher_for(fleet, registry=True, on_change=on_change)
        await watcher.start()
        try:
            assert await watcher.refresh() is False
            with fleet.authority() as auth:
                auth.revoke("d1", None, "keyCompromise")
            assert await watcher.refresh() is True
            assert await watcher.refresh() is False
        finally:
            await watcher.stop()
        [(old, new)] = calls
        assert fleet.serials["d1"] not in old.revoked
        assert new.revoked[fleet.serials["d1"]] == "revoked"
        assert new.version == old.version + 1
        assert watcher.snapshot is new

    asyncio.run(scenario())


def test_the_refresh_loop_picks_up_a_revocation_within_refresh_seconds(fleet: Fleet) -> None:
    """The watcher's own loop applies a revocation within refresh_seconds, without refresh()."""
    refresh = 0.2

    async def scenario() -> float:
        changed = asyncio.Event()
        watcher = watcher_for(fleet, registry=True, crl_file=fleet.crl, refresh=refresh,
                              on_change=lambda _old, _new: changed.set())
        await watcher.start()
        try:
            await asyncio.to_thread(_revoke, fleet, "d2")
            began = time.monotonic()
            await asyncio.wait_for(changed.wait(), timeout=5)
            assert refusal(watcher.snapshot, fleet.serials["d2"], "d2") == "revoked"
            return time.monotonic() - began
        finally:
            await watcher.stop()

    assert asyncio.run(scenario()) < refresh + 0.3


def _revoke(fleet: Fleet, device_id: str) -> None:
    with fleet.authority() as auth:
        auth.revoke(device_id, None, "keyCompromise")


# -- the CA bundle -----------------------------------------------------------------------------


def test_load_ca_bundle_reads_every_certificate_and_refuses_nonsense(
        fleet: Fleet, tmp_path: Path) -> None:
    """load_ca_bundle returns the issuing and root CAs of ca-chain.pem; a missing file or one
    with no PEM certificate is a one-line RevocationError naming the file."""
    assert [c.subject for c in load_ca_bundle(fleet.chain)] == [
        fleet.issuing_ca().cert.subject,
        x509.load_pem_x509_certificate((fleet.root / "root-ca.pem").read_bytes()).subject]
    with pytest.raises(RevocationError, match="cannot read the CA bundle"):
        load_ca_bundle(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(RevocationError, match="holds no PEM certificate"):
        load_ca_bundle(junk)


# -- issue 11: CRLs stale on arrival, a registry overwritten --------------------------------------


def _stale_crl(fleet: Fleet, number: int, revoked: list[tuple[int, x509.ReasonFlags]]) -> bytes:
    """A genuine CRL from the fleet's CA whose nextUpdate is an hour gone (a slow CA clock)."""
    ca = fleet.issuing_ca()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    return pem(make_crl(ca.key, ca.cert.subject, number, revoked, next_update=past))


def test_a_crl_stale_on_arrival_is_united_with_the_last_good_list(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """A higher-numbered CRL already past its nextUpdate does not replace the last good list:
    both lists are enforced (d1 from the good one, d2 from the stale one), the source is stale
    and says why, and the good CRL put back is no rollback (the union stays). The CA's next
    fresh CRL supersedes both and the source is healthy again."""
    caplog.set_level(logging.INFO, LOGGER)
    d1, d2, d3 = (fleet.serials[d] for d in ("d1", "d2", "d3"))
    states: list[tuple[str, SourceState, str | None]] = []

    async def scenario() -> None:
        with fleet.authority() as auth:
            auth.revoke("d1", None, "keyCompromise")
        good = fleet.crl.read_bytes()
        watcher = watcher_for(fleet, crl_file=fleet.crl, states=states)
        await watcher.start()
        try:
            assert dict(watcher.snapshot.revoked) == {d1: "revoked"}
            # The shorter list lacks d1: taking it in place of the good one re-admits d1.
            fleet.crl.write_bytes(_stale_crl(fleet, fleet.crl_number() + 1,
                                             [(d2, KEY_COMPROMISE)]))
            assert await watcher.refresh() is True
            assert dict(watcher.snapshot.revoked) == {d1: "revoked", d2: "revoked"}
            health = only(watcher)
            assert (health.ok, health.stale) == (True, True)
            assert not watcher.healthy
            fleet.crl.write_bytes(good)
            assert await watcher.refresh() is False  # accepted, and the union is unchanged
            health = only(watcher)
            assert (health.ok, health.last_error, health.stale) == (True, None, True)
            assert dict(watcher.snapshot.revoked) == {d1: "revoked", d2: "revoked"}
            with fleet.authority() as auth:  # the CA, its clock mended, publishes again
                auth.revoke("d3", None, "keyCompromise")
            assert await watcher.refresh() is True
            assert dict(watcher.snapshot.revoked) == {d1: "revoked", d3: "revoked"}
            health = only(watcher)
            assert (health.ok, health.stale) == (True, False)
            assert watcher.healthy
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    [warning] = [w for w in warnings_of(caplog) if "nextUpdate" in w]
    assert "arrived already past its nextUpdate" in warning
    assert "enforced together with CRL number" in warning
    assert [(name, state) for name, state, _ in states] == [
        ("crl-file", SourceState.STALE), ("crl-file", SourceState.UP)]
    assert states[0][2] is not None
    assert states[0][2] in warning


@pytest.mark.parametrize("damage", ["garbage-in-place", "garbage-new-inode", "truncated"])
def test_a_damaged_registry_is_down_and_its_last_good_list_kept(
        fleet: Fleet, tmp_path: Path, damage: str) -> None:
    """A registry overwritten with garbage (same inode or a new one) or truncated is reported
    down with a reason, its last good list stays in force, and a restore makes it ok again."""
    backup = tmp_path / "backup.db"
    states: list[tuple[str, SourceState, str | None]] = []

    async def scenario() -> None:
        with fleet.authority() as auth:
            auth.suspend("d1")
        with Registry(fleet.registry) as registry:
            registry.conn.execute("VACUUM INTO ?", (str(backup),))
        watcher = watcher_for(fleet, registry=True, states=states)
        await watcher.start()
        try:
            assert only(watcher).ok
            size = fleet.registry.stat().st_size
            if damage == "garbage-in-place":
                with fleet.registry.open("r+b") as file:
                    file.write(b"\xa5" * size)
            elif damage == "garbage-new-inode":
                junk = tmp_path / "junk.db"
                junk.write_bytes(b"\x5a" * size)
                junk.replace(fleet.registry)
            else:
                with fleet.registry.open("r+b") as file:
                    file.truncate(0)
            assert await watcher.refresh() is False
            health = only(watcher)
            assert not health.ok, health
            assert health.last_error is not None
            assert not watcher.healthy
            assert refusal(watcher.snapshot, fleet.serials["d1"], "d1") == "on-hold"
            assert await watcher.refresh() is False  # still down, still the last good list
            assert not only(watcher).ok
            backup.replace(fleet.registry)
            for suffix in ("-wal", "-shm"):
                Path(f"{fleet.registry}{suffix}").unlink(missing_ok=True)
            await watcher.refresh()
            assert only(watcher).ok
            assert watcher.healthy
            assert refusal(watcher.snapshot, fleet.serials["d1"], "d1") == "on-hold"
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    (_, down, why), (_, up, none) = states  # one record per change, however many refreshes
    assert (down, up, none) == (SourceState.DOWN, SourceState.UP, None)
    assert why is not None
    assert why.startswith("the registry is truncated" if damage == "truncated"
                          else "the registry is not an SQLite database")


# -- the RevocationSource seam (issue 12): in-memory sources, no I/O, no sleeping ---------------


def test_a_memory_source_drives_the_watcher_like_a_real_one(
        caplog: pytest.LogCaptureFixture) -> None:
    """MemorySource: what set() gives is what the next refresh() publishes (on_change gets old
    and new); a failure keeps the last list and is told once as down, set() brings it up; a
    next_update gone by is used and told as stale. All without a file, a thread or a sleep."""
    caplog.set_level(logging.INFO, LOGGER)
    source = MemorySource("registry", local=False)  # the loop's ticks: refresh_seconds
    changes: list[tuple[Snapshot, Snapshot]] = []
    states: list[tuple[str, SourceState, str | None]] = []

    async def scenario() -> None:
        watcher = RevocationWatcher.over(
            [source], refresh_seconds=3600, on_change=lambda old, new: changes.append((old, new)),
            on_source=lambda name, state, why: states.append((name, state, why)))
        await watcher.start()
        try:
            assert (watcher.snapshot.version, watcher.healthy) == (0, True)  # loaded, empty
            source.set(revoked={7: "revoked"}, devices={"d2": "suspended"},
                       groups={"op": "operators"})
            assert await watcher.refresh() is True
            [(old, new)] = changes
            assert (old.version, new.version) == (0, 1)
            assert refusal(new, 7, "d1") == "revoked"
            assert refusal(new, 8, "d2") == "device-suspended"
            assert dict(new.groups) == {"op": "operators"}
            source.fail("the registry is gone")
            assert await watcher.refresh() is False
            assert await watcher.refresh() is False
            health = only(watcher)
            assert (health.ok, health.last_error, health.entries) == (
                False, "the registry is gone", 1)
            assert refusal(watcher.snapshot, 7, "d1") == "revoked"
            source.set(revoked={7: "on-hold"}, next_update=time.time() - 60)
            assert await watcher.refresh() is True
            health = only(watcher)
            assert (health.ok, health.stale) == (True, True)
            assert health.warning is not None
            assert health.warning.startswith("past its nextUpdate ")
            assert refusal(watcher.snapshot, 7, "d1") == "on-hold"
            assert source.polls == 5  # start and four refresh() calls: the loop never ran
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert [(name, state) for name, state, _ in states] == [
        ("registry", SourceState.DOWN), ("registry", SourceState.STALE)]
    assert states[0][2] == "the registry is gone"
    assert warnings_of(caplog)[0] == ("revocation source registry (memory:registry) cannot be "
                                      "used: the registry is gone; keeping its last good list "
                                      "of 1 entries")


def test_memory_sources_are_united_and_the_fast_loop_polls_only_local_ones() -> None:
    """Two sources unite as the real ones do (revoked outranks on-hold); with start()'s loop,
    a local source is looked at every FAST_POLL_SECONDS, one that is not only every
    refresh_seconds."""
    local, remote = MemorySource("registry"), MemorySource("crl-url", local=False)

    async def scenario() -> None:
        changed = asyncio.Event()
        watcher = RevocationWatcher.over([local, remote], refresh_seconds=30,
                                         on_change=lambda _old, _new: changed.set())
        await watcher.start()
        try:
            local.set(revoked={1: "on-hold", 2: "on-hold"})
            await asyncio.wait_for(changed.wait(), timeout=5)
            assert dict(watcher.snapshot.revoked) == {1: "on-hold", 2: "on-hold"}
            remote.set(revoked={2: "revoked"})
            assert await watcher.refresh() is True
            assert dict(watcher.snapshot.revoked) == {1: "on-hold", 2: "revoked"}
        finally:
            await watcher.stop()
        assert local.polls > remote.polls == 2  # start, refresh: the loop never reached it

    asyncio.run(scenario())


class _Minimal:
    """A source written against the RevocationSource protocol alone, not PolledSource."""

    name, where, local = "feed", "test:feed", True
    last_error: str | None = None

    def __init__(self) -> None:
        self.on_state: SourceCallback | None = None
        self.data: SourceData | None = None
        self.closed = False

    async def poll(self, budget: float | None) -> bool:
        if self.data is None:
            self.data = SourceData({5: "revoked"}, {"d9": "revoked"})
            return True
        return False

    def health(self, now: float) -> SourceHealth:
        return SourceHealth(self.name, self.data is not None, False, now, None,
                            len(self.data.revoked) if self.data else 0, None)

    async def close(self) -> None:
        self.closed = True


def test_the_watcher_needs_only_the_revocation_source_protocol() -> None:
    """Any object with the protocol's members is a source: the watcher loads it, publishes
    its data, reports its health and closes it."""
    source = _Minimal()
    typed: RevocationSource = source  # mypy checks the protocol here

    async def scenario() -> RevocationWatcher:
        watcher = RevocationWatcher.over([typed])
        await watcher.start()
        await watcher.stop()
        return watcher

    watcher = asyncio.run(scenario())
    assert refusal(watcher.snapshot, 5, "x") == "revoked"
    assert refusal(watcher.snapshot, 6, "d9") == "device-revoked"
    assert [h.name for h in watcher.health()] == ["feed"]
    assert source.closed


def test_the_hub_imports_from_provisioning_only_identity_serial_and_the_view() -> None:
    """The import rule (STYLE.md): hub/ reads the registry through provisioning.registry.view
    and the feed through provisioning.registry.feeddoc (both stdlib-only) and takes only the
    pure identity and serial conventions besides; no SQL of its own on the CA's tables (its
    audit store is its own database)."""
    allowed = {"provisioning.identity", "provisioning.serial", "provisioning.registry.view",
               "provisioning.registry.feeddoc"}
    hub = Path(__file__).resolve().parents[2] / "hub"
    found: dict[str, set[str]] = {}
    for file in hub.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] == "provisioning":
                    found.setdefault(name, set()).add(file.relative_to(hub).as_posix())
    assert set(found) <= allowed, {name: found[name] for name in set(found) - allowed}
    registry_readers = [file.relative_to(hub).as_posix() for file in hub.rglob("*.py")
                        if "FROM certificates" in file.read_text(encoding="utf-8")
                        or "FROM devices" in file.read_text(encoding="utf-8")]
    assert registry_readers == []
