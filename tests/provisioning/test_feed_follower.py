"""The feed's follower on a real registry: the version moves only when what a gateway
decides with changes (to the audit event id of that change), a waiting long-poll wakes as
soon as the follower reads the change, and reads that keep failing stop the CA vouching for
its last state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.feed.follower import Follower, head_id
from provisioning.issuer import SignOptions
from provisioning.registry.view import FleetView, FleetViewError
from tests.provisioning.csrs import make_csr


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


def _issue(authority: Authority, device_id: str) -> None:
    [made] = authority.issuer().sign([CSRInput(f"{device_id}.csr", make_csr(cn=device_id))],
                                     SignOptions())
    assert made.status == "issued"


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
