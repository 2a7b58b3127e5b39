"""Scale: 10,000 mutual-TLS devices against the hub and stock amqtt, side by side in one run.

One fleet PKI (10,000 device certificates, each its own P-256 key, plus one monitor device in
the ``operators`` group) is built once and cached under ``--work``; each run copies its PKI
folder (revocation changes the registry) and starts, one after the other and each alone on the
machine while measured,

- the hub: ``fleet-hub serve --config hub.toml`` with every check on (registry and CRL
  revocation, ``refresh_seconds = 1``, client-id match, ACL, audit store, metrics);
- stock amqtt 0.12.1 as shipped: ``amqtt -c stock.yaml`` (its own TLS listener, anonymous).

The load (see _mqtt_load.py) is a fresh process per broker, one uvloop loop. For each broker:

1. **connect**: all devices connect (``--concurrency`` in flight) and each SUBSCRIBEs at QoS 0
   to ``devices/{id}/cmd`` and waits for SUBACK; the monitor subscribes to
   ``devices/+/telemetry`` (the hub's ACL grants it through the operators group). Broker RSS
   settled before and after: per device = (after - before) / connected (target <= 40 KB,
   1 KB = 1000 bytes).
2. **throughput**: ``--publishers`` of the connected devices publish QoS 0 to
   ``devices/{own id}/telemetry`` (64-byte payload, ``--per-write`` packets per TLS write) as
   fast as their TLS transports take it, but never more than ``--in-flight`` messages sent and
   not yet received by the monitor (without that window the loopback sockets' kernel buffers
   queue minutes of a slow broker's work, still being digested in the next phase); after
   ``--warmup`` s the monitor's received PUBLISH packets are counted for ``--window`` s
   (target >= 50,000 delivered/s and >= 10x stock). Sent/s, what was still undelivered once
   the stream went quiet for 2 s (at most ``--drain`` s: for a slow broker that is the
   window still queued, not a loss), the hub's own message counters, and the CPU of broker,
   load and every other process on the machine are reported with it.
3. **storm**: every connection is dropped at once (TCP close, no DISCONNECT: a rebooting
   gateway), the broker is given time to see them go (its accepted sockets in /proc/net/tcp)
   and to go idle (at most 60 s), then all devices reconnect with ``--storm-concurrency`` in
   flight and resubscribe (target: all admitted, no failure, connect p99 < 10 s, connects/s
   >= 1.5x stock; connects/s = admitted / time from the first attempt to the last CONNACK;
   the monitor stays out). A connect's
   latency runs from its TCP connect to its CONNACK (TCP, TLS handshake, CONNECT->CONNACK);
   the p99 counted from the storm's start (queueing behind the in-flight limit included) is
   reported too.
4. **revocation** (hub only: stock amqtt cannot kick): with every device connected, ``--revoke``
   of them (every N/R-th) are revoked at once through the provisioning library
   (``Authority.revoke_many``: one transaction, one CRL), and for each the time from the
   commit (the call's return) to the load seeing the server close its connection is measured
   (target p99 < 1 s), and every other device must stay connected.

Prints a table, the hub/stock ratios, and ends with one JSON line of every figure with a
``met`` boolean per target.

    .venv/bin/python bench/scale.py [--devices 10000] [--window 10] [--skip-stock]
        [--work DIR (cache; default a temporary folder)]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _brokers import (
    BrokerProcess,
    build_fleet,
    enroll,
    hub_config,
    stock_config,
)
from _mqtt_load import (
    DeviceCreds,
    LoadProcess,
    cpu_seconds,
    percentile,
    raise_nofile,
    rss_kib,
    server_connections,
    settled_rss_kib,
    summarize,
)

from device_sim.lab import free_port
from provisioning.authority import Authority

HOST = "127.0.0.1"
MONITOR_ID = "ops-monitor"
MONITOR_GROUP = "operators"  # hub_config: [acl.groups.operators] subscribe = ["#"]
CMD_FILTER = "devices/{id}/cmd"
TELEMETRY_FILTER = "devices/+/telemetry"
REFRESH_S = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_MSGS_PER_S = 50_000.0
TARGET_MSGS_RATIO = 10.0
TARGET_RSS_KB = 40.0
TARGET_STORM_P99_S = 10.0
TARGET_STORM_RATIO = 1.5
TARGET_REVOKE_P99_S = 1.0


# -- the fleet, cached ------------------------------------------------------------------------


def cached_fleet(work: Path, count: int) -> tuple[Path, list[DeviceCreds], DeviceCreds, bool]:
    """The pristine fleet for *count* devices under *work*: PKI, devices, monitor, was cached."""
    cache = work / f"fleet-{count}"
    marker = cache / "fleet.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        devices = [DeviceCreds(**d) for d in meta["devices"]]
        return cache / "pki", devices, DeviceCreds(**meta["monitor"]), True
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    pki, devices = build_fleet(cache, count)
    (monitor,) = enroll(pki, cache / "devices", [MONITOR_ID], group=MONITOR_GROUP)
    marker.write_text(json.dumps({"devices": [_creds(d) for d in devices],
                                  "monitor": _creds(monitor)}))
    return pki, devices, monitor, False


def _creds(d: DeviceCreds) -> dict[str, str]:
    return {"device_id": d.device_id, "cert": d.cert, "key": d.key}


def run_folder(work: Path, pristine_pki: Path) -> Path:
    """A folder for this run with its own copy of the PKI (the registry gets revocations)."""
    root = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    shutil.copytree(pristine_pki, root / "pki")
    return root


# -- one broker -------------------------------------------------------------------------------


def metrics_url(broker: BrokerProcess) -> str | None:
    for line in broker.lines:
        match = re.search(r"fleet-hub ready: .*metrics on ([\w.\[\]:-]+:\d+)", line)
        if match:
            return f"http://{match[1]}/metrics"
    return None


def hub_message_metrics(broker: BrokerProcess) -> dict[str, float]:
    """The hub's message counters (received, delivered, dropped) from /metrics, if any."""
    url = metrics_url(broker)
    if url is None:
        return {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fleet_hub_") and ("messages" in line or "dropped" in line):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat, all but idle and
    iowait): with the broker's and the load's own, tells how much else ran meanwhile."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def wait_idle(pid: int, at_most: float, busy_below: float = 0.2) -> float:
    """Wait (at least 1 s, at most *at_most*) until *pid* used under *busy_below* of a core
    over a second; how long it took."""
    t0 = time.monotonic()
    while True:
        c0 = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - c0 < busy_below or time.monotonic() - t0 >= at_most:
            return time.monotonic() - t0


