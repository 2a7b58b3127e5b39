"""The feed's follower on a real registry: the version moves only when what a gateway
decides with changes (to the audit event id of that change), a waiting long-poll wakes as
soon as the follower reads the change, and reads that keep failing stop the CA vouching for
its last state. It follows incrementally: a device action reads that device's rows only, a
request record reads nothing more, an unknown action reads everything; after any mix of CA
actions the state equals a full read, and the periodic full read catches a state that went
wrong (a row changed with no audit event)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import pytest

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.feed.follower import Follower, head_id
from provisioning.issuer import SignOptions
from provisioning.registry.feeddoc import FeedState, state_from_view
from provisioning.registry.view import FleetView, FleetViewError, ReadStatistics
from provisioning.timefmt import iso, utcnow
from tests.provisioning.csrs import make_csr, make_key


def _follow(authority: Authority, test: Callable[[Follower], Awaitable[None]], **options: float,
            ) -> None:
    async def main() -> None:
        follower = Follower(FleetView(authority.paths.registry), "fleet.test", **options)
        await follower.start()
        try:
            await test(follower)
        finally:
            await follower.close()
    asyncio.run(main())


def _issue(authority: Authority, device_id: str, *, renew: bool = False,
           group: str | None = None) -> None:
    [made] = authority.issuer().sign(
        [CSRInput(f"{device_id}.csr", make_csr(cn=device_id, key=make_key()))],
        SignOptions(renew=renew, group=group))
    assert made.status == "issued", made.reason


def _audit(authority: Authority, action: str, device_id: str | None = None) -> None:
    """One audit event with nothing else written (as the service records a request)."""
    with authority.registry.write("test") as tx:
        tx.audit(iso(utcnow()), action, device_id, None, {"path": "/test"})


def _counts(reads: ReadStatistics) -> tuple[int, int]:
    return reads.devices, reads.full


def _whole(authority: Authority, version: int) -> FeedState:
    with FleetView(authority.paths.registry) as view:
        _, read = view.read(certificates=True)
    assert read is not None
    return state_from_view(read, version, "fleet.test")


def _same(state: FeedState, whole: FeedState) -> None:
    assert dict(state.devices) == dict(whole.devices)
    assert dict(state.revoked) == dict(whole.revoked)
    for device_id, device in whole.devices.items():  # the documents list serials alike
        assert list(state.devices[device_id].certificates) == list(device.certificates)


def test_the_version_moves_only_when_the_state_changes(authority: Authority) -> None:
    """A token (an audited CA action that lists nothing) leaves the version; a new device's
    certificate moves it to the head's event id, with the change set in the history."""
    async def test(follower: Follower) -> None:
        first = follower.state.version
        assert first >= 1
        authority.create_token("line1")
        await follower.sync()
        assert follower.state.version == first
        _issue(authority, "dev-1")
        await follower.sync()
        with FleetView(authority.paths.registry) as view:
            assert follower.state.version == head_id(view.position()) > first
        moved = follower.since(first)
        assert moved is not None
        assert set(moved.devices) == {"dev-1"}
        assert follower.since(first - 1) is None  # never a version of this follower
        assert follower.since(follower.state.version) == type(moved)()

    _follow(authority, test)


def test_a_waiting_long_poll_wakes_on_the_next_read(authority: Authority) -> None:
    """wait_change returns once the background poll read a suspension, long before its
    timeout; stop_waiting releases every waiter at once."""
    _issue(authority, "dev-2")

    async def test(follower: Follower) -> None:
        version = follower.state.version
        waiter = asyncio.create_task(follower.wait_change(version, 60))
        await asyncio.sleep(0)  # the waiter is now waiting on the version
        authority.suspend("dev-2")
        await asyncio.wait_for(waiter, 10)
        assert follower.state.devices["dev-2"].status == "suspended"
        current = follower.state.version
        assert current > version
        held = asyncio.create_task(follower.wait_change(current, 60))
        await asyncio.sleep(0)
        follower.stop_waiting()
        await asyncio.wait_for(held, 10)
        assert follower.state.version == current

    _follow(authority, test, interval=0.005)


