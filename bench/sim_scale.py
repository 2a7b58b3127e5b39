"""Simulator scale: 5,000 virtual devices, each with its own certificate, against the hub.

A fresh PKI and ``fleet-hub serve`` (a subprocess on 127.0.0.1) are made in a temporary
folder; the devices enroll through the provisioning library (not timed), then connect with
mutual TLS at ``--rate`` over ``--processes`` worker processes, stay connected for
``--duration`` seconds publishing telemetry, and disconnect. The hub's CPU comes from
/proc/PID/stat at the start and the end of the connect ramp; the simulator's from its
workers' getrusage over the same ramp.

    .venv/bin/python bench/sim_scale.py [--devices 5000] [--rate 1000] [--processes 2]

Prints connects/s, connect p99 by phase (TCP, TLS, CONNECT->CONNACK), CPU seconds per
connect for the simulator and the hub, the peak of concurrent connections, and last one
JSON line. Targets: all devices connected at once, no unexpected failure, and the simulator
spending less CPU per connect than the hub (it must not be a load test's bottleneck).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from device_sim.display import Display
from device_sim.fleet import RunSettings, run_fleet
from device_sim.lab import HubProcess, make_pki, write_hub_config
from device_sim.worker import raise_nofile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="connects/s (1000)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--publish-interval", type=float, default=30.0,
                        help="seconds (30): telemetry is not what this measures")
    parser.add_argument("--dir", type=Path, default=None, help="temporary folder's parent")
    args = parser.parse_args(argv)
    raise_nofile()  # the hub inherits it
    with tempfile.TemporaryDirectory(prefix="sim-scale-", dir=args.dir) as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        config = write_hub_config(root, pki, refresh=1.0)
        with HubProcess(config) as hub:
            marks: dict[str, tuple[float, float]] = {}

            def observe(phase: str) -> None:
                marks[phase] = (time.monotonic(), hub.cpu_seconds())

            settings = RunSettings(pki=pki, host="127.0.0.1", port=hub.port,
                                   devices=args.devices, rate=args.rate,
                                   duration=args.duration,
                                   publish_interval=args.publish_interval,
                                   processes=args.processes, connect_timeout=60.0)
            report = run_fleet(settings, Display(), observe)
            hub_cpu_total = hub.cpu_seconds()
    c, cpu = report["connect"], report["cpu"]
    hub_ramp = marks["ramp-end"][1] - marks["ramp-start"][1]
    sim_per = cpu["connect_phase_s"] / c["count"] * 1000 if c["count"] else float("nan")
    hub_per = hub_ramp / c["count"] * 1000 if c["count"] else float("nan")
    unexpected = c["failed"] + sum(1 for s in report["scenarios"]
                                   if s["name"] == "fleet-steady" and not s["passed"])
    figures = {
        "devices": args.devices, "processes": report["processes"], "rate": args.rate,
        "connected": c["count"], "failed": c["failed"],
        "peak_concurrent": c["peak_concurrent"], "connects_per_s": c["per_second"],
        "p50_ms": c["p50_ms"], "p99_ms": c["p99_ms"], "max_ms": c["max_ms"],
        "tcp_p99_ms": c["tcp_p99_ms"], "tls_p99_ms": c["tls_p99_ms"],
        "mqtt_p99_ms": c["mqtt_p99_ms"],
        "sim_cpu_per_connect_ms": round(sim_per, 3),
        "hub_cpu_per_connect_ms": round(hub_per, 3),
        "sim_cpu_total_s": cpu["simulator_s"], "hub_cpu_total_s": round(hub_cpu_total, 2),
        "messages_sent": report["messages"]["sent"],
        "messages_lost": report["messages"]["lost"],
        "enroll_s": report["enrollment"]["seconds"], "passed": report["passed"],
    }
    met = (c["peak_concurrent"] == args.devices and unexpected == 0 and sim_per < hub_per)
    print(f"devices: {c['count']}/{args.devices} connected, {c['failed']} failed, peak "
          f"{c['peak_concurrent']} concurrent, over {report['processes']} processes")
    print(f"connects/s: {c['per_second']} (asked {args.rate:g}/s)")
    print(f"connect ms: p50 {c['p50_ms']}  p99 {c['p99_ms']}  max {c['max_ms']}")
    print(f"connect p99 by phase ms: TCP {c['tcp_p99_ms']}  TLS {c['tls_p99_ms']}  "
          f"CONNECT->CONNACK {c['mqtt_p99_ms']}")
    print(f"CPU per connect during the ramp: simulator {sim_per:.2f} ms, hub {hub_per:.2f} ms")
    print(f"messages: {report['messages']['sent']} sent, {report['messages']['lost']} lost")
    print(f"targets (all connected at once, no failure, simulator < hub per connect): "
          f"{'met' if met else 'NOT met'}")
    for s in report["scenarios"]:
        if not s["passed"]:
            print(f"FAILED {s['name']}: {s['observed']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