def phase_connect(broker: BrokerProcess, load: LoadProcess, devices: list[DeviceCreds],
                  monitor: DeviceCreds, concurrency: int) -> dict[str, Any]:
    idle = settled_rss_kib(broker.pid, at_least=2.0)
    cpu0 = cpu_seconds(broker.pid)
    results, load_cpu = load.connect(HOST, broker.port, devices, concurrency=concurrency,
                                     timeout=60.0, subscribe=CMD_FILTER, reuse_contexts=True)
    mon, _ = load.connect(HOST, broker.port, [monitor], concurrency=1, timeout=30.0,
                          subscribe=TELEMETRY_FILTER, reuse_contexts=True)
    cpu1 = cpu_seconds(broker.pid)
    f = summarize(results)
    loaded = settled_rss_kib(broker.pid, at_least=3.0, at_most=20.0)
    connected = f["connected"]
    per_kib = (loaded - idle) / connected if connected else None
    subacks = [r.suback for r in results if r.ok and r.suback is not None]
    return {
        "devices": len(devices), "connected": connected, "failures": f["failures"],
        "failure_kinds": f["failure_kinds"], "connects_per_s": f["connects_per_s"],
        "wall_s": f["wall_s"], "connack_p99_ms": f["total_p99_ms"],
        "suback_p99_ms": _ms(percentile(subacks, 99)),
        "monitor_subscribed": bool(mon and mon[0].ok), "monitor_error": mon[0].error,
        "broker_cpu_s": round(cpu1 - cpu0, 2), "load_cpu_s": round(load_cpu, 2),
        "rss_idle_kib": idle, "rss_connected_kib": loaded,
        "rss_per_device_kib": _r(per_kib, 2),
        "rss_per_device_kb": _r(None if per_kib is None else per_kib * 1.024, 2),
        "load_rss_kib": load.rss_kib(),
        "ok_ids": [r.device_id for r in results if r.ok],
    }


