"""Certificate rotation at fleet scale: 2,000 devices on 4-minute certificates for 10 minutes.

A fresh PKI in a temporary folder, its policy set to ``validity = --validity`` and
``renew_grace`` an eighth of it (``fleet-provision policy set``), ``fleet-provision serve`` (the
EST service the devices renew through) and ``fleet-hub serve`` watching the registry and the
CRL, each a subprocess on 127.0.0.1. ``fleet-sim``'s fleet (:func:`device_sim.fleet.run_fleet`
with ``--rotate``'s settings, every device renewing, none told not to) enrolls through the
library (not timed), connects, publishes QoS 1 telemetry every ``--publish-interval`` seconds
and holds for ``--minutes``: each device renews over EST ``simplereenroll`` at 0.67 of its
certificate's life (jitter 0.1) and moves its persistent session to the new certificate.

A sampler thread reads the CPU of the CA service (with its CA worker process) and of the hub
from /proc every second. CA CPU per renewal and hub CPU per reconnect are each process's CPU
over the hold, less its rate before the first renewal (devices connected and publishing, the
CA's housekeeping, no renewal yet) times the hold, divided by the renewals.

    .venv/bin/python bench/rotation.py [--devices 2000] [--minutes 10] [--validity 4m]
    .venv/bin/python bench/rotation.py --devices 100 --minutes 3 --validity 2m   # a small one

Prints renewals (total, per device min), renewals/s sustained (first to last) and the busiest
10 s, failed renewals, messages lost (sequence numbers), unexpected disconnects, superseded
certificates revoked after the grace, CPU per renewal (CA) and per reconnect (hub), and last one
JSON line. Targets: 0 failed renewals, 0 lost, 0 unexpected disconnects, every device renews at
least twice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from _brokers import tree_cpu_seconds, tree_rss_kib

from device_sim.display import Display
from device_sim.fleet import RunSettings, run_fleet
from device_sim.lab import CAServiceProcess, HubProcess, make_pki, write_hub_config
from device_sim.lab.policy import ensure_service_cert, set_policy
from device_sim.rotation import RotateSettings
from device_sim.worker import raise_nofile
from provisioning.duration import format_duration, parse_duration

MIN_ROUNDS = 2


class Sampler(threading.Thread):
    """(monotonic time, CA tree CPU s, hub tree CPU s) every second until stopped."""

    def __init__(self, ca_pid: int, hub_pid: int) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.ca_pid, self.hub_pid = ca_pid, hub_pid
        self.samples: list[tuple[float, float, float]] = []
        self.done = threading.Event()

    def sample(self) -> tuple[float, float, float]:
        point = (time.monotonic(), tree_cpu_seconds(self.ca_pid),
                 tree_cpu_seconds(self.hub_pid))
        self.samples.append(point)
        return point

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.sample()

    def at(self, when: float) -> tuple[float, float, float]:
        """The last sample taken at or before *when* (the first one if none)."""
        found = self.samples[0]
        for point in self.samples:
            if point[0] > when:
                break
            found = point
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=10.0, help="hold (10)")
    parser.add_argument("--validity", default="4m", help="certificate lifetime (4m)")
    parser.add_argument("--renew-at", type=float, default=0.67)
    parser.add_argument("--rate", type=float, default=200.0, help="connects/s (200)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--publish-interval", type=float, default=5.0, help="seconds (5)")
    parser.add_argument("--dir", type=Path, default=None, help="temporary folder's parent")
    args = parser.parse_args(argv)
    validity = parse_duration(args.validity, "--validity")
    grace = dt.timedelta(seconds=max(1, int(validity.total_seconds() / 8)))
    raise_nofile()  # the hub inherits it
    with tempfile.TemporaryDirectory(prefix="rotation-", dir=args.dir) as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        set_policy(pki, format_duration(validity), format_duration(grace))
        ensure_service_cert(pki)
        config = write_hub_config(root, pki, refresh=1.0)
        with CAServiceProcess(pki) as ca, HubProcess(config) as hub:
            sampler = Sampler(ca.pid, hub.pid)
            marks: dict[str, float] = {}

            def observe(phase: str) -> None:
                marks[phase] = time.monotonic()
                if phase == "ramp-end":
                    sampler.sample()
                    sampler.start()

            settings = RunSettings(
                pki=pki, host="127.0.0.1", port=hub.port, devices=args.devices,
                rate=args.rate, duration=args.minutes * 60,
                publish_interval=args.publish_interval, processes=args.processes,
                connect_timeout=60.0,
                rotate=RotateSettings(ca.url, validity, grace, renew_at=args.renew_at,
                                      no_renew=0, rounds=MIN_ROUNDS))
            report = run_fleet(settings, Display(), observe)
            sampler.done.set()
            sampler.join()
            ca_rss, hub_rss = tree_rss_kib(ca.pid), tree_rss_kib(hub.pid)
    rotation, rate = report["rotation"], report["rotation_rate"]
    renewed = rotation["renewed"]
    start, stop = sampler.at(marks["ramp-end"]), sampler.at(marks["stop"])
    hold_s = stop[0] - start[0]
    # Before the first renewal: devices connected and publishing, nothing renewing.
    # (renew_at - jitter/2) of a life that starts a tenth of the validity back, less 5 s.
    first_renewal = marks["enrolled"] + ((args.renew_at - 0.05) * 1.1 - 0.1) * \
        validity.total_seconds() - 5
    quiet = sampler.at(first_renewal)
    quiet_s = quiet[0] - start[0]
    quiet_rate = (quiet[2] - start[2]) / quiet_s if quiet_s > 5 else 0.0
    ca_quiet_rate = (quiet[1] - start[1]) / quiet_s if quiet_s > 5 else 0.0
    ca_cpu, hub_cpu = stop[1] - start[1], stop[2] - start[2]
    hub_net = max(0.0, hub_cpu - quiet_rate * hold_s)
    ca_net = max(0.0, ca_cpu - ca_quiet_rate * hold_s)
    steady = next(s for s in report["scenarios"] if s["name"] == "fleet-steady")
    unexpected = sum(b["unexpected_disconnects"] for b in report["brokers"])
    fewest = next(s for s in report["scenarios"] if s["name"] == "rotation-renewed")
    per_device_min = int(fewest["observed"].rsplit(" ", 1)[1])
    figures = {
        "devices": args.devices, "minutes": args.minutes, "validity": args.validity,
        "renew_grace": format_duration(grace), "renew_at": args.renew_at,
        "connected": report["connect"]["count"], "renewed": renewed,
        "renewed_per_device_min": per_device_min,
        "renewals_per_s": rate["per_second"], "renewals_peak_10s_per_s":
        rate["peak_per_second"], "failed": rotation["failed"],
        "messages_sent": report["messages"]["sent"],
        "messages_lost": rotation["messages_lost"], "unexpected_disconnects": unexpected,
        "superseded_revoked": rotation["superseded_revoked"],
        "superseded_expected": report["rotation_expected"]["superseded_revoked"],
        "hold_s": round(hold_s, 1), "ca_cpu_s": round(ca_cpu, 2),
        "ca_idle_cpu_per_s": round(ca_quiet_rate, 4),
        "ca_cpu_per_renewal_ms": round(ca_net / renewed * 1000, 3) if renewed else None,
        "hub_cpu_s": round(hub_cpu, 2), "hub_idle_cpu_per_s": round(quiet_rate, 4),
        "hub_cpu_per_reconnect_ms": round(hub_net / renewed * 1000, 3) if renewed else None,
        "ca_rss_kib": ca_rss, "hub_rss_kib": hub_rss,
        "sim_cpu_s": report["cpu"]["simulator_s"], "passed": report["passed"],
    }
    met = (rotation["failed"] == 0 and rotation["messages_lost"] == 0 and unexpected == 0
           and per_device_min >= MIN_ROUNDS and steady["passed"])
    figures["targets_met"] = met
    print(f"devices: {report['connect']['count']}/{args.devices} connected on "
          f"{args.validity} certificates (renew_grace {format_duration(grace)}), held "
          f"{hold_s:.0f} s")
    print(f"renewals: {renewed} ({per_device_min} per device at least), "
          f"{rate['per_second']}/s sustained over {rate['span_s']} s, busiest 10 s "
          f"{rate['peak_per_second']}/s; {rotation['failed']} failed")
    print(f"messages: {report['messages']['sent']} sent, {rotation['messages_lost']} lost; "
          f"{unexpected} unexpected disconnects")
    print(f"superseded revoked after the grace: {rotation['superseded_revoked']} of "
          f"{report['rotation_expected']['superseded_revoked']}")
    print(f"CA service CPU: {ca_cpu:.2f} s ({ca_quiet_rate:.3f} s/s before the first "
          f"renewal), {figures['ca_cpu_per_renewal_ms']} ms per renewal")
    print(f"hub CPU: {hub_cpu:.2f} s ({quiet_rate:.3f} s/s before the first renewal), "
          f"{figures['hub_cpu_per_reconnect_ms']} ms per reconnect")
    print(f"targets (0 failed, 0 lost, 0 unexpected disconnects, >= {MIN_ROUNDS} renewals "
          f"per device): {'met' if met else 'NOT met'}")
    for s in report["scenarios"]:
        if not s["passed"]:
            print(f"FAILED {s['name']}: {s['observed']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