def test_failing_reads_stop_the_ca_vouching(authority: Authority,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A registry that cannot be read keeps the last state, is logged once, and after
    stale_seconds the follower names the trouble (the route then answers 503)."""
    async def test(follower: Follower) -> None:
        state = follower.state
        follower.view.close()
        with caplog.at_level(logging.WARNING, "provisioning.feed"):
            for _ in range(3):
                with pytest.raises(FleetViewError):
                    await follower.sync()
        assert follower.state is state
        assert follower.trouble() is not None
        assert len([r for r in caplog.records if "cannot read" in r.message]) == 1

    _follow(authority, test, interval=60, stale_seconds=0)


def test_a_device_action_reads_that_device_only(authority: Authority) -> None:
    """A suspension reads the one device it names (no full read) and lands in the state
    and the history as the device's whole new entry and its held serial."""
    _issue(authority, "dev-a")
    _issue(authority, "dev-b")

    async def test(follower: Follower) -> None:
        before, version = _counts(follower.view.statistics()), follower.state.version
        authority.suspend("dev-a")
        await follower.sync()
        assert _counts(follower.view.statistics()) == (before[0] + 1, before[1])
        assert follower.state.devices["dev-a"].status == "suspended"
        assert follower.state.devices["dev-b"].status == "active"
        moved = follower.since(version)
        assert moved is not None
        assert set(moved.devices) == {"dev-a"}
        assert [r.status for r in moved.revoked.values()] == ["on_hold"]
        _same(follower.state, _whole(authority, follower.state.version))

    _follow(authority, test, interval=3600)


def test_request_records_read_nothing_more(authority: Authority) -> None:
    """EST requests, feed fetches, tokens and CRLs are audited but list nothing: the events
    are read, no device's rows nor the whole state, and the version stays."""
    _issue(authority, "dev-a")

    async def test(follower: Follower) -> None:
        reads = follower.view.statistics()
        before, version = _counts(reads), follower.state.version
        for action in ("est.enroll", "feed.fetch", "http.request", "ocsp.query"):
            _audit(authority, action, "dev-a" if action == "est.enroll" else None)
        authority.create_token("line-1")
        authority.publish_crl()
        await follower.sync()
        after = follower.view.statistics()
        assert _counts(after) == before
        assert after.events == reads.events + 6
        assert follower.state.version == version

    _follow(authority, test, interval=3600)


def test_an_unknown_action_reads_everything(authority: Authority) -> None:
    """An action the view does not know, or a device action naming no device, is followed
    by a full read: whatever it changed is then in the state."""
    _issue(authority, "dev-a")

    async def test(follower: Follower) -> None:
        for action, device_id in (("fleet.experiment", "dev-a"), ("device.group", None)):
            full = follower.view.statistics().full
            _audit(authority, action, device_id)
            await follower.sync()
            assert follower.view.statistics().full == full + 1
        _same(follower.state, _whole(authority, follower.state.version))

    _follow(authority, test, interval=3600)


def test_the_followed_state_equals_a_full_read_after_any_mix(authority: Authority) -> None:
    """A seeded random mix of issue, renew (supersede), revoke (device or one serial),
    suspend, resume, group and password set/clear, with syncs in between: the state
    patched event by event equals a full read each time, and nothing was read whole."""
    rng = random.Random(13)
    devices = [f"mix-{i}" for i in range(8)]
    for device_id in devices[:4]:
        _issue(authority, device_id, group="g0")

    def revoke_one(device_id: str) -> None:
        with FleetView(authority.paths.registry) as view:
            _, read = view.read(certificates=True)
        assert read is not None
        assert read.certificates is not None
        serials = list(read.certificates.get(device_id, {}))
        if serials:
            authority.revoke(device_id, f"{rng.choice(serials):x}", "superseded")

    def act(step: int) -> None:
        device_id = rng.choice(devices)
        status = authority.registry.device(device_id)
        if status is None:
            _issue(authority, device_id, group=rng.choice([None, "g1"]))
            return
        if status.status == "revoked":
            return  # nothing more happens to a revoked device
        actions: dict[str, Callable[[], object]] = {
            "renew": lambda: status.status == "active" and _issue(authority, device_id,
                                                                  renew=True),
            "revoke": lambda: authority.revoke(device_id, None, "keyCompromise"),
            "revoke-serial": lambda: revoke_one(device_id),
            "suspend": lambda: authority.suspend(device_id),
            "resume": lambda: authority.resume(device_id),
            "group": lambda: authority.set_group([device_id], f"g{step % 3}"),
            "password": lambda: authority.set_password(device_id, f"pw-{step}"),
            "clear": lambda: authority.set_password(device_id, None),
        }
        kind = rng.choice(sorted(actions))
        if status.status == "suspended" and rng.random() < 0.5:
            kind = "resume"
        actions[kind]()

    async def test(follower: Follower) -> None:
        full = follower.view.statistics().full
        for step in range(80):
            act(step)
            if rng.random() < 0.5:
                await follower.sync()
                _same(follower.state, _whole(authority, follower.state.version))
        await follower.sync()
        _same(follower.state, _whole(authority, follower.state.version))
        reads = follower.view.statistics()
        assert reads.full == full
        assert set(reads.by_action) >= {
            "device.create", "certificate.issue", "certificate.supersede", "certificate.revoke",
            "device.revoke", "device.suspend", "device.resume", "device.group",
            "device.password.set", "device.password.clear"}

    _follow(authority, test, interval=3600)


def test_the_safety_net_takes_the_whole_state_when_they_differ(
        authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    """A group changed with raw SQL (no audit event) is invisible event by event; the next
    periodic full read finds it, logs one WARNING, takes the whole state and moves the
    version, with the difference in the history."""
    _issue(authority, "dev-a")

    async def test(follower: Follower) -> None:
        version = follower.state.version
        for n, group in enumerate(("smuggled", "again")):
            with authority.registry.write("test") as tx:
                tx.execute('UPDATE devices SET "group" = ? WHERE device_id = ?',
                           (group, "dev-a"))
            authority.create_token(f"move-the-head-{n}")
            with caplog.at_level(logging.WARNING, "provisioning.feed"):
                await follower.sync()
            assert follower.state.devices["dev-a"].group == group
        assert follower.state.version > version
        moved = follower.since(version)
        assert moved is not None
        assert set(moved.devices) == {"dev-a"}
        assert len([r for r in caplog.records if "differs" in r.message]) == 1

    _follow(authority, test, interval=3600, check_seconds=0)


def test_new_issuers_move_the_version_and_are_told_once(authority: Authority) -> None:
    """The issuers are asked when the head moved: unchanged, a quiet action leaves the
    version; changed (a rotation rewrote ca-chain.pem before its event committed), the same
    kind of action moves it, wakes a long-poll, and on_issuers hears the new list once."""
    current: list[tuple[bytes, ...]] = [(b"\x30\x01",)]
    told: list[tuple[bytes, ...]] = []

    async def main() -> None:
        follower = Follower(FleetView(authority.paths.registry), "fleet.test",
                            issuers=lambda: current[0], on_issuers=told.append)
        await follower.start()
        try:
            first = follower.state.version
            assert follower.state.issuers == (b"\x30\x01",)
            _audit(authority, "issuing-ca.retire")
            await follower.sync()
            assert follower.state.version == first
            current[0] = (b"\x30\x02", b"\x30\x01")
            waiting = asyncio.ensure_future(follower.wait_change(first, 30))
            _audit(authority, "issuing-ca.rotate")
            await follower.sync()
            await asyncio.wait_for(waiting, 5)
            assert follower.state.version > first
            assert follower.state.issuers == (b"\x30\x02", b"\x30\x01")
            assert follower.since(first) is not None  # a delta (of no device) from before
            assert told == [(b"\x30\x02", b"\x30\x01")]
        finally:
            await follower.close()
    asyncio.run(main())
