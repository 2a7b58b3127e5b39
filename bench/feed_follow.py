"""The CA's feed follower: its CPU per audited action on a large registry.

The follower (``provisioning/feed/follower.py``) notices every CA action through the
registry's audit head; this measures what one action then costs it, with ``--devices``
devices in the registry (each with a valid certificate, one in ten in a group, one in fifty
revoked). The rows are written straight into a fresh PKI's registry with SQL (signing
100,000 certificates would take minutes and measure nothing of the follower); every action
measured is a real CA action with its audit event:

- ``harmless``: an audited request that changes nothing listed (a ``feed.fetch`` event, as
  the service writes one per new version a gateway gets; every EST request is the same)
- ``device``: one device moved to another group (``Authority.set_group``, a ``device.group``
  event), a change every gateway hears of

For each, ``--repeat`` times: the action (not timed), then one ``Follower.sync()``, timed as
CPU of the whole process (the read runs in a worker thread) and wall time. Also timed: one
full read of the state (what the old follower did on every action, and the new one does on
an unknown action), and a device action's sync with the follower's safety net due (the full
read in the same transaction, turned into the feed's state and compared with the patched
one: what the follower spends at most once a minute while the registry moves).

With ``--idle SECONDS`` it also runs ``fleet-provision serve`` on a registry of
``--idle-devices`` devices with ``--gateways`` gateways long-polling ``/feed`` (``wait=30``,
as a hub asks): the service's CPU (its process and its CA worker, utime + stime from /proc)
over SECONDS with nothing happening, and then the time from a group change's commit to the
waiting long-polls' answer (what the poll interval costs in latency).

    .venv/bin/python bench/feed_follow.py [--devices 10000 100000] [--repeat 20]
        [--idle 30] [--gateways 3] [--idle-devices 1000]

Prints a line per fleet size and action, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _brokers import FeedReader, tree_cpu_seconds

from device_sim.lab import CAServiceProcess
from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.feed.follower import Follower
from provisioning.registry.view import FleetView
from provisioning.serial import format_serial
from provisioning.timefmt import iso, utcnow

TRUST_DOMAIN = "bench.test"


def populate(registry: Path, count: int) -> None:
    """*count* devices with one active certificate each, written as the CA writes rows."""
    stamp = iso(utcnow())
    conn = sqlite3.connect(registry)
    with conn:
        conn.executemany(
            'INSERT INTO devices (device_id, status, "group", created_at, updated_at, '
            "metadata) VALUES (?, ?, ?, ?, ?, '{}')",
            [(f"dev-{i:07d}", "revoked" if i % 50 == 0 else "active",
              f"g{i % 7}" if i % 10 == 0 else None, stamp, stamp) for i in range(count)])
        conn.executemany(
            "INSERT INTO certificates (serial, device_id, fingerprint, public_key_sha256, "
            "not_before, not_after, status, revoked_at, reason, issued_at, pem) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '')",
            [(format_serial(0x4000_0000_0000 + i), f"dev-{i:07d}", f"fp{i}", f"k{i}", stamp,
              stamp, "revoked" if i % 50 == 0 else "active",
              stamp if i % 50 == 0 else None, "keyCompromise" if i % 50 == 0 else None, stamp)
             for i in range(count)])
    conn.close()


def feed_fetch(authority: Authority, n: int) -> None:
    """The event the service writes when a gateway gets a new version."""
    with authority.registry.write("gateway:gw-bench") as tx:
        tx.audit(iso(utcnow()), "feed.fetch", None, "01",
                 {"gateway": "gw-bench", "since": n, "version": n + 1, "kind": "delta"})


async def measure(authority: Authority, count: int, repeat: int) -> dict[str, Any]:
    view = FleetView(authority.paths.registry)
    follower = Follower(view, TRUST_DOMAIN, interval=3600.0)  # no background polls
    started = time.perf_counter()
    await follower.start()
    first = time.perf_counter() - started
    figures: dict[str, Any] = {"devices": count, "first_read_s": round(first, 4),
                               "state_devices": len(follower.state.devices)}
    actions: dict[str, Callable[[int], object]] = {
        "harmless": lambda i: feed_fetch(authority, i),
        "device": lambda i: authority.set_group([f"dev-{(i * 7919) % count:07d}"],
                                                f"moved-{i}"),
    }
    try:
        for name, act in actions.items():
            cpu: list[float] = []
            wall: list[float] = []
            for i in range(repeat):
                act(i)
                c0, w0 = time.process_time(), time.perf_counter()
                await follower.sync()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            figures[name] = {"cpu_ms": round(1000 * statistics.median(cpu), 3),
                             "wall_ms": round(1000 * statistics.median(wall), 3)}
            print(f"{count:>8,} devices  {name:<8}  CPU {figures[name]['cpu_ms']:9.3f} ms"
                  f"  wall {figures[name]['wall_ms']:9.3f} ms  per action (median of "
                  f"{repeat})", flush=True)
    finally:
        await follower.close()
    with FleetView(authority.paths.registry) as full:
        c0 = time.process_time()
        full.read(certificates=True)
        figures["full_read_cpu_ms"] = round(1000 * (time.process_time() - c0), 3)
    print(f"{count:>8,} devices  full read of the state: CPU "
          f"{figures['full_read_cpu_ms']:.1f} ms", flush=True)
    check = await safety_net(authority, count, repeat)
    if check is not None:
        figures["check_cpu_ms"] = check
        print(f"{count:>8,} devices  a device action with the safety net due (full read, "
              f"compared): CPU {check:.1f} ms, once a minute at most", flush=True)
    return figures


async def safety_net(authority: Authority, count: int, repeat: int) -> float | None:
    """CPU of one sync with the periodic full read due (None: a follower without one)."""
    try:
        follower = Follower(FleetView(authority.paths.registry), TRUST_DOMAIN,
                            interval=3600.0, check_seconds=0)
    except TypeError:
        return None
    await follower.start()
    cpu: list[float] = []
    try:
        for i in range(max(3, repeat // 4)):
            authority.set_group([f"dev-{(i * 104729) % count:07d}"], f"checked-{i}")
            c0 = time.process_time()
            await follower.sync()
            cpu.append(time.process_time() - c0)
    finally:
        await follower.close()
    return round(1000 * statistics.median(cpu), 3)


def idle(root: Path, devices: int, gateways: int, seconds: float) -> dict[str, Any]:
    """The service's CPU while gateways long-poll an unchanged registry, then the latency
    from a change's commit to the long-polls' answers."""
    pki = root / "pki-idle"
    initialize(pki, PKIConfig(trust_domain=TRUST_DOMAIN, organisation="Bench"), None)
    with Authority(pki, actor="bench") as authority:
        populate(authority.paths.registry, devices)
        for g in range(gateways):
            authority.server_cert(f"gw-{g + 1}", ["127.0.0.1"], root / f"gw-{g + 1}")
    ca = CAServiceProcess(pki)
    stop = threading.Event()
    answered: list[tuple[float, int]] = []  # (perf_counter, version) of each new version

    def poll(g: int) -> None:
        reader = FeedReader("127.0.0.1", ca.port, pki / "ca-chain.pem",
                            root / f"gw-{g + 1}" / "server.pem",
                            root / f"gw-{g + 1}" / "server.key")
        since = 0
        while not stop.is_set():
            status, _, version, _ = reader.get(since, 30.0 if since else 0.0)
            if status != 200 or version is None:
                time.sleep(0.1)
                continue
            if since and version != since:
                answered.append((time.perf_counter(), version))
            since = version

    threads = [threading.Thread(target=poll, args=(g,), daemon=True) for g in range(gateways)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3.0)  # each gateway's first fetch is audited; let it settle
        before = tree_cpu_seconds(ca.pid)
        time.sleep(seconds)
        used = tree_cpu_seconds(ca.pid) - before
        latencies: list[float] = []
        with Authority(pki, actor="bench") as authority:
            for i in range(40):
                answered.clear()
                authority.set_group([f"dev-{i:07d}"], f"latency-{i}")
                committed = time.perf_counter()
                deadline = committed + 5
                while len(answered) < gateways and time.perf_counter() < deadline:
                    time.sleep(0.001)
                if answered:
                    latencies.append(max(t for t, _ in answered) - committed)
                time.sleep(0.2 + random.uniform(0, 0.1))  # no phase lock with the polls
    finally:
        stop.set()
        ca.stop()
    figures = {"idle_seconds": seconds, "gateways": gateways, "devices": devices,
               "idle_cpu_percent": round(100 * used / seconds, 3),
               "idle_cpu_s_per_hour": round(used * 3600 / seconds, 1),
               "change_to_answer_ms_p50": round(1000 * statistics.median(latencies), 1),
               "change_to_answer_ms_max": round(1000 * max(latencies), 1)}
    print(f"idle service, {gateways} gateways long-polling, {devices:,} devices: "
          f"{figures['idle_cpu_percent']}% of a core ({figures['idle_cpu_s_per_hour']} s "
          f"per hour); a change to every long-poll's answer: p50 "
          f"{figures['change_to_answer_ms_p50']} ms, max {figures['change_to_answer_ms_max']} "
          "ms (40 changes)", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--idle-devices", type=int, default=1000)
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    out: dict[str, Any] = {"bench": "feed_follow", "results": results}
    with tempfile.TemporaryDirectory(prefix="feed-follow-") as tmp:
        if args.idle > 0:
            out["idle"] = idle(Path(tmp), args.idle_devices, args.gateways, args.idle)
        for count in args.devices:
            root = Path(tmp) / f"pki-{count}"
            initialize(root, PKIConfig(trust_domain=TRUST_DOMAIN, organisation="Bench"), None)
            with Authority(root) as authority:
                populate(authority.paths.registry, count)
                results.append(asyncio.run(measure(authority, count, args.repeat)))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