def phase_throughput(broker: BrokerProcess, load: LoadProcess, ok_ids: list[str],
                     args: argparse.Namespace) -> dict[str, Any]:
    publishers, warmup, window = args.publishers, args.warmup, args.window
    step = max(1, len(ok_ids) // publishers) if publishers else 1
    chosen = ok_ids[::step][:publishers]
    started = load.publish_start(chosen, payload_size=64, per_write=args.per_write,
                                 max_in_flight=args.in_flight)
    time.sleep(warmup)
    c0, b0, m0 = load.counters(), cpu_seconds(broker.pid), machine_busy_s()
    time.sleep(window)
    c1, b1, m1 = load.counters(), cpu_seconds(broker.pid), machine_busy_s()
    stopped = load.publish_stop()
    last = stopped["received"]
    quiet_since = time.monotonic()
    drain_start = quiet_since
    while time.monotonic() - drain_start < args.drain:
        time.sleep(0.25)
        now = load.counters()["received"]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 2.0:
            break
    drained_s = time.monotonic() - drain_start
    span = c1["t"] - c0["t"]
    received = c1["received"] - c0["received"]
    sent = c1["sent"] - c0["sent"]
    total_sent = stopped["sent"]
    undelivered = total_sent - last
    return {
        "publishers": started, "payload_bytes": 64, "window_s": round(span, 2),
        "delivered_per_s": round(received / span, 1),
        "sent_per_s": round(sent / span, 1),
        "sent_total": int(total_sent), "received_total": int(last),
        "undelivered_after_drain": int(undelivered),
        "undelivered_pct": round(100 * undelivered / total_sent, 2) if total_sent else None,
        "drain_s": round(drained_s, 1), "in_flight_cap": args.in_flight,
        "per_write": args.per_write, "written_off_stalled": int(stopped["written_off"]),
        "broker_cpu_pct": round(100 * (b1 - b0) / span, 1),
        "load_cpu_pct": round(100 * (c1["cpu"] - c0["cpu"]) / span, 1),
        "other_processes_cpu_pct": round(100 * ((m1 - m0) - (b1 - b0) - (c1["cpu"] - c0["cpu"]))
                                         / span, 1),
        "broker_rss_after_kib": rss_kib(broker.pid),
        "load_rss_kib": load.rss_kib(),
    }


def phase_storm(broker: BrokerProcess, load: LoadProcess, devices: list[DeviceCreds],
                concurrency: int, timeout: float) -> dict[str, Any]:
    dropped = load.abort_all()
    t0 = time.monotonic()
    remaining = server_connections(broker.port)
    while remaining and time.monotonic() - t0 < 120:
        time.sleep(0.2)
        remaining = server_connections(broker.port)
    seen_s = time.monotonic() - t0
    idle_s = wait_idle(broker.pid, 60.0)  # e.g. a slow broker still digesting the telemetry
    cpu0, m0 = cpu_seconds(broker.pid), machine_busy_s()
    results, load_cpu = load.connect(HOST, broker.port, devices, concurrency=concurrency,
                                     timeout=timeout, subscribe=CMD_FILTER,
                                     reuse_contexts=True)
    cpu1, m1 = cpu_seconds(broker.pid), machine_busy_s()
    f = summarize(results)
    subacks = [r.suback for r in results if r.ok and r.suback is not None]
    first = min((r.started for r in results), default=0.0)
    from_start = [r.finished - first for r in results if r.ok]
    return {
        "dropped": dropped, "broker_saw_them_go_s": round(seen_s, 2),
        "broker_idle_after_s": round(idle_s, 1),
        "broker_sockets_left": remaining,
        "concurrency": concurrency, "devices": len(devices), "admitted": f["connected"],
        "failures": f["failures"], "failure_kinds": f["failure_kinds"],
        "connects_per_s": f["connects_per_s"], "wall_s": f["wall_s"],
        "p50_s": _s(f["total_p50_ms"]), "p99_s": _s(f["total_p99_ms"]),
        "max_s": round(max((r.total for r in results if r.ok), default=0.0), 3),
        "from_start_p99_s": _r(percentile(from_start, 99), 3),
        "tcp_p99_s": _s(f["tcp_p99_ms"]), "tls_p99_s": _s(f["tls_p99_ms"]),
        "connack_phase_p99_s": _s(f["connack_p99_ms"]),
        "suback_p99_s": _r(percentile(subacks, 99), 3),
        "broker_cpu_s": round(cpu1 - cpu0, 2), "load_cpu_s": round(load_cpu, 2),
        "other_processes_cpu_s": round((m1 - m0) - (cpu1 - cpu0) - load_cpu, 2),
        "ok_ids": [r.device_id for r in results if r.ok],
    }


def revoke_loop(pki: Path, device_ids: list[str]) -> tuple[dict[str, float], list[float], float]:
    """Revoke them all at once: ``Authority.revoke_many`` (one registry transaction and one
    signed CRL, as ``fleet-provision revoke D1 D2 ...``); the commit time (the call's return)
    for each, the call's seconds, when it began."""
    with Authority(pki) as authority:
        _ = authority.ca  # load the issuing key before the clock starts
        started = time.monotonic()
        authority.revoke_many(device_ids, "keyCompromise")
        done = time.monotonic()
    return dict.fromkeys(device_ids, done), [done - started], started


def phase_revocation(broker: BrokerProcess, load: LoadProcess, pki: Path, ok_ids: list[str],
                     count: int) -> dict[str, Any]:
    time.sleep(2 * REFRESH_S + 0.5)  # the hub's watcher has seen the fleet as it is now
    open_before, early = load.status()
    step = max(1, len(ok_ids) // count)
    victims = ok_ids[::step][:count]
    victim_set = set(victims)
    cpu0 = cpu_seconds(broker.pid)
    committed, durations, started = revoke_loop(pki, victims)
    revoke_s = time.monotonic() - started
    eofs = load.wait_eofs(victims, timeout=15.0)
    cpu1 = cpu_seconds(broker.pid)
    time.sleep(2 * REFRESH_S + 0.5)  # anyone wrongly kicked would be by now
    open_after, all_eofs = load.status()
    ttd = sorted(eofs[d] - committed[d] for d in victims if d in eofs)
    from_first = sorted(eofs[d] - started for d in victims if d in eofs)
    others = set(ok_ids) - victim_set - early.keys()
    wrongly = sorted(d for d in all_eofs if d not in victim_set)
    return {
        "connected_before": open_before, "closed_before_revoke": len(early),
        "revoked": len(victims), "disconnected": len(ttd),
        "not_disconnected": len(victims) - len(ttd),
        "ttd_p50_s": _r(percentile(ttd, 50), 3), "ttd_p99_s": _r(percentile(ttd, 99), 3),
        "ttd_max_s": _r(ttd[-1] if ttd else None, 3),
        "ttd_min_s": _r(ttd[0] if ttd else None, 3),
        "last_eof_after_first_revoke_s": _r(from_first[-1] if from_first else None, 3),
        "revoke_total_s": round(revoke_s, 3),
        "revoke_call_p50_ms": _r(1000 * (percentile(durations, 50) or 0.0), 1),
        "revoke_call_max_ms": _r(1000 * max(durations), 1),
        "others_expected_open": len(others), "others_open": len(others - all_eofs.keys()),
        "others_wrongly_closed": len(wrongly), "open_after": open_after,
        "broker_cpu_s": round(cpu1 - cpu0, 2),
    }


def measure(name: str, start: Callable[[], BrokerProcess], ca: Path, devices: list[DeviceCreds],
            monitor: DeviceCreds, args: argparse.Namespace,
            revoke_pki: Path | None) -> dict[str, Any]:
    """Every phase against one broker, with a fresh load process; the broker is stopped after."""
    out: dict[str, Any] = {"broker": name}
    broker = start()
    try:
        with LoadProcess(ca) as load:
            _progress(f"{name}: connecting {len(devices)} devices + monitor")
            c = phase_connect(broker, load, devices, monitor, args.concurrency)
            ok_ids = c.pop("ok_ids")
            out["connect"] = c
            _progress(f"{name}: {c['connected']} connected; throughput for {args.window} s")
            if "throughput" in args.phases and c["monitor_subscribed"] and ok_ids:
                t = phase_throughput(broker, load, ok_ids, args)
                if broker.name == "hub":
                    t["hub_metrics"] = hub_message_metrics(broker)
                out["throughput"] = t
            else:
                out["throughput"] = None
            if "storm" in args.phases:
                _progress(f"{name}: reconnect storm")
                s = phase_storm(broker, load, devices, args.storm_concurrency,
                                args.storm_timeout)
                ok_ids = s.pop("ok_ids")
                out["storm"] = s
            if "revocation" in args.phases and revoke_pki is not None \
                    and broker.process.poll() is None:
                _progress(f"{name}: revoking {args.revoke} of {len(ok_ids)} connected")
                out["revocation"] = phase_revocation(broker, load, revoke_pki, ok_ids,
                                                     args.revoke)
            load.close_all()
    finally:
        out["broker_alive_at_end"] = broker.process.poll() is None
        broker.stop()
        errors = [ln.rstrip() for ln in broker.lines
                  if "Traceback" in ln or " ERROR " in ln or "ERROR:" in ln]
        out["broker_error_lines"] = len(errors)
        out["broker_error_sample"] = errors[:5]
    return out


# -- report -----------------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(f"   .. {text}", flush=True)


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _s(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _get(f: dict[str, Any] | None, *path: str) -> Any:
    value: Any = f
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return None
    return round(a / b, 2)


ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("connect: connected", ("connect", "connected")),
    ("connect: failures", ("connect", "failures")),
    ("connect: connects/s", ("connect", "connects_per_s")),
    ("connect: SUBACK p99 ms", ("connect", "suback_p99_ms")),
    ("RSS idle KiB", ("connect", "rss_idle_kib")),
    ("RSS connected KiB", ("connect", "rss_connected_kib")),
    ("RSS per device KB", ("connect", "rss_per_device_kb")),
    ("QoS0 delivered msg/s", ("throughput", "delivered_per_s")),
    ("QoS0 sent msg/s", ("throughput", "sent_per_s")),
    ("QoS0 undelivered+drain %", ("throughput", "undelivered_pct")),
    ("QoS0 broker CPU %", ("throughput", "broker_cpu_pct")),
    ("QoS0 load CPU %", ("throughput", "load_cpu_pct")),
    ("QoS0 other processes CPU %", ("throughput", "other_processes_cpu_pct")),
    ("QoS0 broker RSS after KiB", ("throughput", "broker_rss_after_kib")),
    ("storm: broker saw drop s", ("storm", "broker_saw_them_go_s")),
    ("storm: broker idle after s", ("storm", "broker_idle_after_s")),
    ("storm: admitted", ("storm", "admitted")),
    ("storm: failures", ("storm", "failures")),
    ("storm: p50 s", ("storm", "p50_s")),
    ("storm: p99 s", ("storm", "p99_s")),
    ("storm: max s", ("storm", "max_s")),
    ("storm: p99 s from its start", ("storm", "from_start_p99_s")),
    ("storm: connects/s", ("storm", "connects_per_s")),
    ("storm: broker CPU s", ("storm", "broker_cpu_s")),
    ("storm: load CPU s", ("storm", "load_cpu_s")),
    ("storm: other processes CPU s", ("storm", "other_processes_cpu_s")),
    ("revocation: revoked", ("revocation", "revoked")),
    ("revocation: disconnected", ("revocation", "disconnected")),
    ("revocation: TTD p50 s", ("revocation", "ttd_p50_s")),
    ("revocation: TTD p99 s", ("revocation", "ttd_p99_s")),
    ("revocation: TTD max s", ("revocation", "ttd_max_s")),
    ("revocation: revoke loop s", ("revocation", "revoke_total_s")),
    ("revocation: others open", ("revocation", "others_open")),
    ("revocation: wrongly closed", ("revocation", "others_wrongly_closed")),
]


def print_table(hub: dict[str, Any], stock: dict[str, Any] | None) -> None:
    print(f"\n{'':<28}{'fleet-hub':>14}{'stock amqtt':>14}{'hub/stock':>11}")
    for label, path in ROWS:
        h, s = _get(hub, *path), _get(stock, *path)
        if h is None and s is None:
            continue
        ratio = _ratio(h, s) if label.endswith(("msg/s", "connects/s", "KB")) else None
        print(f"{label:<28}{_fmt(h):>14}{_fmt(s):>14}{_fmt(ratio):>11}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _with_ratio(met_absolute: bool, ratio: float | None, target: float) -> dict[str, Any]:
    """A target with an absolute part and a ratio to stock; no stock run: the ratio is
    unknown (None) and does not fail the target."""
    met_ratio = None if ratio is None else ratio >= target
    return {"ratio": ratio, "met_absolute": met_absolute, "met_ratio": met_ratio,
            "met": met_absolute and met_ratio is not False}


def targets(hub: dict[str, Any], stock: dict[str, Any] | None, n: int,
            revoke: int) -> dict[str, Any]:
    delivered = _get(hub, "throughput", "delivered_per_s")
    msgs_ratio = _ratio(delivered, _get(stock, "throughput", "delivered_per_s"))
    storm_ratio = _ratio(_get(hub, "storm", "connects_per_s"),
                         _get(stock, "storm", "connects_per_s"))
    rss = _get(hub, "connect", "rss_per_device_kb")
    storm_p99 = _get(hub, "storm", "p99_s")
    ttd_p99 = _get(hub, "revocation", "ttd_p99_s")
    rev = hub.get("revocation") or {}
    throughput_met = delivered is not None and delivered >= TARGET_MSGS_PER_S
    storm_met = (_get(hub, "storm", "admitted") == n and _get(hub, "storm", "failures") == 0
                 and storm_p99 is not None and storm_p99 < TARGET_STORM_P99_S)
    return {
        "throughput": {"target": f">= {TARGET_MSGS_PER_S:,.0f} msg/s delivered and >= "
                                 f"{TARGET_MSGS_RATIO:g}x stock",
                       "hub_per_s": delivered,
                       **_with_ratio(throughput_met, msgs_ratio, TARGET_MSGS_RATIO)},
        "rss": {"target": f"<= {TARGET_RSS_KB:g} KB per device", "hub_kb": rss,
                "met": rss is not None and rss <= TARGET_RSS_KB},
        "storm": {"target": f"{n} admitted, 0 failures, p99 < {TARGET_STORM_P99_S:g} s, "
                            f"connects/s >= {TARGET_STORM_RATIO:g}x stock",
                  "hub_p99_s": storm_p99,
                  **_with_ratio(storm_met, storm_ratio, TARGET_STORM_RATIO)},
        "revocation": {"target": f"revoke {revoke} at once, p99 time to disconnect < "
                                 f"{TARGET_REVOKE_P99_S:g} s, the others stay connected",
                       "hub_p99_s": ttd_p99,
                       "met": (ttd_p99 is not None and ttd_p99 < TARGET_REVOKE_P99_S
                               and rev.get("not_disconnected") == 0
                               and rev.get("others_wrongly_closed") == 0)},
    }


def print_targets(t: dict[str, Any], stock_ran: bool) -> None:
    print()
    for name, v in t.items():
        verdict = "MET" if v["met"] else "NOT MET"
        if not stock_ran and "ratio" in v:
            verdict += " (ratio not checked: --skip-stock)"
        extra = f", hub/stock {v['ratio']}x" if v.get("ratio") is not None else ""
        figure = next((v[k] for k in v if k.startswith("hub_")), None)
        print(f"{name:<11} {v['target']}: hub {figure}{extra}: {verdict}")


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the cached fleet and the run (default: a temporary "
                             "folder, removed after)")
    parser.add_argument("--window", type=float, default=10.0, help="throughput window, s")
    parser.add_argument("--warmup", type=float, default=2.0, help="before the window, s")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="at most this long for the stream to drain after the window, s")
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--per-write", type=int, default=32,
                        help="PUBLISH packets per TLS write")
    parser.add_argument("--in-flight", type=int, default=50_000,
                        help="publishers pause while this many messages are sent and not yet "
                             "received by the monitor (0: only TCP flow control)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="connects in flight for the initial connect")
    parser.add_argument("--storm-concurrency", type=int, default=1000)
    parser.add_argument("--storm-timeout", type=float, default=60.0,
                        help="per connect in the storm, s")
    parser.add_argument("--revoke", type=int, default=None,
                        help="devices to revoke (default: a tenth, 1,000 of 10,000)")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--phases", type=lambda v: set(v.split(",")),
                        default={"throughput", "storm", "revocation"},
                        help="after the connect, which of throughput,storm,revocation to run "
                             "(default all; targets of skipped phases are not met)")
    parser.add_argument("--keep", action="store_true", help="keep this run's folder")
    args = parser.parse_args(argv)
    if args.revoke is None:
        args.revoke = max(1, args.devices // 10)
    if not 0 < args.revoke <= args.devices:
        parser.error("--revoke must be between 1 and --devices")

    nofile = raise_nofile()  # the brokers, started from here, inherit it
    began = time.monotonic()
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench-scale-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    run: Path | None = None
    try:
        t0 = time.monotonic()
        pristine, devices, monitor, cached = cached_fleet(work, args.devices)
        how = "from the cache" if cached else "enrolled"
        print(f"fleet: {len(devices)} devices + monitor {how}"
              f" in {time.monotonic() - t0:.1f} s ({work}); RLIMIT_NOFILE {nofile}",
              flush=True)
        run = run_folder(work, pristine)
        pki = run / "pki"
        hub_toml = hub_config(run, refresh_seconds=REFRESH_S)
        stock_yaml = stock_config(run, pki, free_port())
        ca = pki / "ca-chain.pem"
        print("== fleet-hub (uvloop, every check on)", flush=True)
        hub = measure("hub", lambda: BrokerProcess.hub(hub_toml), ca, devices, monitor, args,
                      pki)
        stock: dict[str, Any] | None = None
        if not args.skip_stock:
            time.sleep(2.0)
            print("== stock amqtt 0.12.1 (asyncio, TLS, anonymous)", flush=True)
            stock = measure("stock", lambda: BrokerProcess.stock(stock_yaml), ca, devices,
                            monitor, args, None)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        elif run is not None and not args.keep:
            shutil.rmtree(run, ignore_errors=True)

    print_table(hub, stock)
    for f in (hub, stock):
        if f is None:
            continue
        kinds = {k: _get(f, k, "failure_kinds") for k in ("connect", "storm")}
        kinds = {k: v for k, v in kinds.items() if v}
        if kinds:
            print(f"{f['broker']} failure kinds: {kinds}")
        if f["broker_error_lines"]:
            print(f"{f['broker']} stderr: {f['broker_error_lines']} error lines, e.g. "
                  f"{f['broker_error_sample'][:2]}")
        if not f["broker_alive_at_end"]:
            print(f"{f['broker']} DIED during the run")
    met = targets(hub, stock, args.devices, args.revoke)
    print_targets(met, stock is not None)
    total = time.monotonic() - began
    print(f"total runtime {total:.0f} s")
    print(json.dumps({
        "bench": "scale", "devices": args.devices, "window_s": args.window,
        "publishers": args.publishers, "concurrency": args.concurrency,
        "storm_concurrency": args.storm_concurrency, "revoke": args.revoke,
        "refresh_seconds": REFRESH_S, "skip_stock": args.skip_stock,
        "hub": hub, "stock": stock, "targets": met,
        "met": {k: v["met"] for k, v in met.items()},
        "runtime_s": round(total, 1),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
