"""Connect throughput and memory: 2,000 mutual-TLS devices against the hub and stock amqtt.

One fleet (a PKI, each device with its own P-256 key and certificate, made up front and not
timed) is connected, one broker at a time, to

- the hub: ``fleet-hub serve --config hub.toml`` with every check on (registry and CRL
  revocation sources, client-id match, ACL, audit store, metrics endpoint), on uvloop;
- stock amqtt 0.12.1 as shipped: ``amqtt -c stock.yaml`` with its own TLS listener
  (certfile/keyfile/cafile), anonymous auth, the default asyncio event loop.

The load (see _mqtt_load.py) runs in its own process on one uvloop loop, ``--concurrency``
connects in flight, and keeps every connection open. For each broker it prints connects/s,
connect latency p50/p99 (total, and by phase: TCP, TLS handshake, CONNECT->CONNACK), the
broker's CPU seconds during the connects (/proc/PID/stat), its RSS per connected device
((VmRSS with all connected - settled idle VmRSS) / connected) and failures; then the ratio
hub/stock connects/s (target >= 1.2) and whether the hub stays under 64 KiB per device.

    .venv/bin/python bench/hub_connect.py [--devices 2000] [--concurrency 32] [--dir /dev/shm]

The last line printed is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _brokers import (
    BrokerProcess,
    Profiler,
    build_fleet,
    hub_config,
    stock_config,
)
from _mqtt_load import (
    DeviceCreds,
    LoadProcess,
    cpu_seconds,
    raise_nofile,
    settled_rss_kib,
    summarize,
)

from device_sim.lab import free_port

TARGET_RATIO = 1.2
TARGET_RSS_KIB = 64.0


def measure(broker: BrokerProcess, load: LoadProcess, devices: list[DeviceCreds],
            concurrency: int, profile: Path | None = None) -> dict[str, Any]:
    """Settle, connect every device, settle, read CPU and RSS; leaves the devices connected."""
    idle = settled_rss_kib(broker.pid, at_least=2.0)
    spy = Profiler(broker.pid, profile) if profile is not None else None
    cpu0 = cpu_seconds(broker.pid)
    results, load_cpu = load.connect("127.0.0.1", broker.port, devices,
                                     concurrency=concurrency)
    cpu1 = cpu_seconds(broker.pid)
    if spy is not None:
        spy.stop()
    figures = summarize(results)
    loaded = settled_rss_kib(broker.pid, at_least=2.0)
    still_open, _ = load.status()
    connected = figures["connected"]
    figures.update({
        "broker_cpu_s": round(cpu1 - cpu0, 2),
        "broker_cpu_ms_per_connect": round((cpu1 - cpu0) * 1000 / connected, 3)
        if connected else None,
        "load_cpu_s": round(load_cpu, 2),
        "rss_idle_kib": idle,
        "rss_connected_kib": loaded,
        "rss_per_device_kib": round((loaded - idle) / connected, 1) if connected else None,
        "still_open": still_open,
    })
    return figures


def run_one(name: str, start: Any, load: LoadProcess, devices: list[DeviceCreds],
            concurrency: int, profile: Path | None) -> dict[str, Any]:
    broker: BrokerProcess = start()
    try:
        figures = measure(broker, load, devices, concurrency, profile)
        load.close_all()
        alive = broker.process.poll() is None
    finally:
        broker.stop()
    figures["broker_survived"] = alive
    report(name, figures)
    return figures


def report(name: str, f: dict[str, Any]) -> None:
    print(f"\n== {name}: {f['connected']}/{f['devices']} connected, {f['failures']} failures "
          f"{f['failure_kinds'] or ''}")
    print(f"   connects/s        {f['connects_per_s']:>9}  (wall {f['wall_s']} s)")
    for phase in ("total", "tcp", "tls", "connack"):
        print(f"   {phase + ' p50/p99 ms':<17} {f[phase + '_p50_ms']!s:>9} / "
              f"{f[phase + '_p99_ms']}")
    print(f"   broker CPU s      {f['broker_cpu_s']:>9}  "
          f"({f['broker_cpu_ms_per_connect']} ms per connect; load process "
          f"{f['load_cpu_s']} s)")
    print(f"   broker RSS        {f['rss_idle_kib']:>9} KiB idle -> "
          f"{f['rss_connected_kib']} KiB connected = {f['rss_per_device_kib']} KiB/device")
    print(f"   still open after settle: {f['still_open']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder parent")
    parser.add_argument("--order", choices=("hub-first", "stock-first"), default="hub-first")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--profile", type=Path, default=None, metavar="PREFIX",
                        help="py-spy (on PATH or $PY_SPY) each broker during its connects, "
                             "writing PREFIX-hub.txt / PREFIX-stock.txt (collapsed stacks)")
    args = parser.parse_args(argv)

    nofile = raise_nofile()  # the brokers, started from here, inherit it
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-hub-connect-", dir=args.dir))
    try:
        t0 = time.monotonic()
        pki, devices = build_fleet(root, args.devices)
        setup = time.monotonic() - t0
        print(f"fleet: {len(devices)} devices enrolled in {setup:.1f} s (not timed); "
              f"RLIMIT_NOFILE {nofile}")
        hub_toml = hub_config(root)
        stock_yaml = stock_config(root, pki, free_port())
        starts = {"hub": lambda: BrokerProcess.hub(hub_toml),
                  "stock": lambda: BrokerProcess.stock(stock_yaml)}
        order = ["hub", "stock"] if args.order == "hub-first" else ["stock", "hub"]
        figures: dict[str, dict[str, Any]] = {}
        with LoadProcess(pki / "ca-chain.pem") as load:
            for name in order:
                label = "fleet-hub (uvloop, every check on)" if name == "hub" else \
                    "stock amqtt 0.12.1 (asyncio, TLS, anonymous)"
                profile = None if args.profile is None else \
                    args.profile.with_name(f"{args.profile.name}-{name}.txt")
                figures[name] = run_one(label, starts[name], load, devices, args.concurrency,
                                        profile)
                time.sleep(1.0)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    hub, stock = figures["hub"], figures["stock"]
    ratio = hub["connects_per_s"] / stock["connects_per_s"] if stock["connects_per_s"] else 0.0
    rss = hub["rss_per_device_kib"]
    ratio_ok = ratio >= TARGET_RATIO and hub["failures"] == 0
    rss_ok = rss is not None and rss < TARGET_RSS_KIB
    print(f"\nhub/stock connects/s: {ratio:.2f}x (target >= {TARGET_RATIO}x): "
          f"{'MET' if ratio_ok else 'NOT MET'}")
    print(f"hub RSS per device: {rss} KiB (target < {TARGET_RSS_KIB:g} KiB): "
          f"{'MET' if rss_ok else 'NOT MET'}; stock: {stock['rss_per_device_kib']} KiB")
    total = time.monotonic() - began
    print(f"total runtime {total:.0f} s")
    print(json.dumps({
        "bench": "hub_connect", "devices": args.devices, "concurrency": args.concurrency,
        "order": args.order, "hub": hub, "stock": stock, "ratio": round(ratio, 3),
        "ratio_target": TARGET_RATIO, "ratio_met": ratio_ok,
        "rss_target_kib": TARGET_RSS_KIB, "rss_met": rss_ok,
        "setup_s": round(setup, 1), "runtime_s": round(total, 1),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
