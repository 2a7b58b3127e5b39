"""Many gateways at once: one CA service, N hubs fed by its fleet-state feed, a fleet over them.

``fleet-provision serve`` (EST and ``/feed``) and ``--gateways`` ``fleet-hub serve`` processes,
each in its own folder with its own gateway certificate (``server-cert --name gw-N``), no
registry and no CRL: everything a gateway knows of the fleet comes from the feed (DESIGN
section 9). ``--devices`` mutual-TLS devices (each its own certificate; _mqtt_load.py, the
load in its own process) are dealt out round-robin (device i to gateway i mod N, as
``fleet-sim run`` deals them) and stay connected. Then, in order:

1. idle: the CA service's CPU (its process and its CA worker) over ``--idle-seconds`` with
   every gateway long-polling, less its CPU alone before the gateways came, per gateway and
   idle hour; the heartbeat's size.
2. ``--changes`` times ``group set`` of one device (a feed change, no kick): how long until
   every gateway's /healthz shows it, and the gateways' CPU per change at this fleet size.
3. revoke ``--revoke`` devices spread over every gateway in one ``fleet-provision revoke``
   call (its code path, ``provisioning.cli.main``, in this process, so that its return is
   stamped right after the commit): time from the call's return to each device's EOF (p50,
   p99, max; negative when a gateway kicked before the command had printed), every one cut
   off, no other device disconnected; the delta document's size per revoked device (read
   by an extra gateway certificate, ``gw-observer``, as every gateway reads it).
4. suspend then resume ``--suspend`` devices, one at a time: suspend -> EOF, resume -> the
   first admitted reconnect (retried at once while refused); the max of each.
5. CA outage of ``--outage-seconds``: the CA service stopped (``--outage-mode stop``, SIGTERM;
   ``pause``: SIGSTOP, connections hang). Twice during it, at each gateway, a device never
   connected yet must be admitted and a revoked one refused. Then a new CA service on the
   same port and, as soon as it is ready, one device per gateway revoked in one call: the
   time until each is cut off (catch-up; target 2 s).

Prints the figures as it goes and ends with one JSON line.

    .venv/bin/python bench/multi_gateway.py [--gateways 10] [--devices 5000] [--revoke 100]
        [--suspend 10] [--outage-seconds 30] [--outage-mode stop|pause] [--idle-seconds 60]
    .venv/bin/python bench/multi_gateway.py --gateways 3 --devices 300 --outage-seconds 5 \\
        --idle-seconds 10      # a quick run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _brokers import TRUST_DOMAIN, FeedReader, enroll, tree_cpu_seconds, tree_rss_kib
from _mqtt_load import (
    DeviceCreds,
    LoadProcess,
    cpu_seconds,
    percentile,
    raise_nofile,
    rss_kib,
    summarize,
)

from device_sim.brokers import assign
from device_sim.lab import (
    CAServiceProcess,
    Gateways,
    HubProcess,
    gateway_name,
    make_pki,
    write_gateway_config,
)
from provisioning.authority import Authority
from provisioning.cli import main as fleet_provision

TARGET_P99_S = 1.0
MOONSHOT_P99_S = 0.25
TARGET_SUSPEND_S = 1.0
TARGET_CATCH_UP_S = 2.0
SETTLE_S = 5.0  # before the idle window
SPARES = 2  # per gateway: devices enrolled, never connected, tried during the outage
# Every connect of the load comes from 127.0.0.1: no per-address handshake budget.
BENCH_HUB = {"limits": {"max_pending_tls": 65535}}


def provision(*args: str) -> float:
    """``fleet-provision ARGS`` (its own code, in this process, its output dropped); when it
    returned (time.monotonic()). Exit code other than 0: RuntimeError."""
    with contextlib.redirect_stderr(io.StringIO()) as err, \
            contextlib.redirect_stdout(io.StringIO()):
        code = fleet_provision(list(args))
    done = time.monotonic()
    if code != 0:
        raise RuntimeError(f"fleet-provision {args[0]} exited {code}: {err.getvalue()}")
    return done


def spread(devices: Sequence[DeviceCreds], gateways: int, count: int,
           skip: set[str]) -> list[DeviceCreds]:
    """*count* devices, taken in turn from each gateway's share (evenly over the share),
    none of *skip*."""
    shares = [[d for d in devices[g::gateways] if d.device_id not in skip]
              for g in range(gateways)]
    per = math.ceil(count / gateways)
    picked: list[DeviceCreds] = []
    for k in range(count):
        share = shares[k % gateways]
        picked.append(share[(k // gateways) * len(share) // per])
    return picked


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.figures: dict[str, Any] = {"gateways": args.gateways, "devices": args.devices,
                                        "registered_extra": args.registered_extra}
        self.pki = make_pki(root, trust_domain=TRUST_DOMAIN, organisation="Bench Org",
                            actor=None)
        (root / "devices").mkdir()
        started = time.monotonic()
        self.devices = enroll(self.pki, root / "devices",
                              [f"dev-{i:05d}" for i in range(args.devices)])
        self.spares = enroll(self.pki, root / "devices",
                             [f"spare-{g}-{k}" for g in range(args.gateways)
                              for k in range(SPARES)])
        for start in range(0, args.registered_extra, 10_000):  # in the state, never online
            enroll(self.pki, root / "devices",
                   [f"idle-{i:07d}" for i in range(start, min(args.registered_extra,
                                                             start + 10_000))])
        print(f"fleet: {len(self.devices)} devices, {len(self.spares)} spares and "
              f"{args.registered_extra} never connected enrolled in "
              f"{time.monotonic() - started:.1f} s (not timed)")
        self.state_devices = len(self.devices) + len(self.spares) + args.registered_extra
        with Authority(self.pki, actor="bench") as authority:
            authority.server_cert("gw-observer", ["127.0.0.1"], root / "observer")
        self.ca: CAServiceProcess | None = None
        self.where: dict[str, tuple[str, int]] = {}
        self.load: LoadProcess | None = None

    # -- set-up ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        self.ca = CAServiceProcess(self.pki)
        try:
            baseline = self.ca_cpu_per_hour(max(2.0, args.idle_seconds / 2))
            self.figures["ca_cpu_s_per_idle_hour_alone"] = round(baseline, 2)
            names = [gateway_name(g) for g in range(args.gateways)]
            configs = [write_gateway_config(self.root, self.pki, name, self.ca.feed_url,
                                            layers=(BENCH_HUB,)) for name in names]
            started = time.monotonic()
            with Gateways(configs) as hubs, \
                    LoadProcess(self.pki / "ca-chain.pem", "127.0.0.1") as load:
                self.load = load
                self.figures["gateways_start_s"] = round(time.monotonic() - started, 2)
                print(f"{len(hubs)} gateways fed by {self.ca.feed_url} ready in "
                      f"{self.figures['gateways_start_s']} s")
                self.connect(hubs.endpoints)
                self.idle(baseline)
                self.figures["gateway_rss_mib"] = round(
                    sum(rss_kib(h.pid) for h in hubs) / len(hubs) / 1024, 1)
                self.figures["ca_rss_mib"] = round(tree_rss_kib(self.ca.pid) / 1024, 1)
                self.change_cost(hubs.hubs)
                revoked = self.revoke()
                self.suspend_resume(revoked)
                self.outage(revoked)
                self.figures["gateways_alive"] = sum(h.process.poll() is None for h in hubs)
                load.close_all()
        finally:
            if self.ca is not None:
                with contextlib.suppress(OSError):
                    self.ca.resume()  # after a pause, SIGTERM needs it running
                self.ca.stop()
        return self.figures

    def connect(self, endpoints: list[tuple[str, int]]) -> None:
        assert self.load is not None
        for i, device in enumerate(self.devices):
            self.where[device.device_id] = assign(i, endpoints)
        for g, spare in enumerate(self.spares):
            self.where[spare.device_id] = endpoints[g // SPARES]
        results = []
        for g, (host, port) in enumerate(endpoints):
            share = self.devices[g::len(endpoints)]
            got, _ = self.load.connect(host, port, share, concurrency=self.args.concurrency)
            results += got
        summary = summarize(results)
        self.figures["connected"] = summary["connected"]
        self.figures["connect_failures"] = summary["failures"]
        print(f"connected {summary['connected']}/{summary['devices']} "
              f"({summary['connects_per_s']}/s, p99 {summary['total_p99_ms']} ms, "
              f"{summary['failures']} failures {summary['failure_kinds'] or ''})")

    def ca_cpu_per_hour(self, seconds: float) -> float:
        assert self.ca is not None
        before = tree_cpu_seconds(self.ca.pid)
        time.sleep(seconds)
        return (tree_cpu_seconds(self.ca.pid) - before) * 3600 / seconds

    def observer(self) -> FeedReader:
        assert self.ca is not None
        folder = self.root / "observer"
        return FeedReader("127.0.0.1", self.ca.port, self.pki / "ca-chain.pem",
                          folder / "server.pem", folder / "server.key")

    # -- the steps ---------------------------------------------------------------------------

    def idle(self, baseline: float) -> None:
        g = self.args.gateways
        # Settle first: each gateway's first fetch is audited (feed.fetch), and every audit
        # row makes the CA read the whole state once more (provisioning/feed/follower.py).
        time.sleep(SETTLE_S)
        per_hour = self.ca_cpu_per_hour(self.args.idle_seconds)
        reader = self.observer()
        status, snapshot, version, _ = reader.get(0)
        _, heartbeat, _, _ = reader.get(version or 0, wait=0.5)
        self.figures.update({
            "ca_cpu_s_per_idle_hour": round(per_hour, 2),
            "ca_cpu_s_per_gateway_idle_hour": round(max(0.0, per_hour - baseline) / g, 3),
            "snapshot_bytes": snapshot, "snapshot_status": status,
            "snapshot_bytes_per_device": round(snapshot / self.state_devices, 1),
            "heartbeat_bytes": heartbeat})
        print(f"idle {self.args.idle_seconds:g} s: CA CPU {per_hour:.1f} s per hour with {g} "
              f"gateways ({baseline:.1f} s alone): "
              f"{self.figures['ca_cpu_s_per_gateway_idle_hour']} s per gateway per idle hour; "
              f"snapshot {snapshot} B, heartbeat {heartbeat} B")

    def change_cost(self, hubs: list[HubProcess]) -> None:
        """``group set`` of one connected device, --changes times (no kick, one feed change
        each): the time until every gateway's /healthz shows it, and the gateways' CPU per
        change (verify, apply, cache write: what grows with the fleet's size)."""
        times: list[float] = []
        for k in range(self.args.changes):
            versions = [revocation_version(h) for h in hubs]
            returned = provision("group", "set", "--pki", str(self.pki), "--group",
                                 f"bench-{k}", self.devices[k].device_id)
            pending = dict(enumerate(versions))
            while pending and time.monotonic() - returned < 10:
                time.sleep(0.005)
                pending = {i: v for i, v in pending.items()
                           if revocation_version(hubs[i]) <= v}
            times.append(time.monotonic() - returned if not pending else math.inf)
        # The CPU apart, without /healthz polls: the same changes again, a second apart.
        cpu_before = sum(cpu_seconds(h.pid) for h in hubs)
        for k in range(self.args.changes):
            provision("group", "set", "--pki", str(self.pki), "--group", f"bench-again-{k}",
                      self.devices[k].device_id)
            time.sleep(1.0)
        per_change = (sum(cpu_seconds(h.pid) for h in hubs) - cpu_before) / self.args.changes
        self.figures.update({
            "change_to_all_gateways_max_s": _s(max(times)),
            "change_to_all_gateways_p50_s": _s(percentile(times, 50)),
            "gateway_cpu_ms_per_change": round(1000 * per_change / len(hubs), 1)})
        print(f"{len(times)} group changes: every gateway had each within p50 "
              f"{self.figures['change_to_all_gateways_p50_s']} s, max "
              f"{self.figures['change_to_all_gateways_max_s']} s (healthz polled); gateway CPU "
              f"{self.figures['gateway_cpu_ms_per_change']} ms per change each "
              f"({self.state_devices} devices in the state, gateway RSS "
              f"{self.figures['gateway_rss_mib']} MiB with {len(self.devices) // len(hubs)} "
              f"connected, CA service and worker {self.figures['ca_rss_mib']} MiB)")

    def revoke(self) -> list[DeviceCreds]:
        assert self.load is not None
        victims = spread(self.devices, self.args.gateways, self.args.revoke, set())
        ids = [v.device_id for v in victims]
        reader = self.observer()
        _, _, before, _ = reader.get(0)
        called = time.monotonic()
        returned = provision("revoke", "--pki", str(self.pki), "--reason", "keyCompromise",
                             *ids)
        eofs = self.load.wait_eofs(ids, timeout=10)
        _, delta, after, base = reader.get(before or 0)
        _, early = self.load.status()
        ttd = sorted(eofs[d] - returned for d in ids if d in eofs)
        others = sorted(d for d in early if d not in set(ids))
        per_gateway = {}
        for device in victims:
            where = self.where[device.device_id]
            got = per_gateway.setdefault(f"{where[0]}:{where[1]}", [0, 0])
            got[0] += 1
            got[1] += int(device.device_id in eofs)
        p99 = percentile(ttd, 99)
        self.figures.update({
            "revoked": len(ids), "revoked_disconnected": len(ttd),
            "revoke_call_s": round(returned - called, 3),
            "ttd_p50_s": _s(percentile(ttd, 50)), "ttd_p99_s": _s(p99),
            "ttd_max_s": _s(ttd[-1] if ttd else None), "ttd_min_s": _s(ttd[0] if ttd else None),
            "others_disconnected": len(others),
            "revoke_gateways_all_cut": all(a == b for a, b in per_gateway.values()),
            "delta_bytes": delta, "delta_versions": [base, after],
            "bytes_per_gateway_per_revoked_device": round(delta / len(ids), 1),
            # Less what any document costs (a heartbeat: HTTP head, JWS header with x5c).
            "marginal_bytes_per_revoked_device": round(
                (delta - self.figures["heartbeat_bytes"]) / len(ids), 1)})
        print(f"revoke {len(ids)} devices over {len(per_gateway)} gateways in one call "
              f"({returned - called:.2f} s): {len(ttd)} cut off; from the call's return p50 "
              f"{self.figures['ttd_p50_s']} s, p99 {self.figures['ttd_p99_s']} s, max "
              f"{self.figures['ttd_max_s']} s; {len(others)} others disconnected; delta "
              f"{delta} B = {self.figures['bytes_per_gateway_per_revoked_device']} B per "
              f"gateway per revoked device ("
              f"{self.figures['marginal_bytes_per_revoked_device']} B each beyond a "
              "heartbeat's)")
        return victims

    def suspend_resume(self, revoked: list[DeviceCreds]) -> None:
        assert self.load is not None
        chosen = spread(self.devices, self.args.gateways, self.args.suspend,
                        {d.device_id for d in revoked})
        kicks: list[float] = []
        admits: list[float] = []
        for device in chosen:
            d = device.device_id
            returned = provision("suspend", "--pki", str(self.pki), d)
            eof = self.load.wait_eofs([d], timeout=5).get(d)
            kicks.append(math.inf if eof is None else eof - returned)
            returned = provision("resume", "--pki", str(self.pki), d)
            admits.append(self.admitted(device, returned, within=5.0))
        self.figures.update({
            "suspended": len(chosen),
            "suspend_kick_s": [_s(k) for k in kicks], "resume_admit_s": [_s(a) for a in admits],
            "suspend_kick_max_s": _s(max(kicks)), "resume_admit_max_s": _s(max(admits)),
            "suspend_kicked": sum(k != math.inf for k in kicks),
            "resume_admitted": sum(a != math.inf for a in admits)})
        print(f"suspend/resume {len(chosen)} devices: kicked {self.figures['suspend_kicked']}"
              f" (max {self.figures['suspend_kick_max_s']} s after the command), admitted "
              f"again {self.figures['resume_admitted']} (max "
              f"{self.figures['resume_admit_max_s']} s)")

    def admitted(self, device: DeviceCreds, since: float, within: float) -> float:
        """Connect *device* at its gateway until admitted; seconds from *since* (inf: never)."""
        assert self.load is not None
        host, port = self.where[device.device_id]
        deadline = since + within
        while time.monotonic() < deadline:
            [result], _ = self.load.connect(host, port, [device], concurrency=1, timeout=5)
            if result.ok:
                return result.finished - since
        return math.inf

    def tries(self, spares: list[DeviceCreds], revoked: list[DeviceCreds]) -> tuple[int, int]:
        """Each spare must be admitted, each revoked device refused: (admitted, refused)."""
        assert self.load is not None
        admitted = refused = 0
        for device in [*spares, *revoked]:
            host, port = self.where[device.device_id]
            [result], _ = self.load.connect(host, port, [device], concurrency=1, timeout=5)
            if device in spares:
                admitted += int(result.ok)
            else:
                refused += int(not result.ok)
        return admitted, refused

    def outage(self, revoked: list[DeviceCreds]) -> None:
        assert self.ca is not None
        assert self.load is not None
        args, g = self.args, self.args.gateways
        by_gateway = [next(r for r in revoked if self.where[r.device_id] ==
                           self.where[self.devices[k].device_id]) for k in range(g)]
        if args.outage_mode == "pause":
            self.ca.pause()
        else:
            self.ca.stop()
        down = time.monotonic()
        admitted = refused = 0
        for round_ in range(2):
            target = down + args.outage_seconds * (round_ + 1) / 3
            time.sleep(max(0.0, target - time.monotonic()))
            a, r = self.tries(self.spares[round_::SPARES], by_gateway)
            admitted, refused = admitted + a, refused + r
        time.sleep(max(0.0, down + args.outage_seconds - time.monotonic()))
        if args.outage_mode == "pause":
            self.ca.resume()
        else:
            self.ca = self.ca.again()
        up = time.monotonic()
        fresh = spread(self.devices, g, g, {d.device_id for d in revoked}
                       | set(self.load.status()[1]))
        ids = [d.device_id for d in fresh]
        returned = provision("revoke", "--pki", str(self.pki), "--reason", "keyCompromise",
                             *ids)
        eofs = self.load.wait_eofs(ids, timeout=30)
        catch_up = [eofs[d] - returned for d in ids if d in eofs]
        self.figures.update({
            "outage_mode": args.outage_mode, "outage_s": round(up - down, 1),
            "outage_good_admitted": f"{admitted}/{2 * g}",
            "outage_revoked_refused": f"{refused}/{2 * g}",
            "catch_up_max_s": _s(max(catch_up) if len(catch_up) == len(ids) else None),
            "catch_up_cut": f"{len(catch_up)}/{len(ids)}",
            "catch_up_from_ca_ready_max_s": _s(max((eofs[d] - up for d in eofs),
                                                   default=None))})
        print(f"CA {args.outage_mode} for {up - down:.1f} s: good devices admitted "
              f"{admitted}/{2 * g}, revoked refused {refused}/{2 * g}; after it came back, "
              f"{len(catch_up)}/{len(ids)} newly revoked cut off, max "
              f"{self.figures['catch_up_max_s']} s from the revoke's return")


def revocation_version(hub: HubProcess) -> int:
    """The hub's revocation version on /healthz (it grows with every change it takes)."""
    url = f"http://127.0.0.1:{hub.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(json.loads(response.read())["revocation_version"])
    except urllib.error.HTTPError as failure:  # 503 still has the body
        with failure:
            return int(json.loads(failure.read())["revocation_version"])


def _s(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else round(value, 3)


def verdict(f: dict[str, Any]) -> dict[str, bool]:
    g = f["gateways"]
    return {
        "revocation": (f["revoked_disconnected"] == f["revoked"] and f["others_disconnected"]
                       == 0 and f["ttd_p99_s"] is not None and f["ttd_p99_s"] <= TARGET_P99_S),
        "revocation_moonshot": f["ttd_p99_s"] is not None and f["ttd_p99_s"] <= MOONSHOT_P99_S,
        "suspend_resume": (f["suspend_kicked"] == f["resume_admitted"] == f["suspended"]
                           and f["suspend_kick_max_s"] <= TARGET_SUSPEND_S
                           and f["resume_admit_max_s"] <= TARGET_SUSPEND_S),
        "outage": (f["outage_good_admitted"] == f"{2 * g}/{2 * g}"
                   and f["outage_revoked_refused"] == f"{2 * g}/{2 * g}"),
        "catch_up": (f["catch_up_max_s"] is not None
                     and f["catch_up_max_s"] <= TARGET_CATCH_UP_S),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=10)
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--revoke", type=int, default=100)
    parser.add_argument("--suspend", type=int, default=10)
    parser.add_argument("--changes", type=int, default=5, help="group changes timed")
    parser.add_argument("--registered-extra", type=int, default=0, metavar="N",
                        help="N more devices enrolled, never connected: a bigger fleet state")
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--outage-mode", choices=("stop", "pause"), default="stop")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder parent")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    if not 0 < args.revoke + args.suspend + args.gateways < args.devices:
        parser.error("--devices must exceed --revoke + --suspend + --gateways")
    raise_nofile()
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-multi-gateway-", dir=args.dir))
    try:
        figures = Bench(args, root).run()
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    figures["runtime_s"] = round(time.monotonic() - began, 1)
    met = verdict(figures)
    print("targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in met.items())
          + f" (revocation p99 <= {TARGET_P99_S} s, moonshot {MOONSHOT_P99_S} s; suspend and "
          f"resume <= {TARGET_SUSPEND_S} s; catch-up <= {TARGET_CATCH_UP_S} s); total "
          f"{figures['runtime_s']} s")
    print(json.dumps({"bench": "multi_gateway", "met": met, **figures}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
