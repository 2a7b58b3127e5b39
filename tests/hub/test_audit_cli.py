"""fleet-hub events verify / prune / --follow and fleet-hub audit, as real processes."""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from hub.audit import AuditStore, read_records
from tests.integration.fleet import Fleet

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture
def config(fleet: Fleet, tmp_path: Path) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(f"""
[listener]
bind = "127.0.0.1:8883"
server_cert = "{fleet.pki}/server.pem"
server_key = "{fleet.pki}/server.key"
client_ca = "{fleet.ca}"
[revocation]
registry = "{fleet.pki}/registry.db"
[audit]
path = "{tmp_path}/hub-audit.db"
""")
    return path


@pytest.fixture
def store(config: Path) -> Iterator[AuditStore]:
    opened = AuditStore(config.parent / "hub-audit.db", flush_interval=0.01)
    opened.open()
    yield opened
    opened.close()


def hub(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=60)


def fill(store: AuditStore, count: int) -> None:
    for i in range(count):
        store.record("accept", device_id=f"dev-{i}", serial=f"{i:02x}", peer="192.0.2.1:1")
    store.flush()


# -- events verify / prune ------------------------------------------------------------------


def test_verify_says_ok_then_names_an_edit_with_exit_1(config: Path, store: AuditStore) -> None:
    fill(store, 30)
    done = hub("events", "verify", "--config", config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("audit chain ok: 30 records #1..#30 (")
    with sqlite3.connect(config.parent / "hub-audit.db") as conn:
        conn.execute("UPDATE events SET reason = 'edited' WHERE id = 12")
    conn.close()
    done = hub("events", "verify", "--config", config)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: audit chain broken at record #12 (")
    assert done.stderr.endswith(f"({config.parent / 'hub-audit.db'})\n")
    assert done.stderr.count("\n") == 1
    as_json = hub("events", "verify", "--config", config, "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert (report["ok"], report["records"], report["problem"]["record_id"]) == (False, 11, 12)


def test_verify_usage_errors_exit_2(config: Path, store: AuditStore) -> None:
    fill(store, 1)
    done = hub("events", "verify", "--config", config, "--anchor", "12:nothex")
    assert (done.returncode, done.stderr) == (
        2, "error: --anchor: want ID:HASH (a record id, 64 hex digits), got '12:nothex'\n")
    missing = hub("events", "verify")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: --config: missing")


def test_group_options_before_the_subcommand(config: Path, store: AuditStore) -> None:
    """`events --config X verify` works like `events verify --config X` (also --json);
    the listing's own options with a subcommand are a usage error."""
    fill(store, 2)
    done = hub("events", "--config", config, "--json", "verify")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["records"] == 2
    wrong = hub("events", "--config", config, "--device", "d1", "verify")
    assert (wrong.returncode, wrong.stderr) == (
        2, "error: --device: does not apply to `events verify`\n")


def test_verify_with_an_anchor_from_a_follow_line(config: Path, store: AuditStore) -> None:
    fill(store, 5)
    last = read_records(config.parent / "hub-audit.db")[-1]
    done = hub("events", "verify", "--config", config, "--anchor", f"{last.id}:{last.hash}")
    assert done.returncode == 0, done.stderr
    assert "1 anchor(s) match" in done.stdout


def test_prune_then_verify(config: Path, store: AuditStore) -> None:
    """prune --before: a one-line summary; verify then counts the checkpoint."""
    fill(store, 20)
    done = hub("events", "prune", "--config", config, "--before", "2999-01-01")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 20 records #1..#20 (older than 2999-01-01T00:00:00")
    assert "checkpoint #1 (" in done.stdout
    assert done.stdout.endswith("signed; 0 records kept\n")
    fill(store, 3)
    done = hub("events", "verify", "--config", config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("audit chain ok: 3 records #21..#23")
    assert "1 signed checkpoint(s), 20 records pruned" in done.stdout
    nothing = hub("events", "prune", "--config", config, "--before", "1d")
    assert (nothing.returncode, nothing.stdout.split(":")[0]) == (0, "nothing to prune")


def test_prune_refuses_a_broken_chain_with_exit_1(config: Path, store: AuditStore) -> None:
    fill(store, 10)
    with sqlite3.connect(config.parent / "hub-audit.db") as conn:
        conn.execute("DELETE FROM events WHERE id = 4")
    conn.close()
    done = hub("events", "prune", "--config", config, "--before", "2999-01-01")
    assert done.returncode == 1
    assert done.stderr.startswith("error: not pruning: the audit chain is broken at record #4:")
    assert len(read_records(config.parent / "hub-audit.db")) == 9


def test_prune_needs_before_and_a_time(config: Path, store: AuditStore) -> None:
    fill(store, 1)
    assert hub("events", "prune", "--config", config).returncode == 2
    bad = hub("events", "prune", "--config", config, "--before", "soon")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --before: 'soon' is not a time")


def test_events_keeps_its_options_and_output(config: Path, store: AuditStore) -> None:
    """The group's own command is the old `events`: --device, --since, --json as before."""
    fill(store, 3)
    done = hub("events", "--config", config, "--device", "dev-1", "--json", "--since", "1h")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert set(row) == {"time", "event", "device_id", "serial", "peer", "reason", "evidence"}
    assert row["device_id"] == "dev-1"
    text = hub("events", "--config", config)
    assert len(text.stdout.splitlines()) == 3
    assert text.stdout.splitlines()[0].split()[1:3] == ["accept", "dev-0"]


# -- events --follow ------------------------------------------------------------------------


class Follower:
    """A `fleet-hub events --follow` process, its stdout lines read by a thread."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "events", "--config", str(config), "--follow",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                       daemon=True)
        self.reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_started(self) -> str:
        """The stderr line that says from which record on everything will be printed."""
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("fleet-hub events: following "), line
        return line

    def take(self, count: int) -> list[str]:
        return [self.lines.get(timeout=TIMEOUT) for _ in range(count)]

    def stop(self, how: signal.Signals = signal.SIGTERM) -> int:
        """Signal it (if still running), wait; its stderr is kept in ``self.stderr``."""
        if self.proc.poll() is None:
            self.proc.send_signal(how)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(TIMEOUT)
            assert self.proc.stderr is not None
            self.stderr = self.proc.stderr.read()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def test_follow_json_streams_new_records_as_they_are_committed(
        config: Path, store: AuditStore) -> None:
    """From now: the records already there are not printed, each new one is, once, in order,
    as one JSON object per line with its id and hash; SIGTERM ends it with exit 0."""
    fill(store, 4)
    follower = Follower(config, "--json")
    try:
        assert follower.wait_started().rstrip().endswith("after record #4")
        store.record("finding", device_id="dev-9", reason="weak-key", evidence={"bits": 1024})
        store.flush()
        [first] = follower.take(1)
        line = json.loads(first)
        assert list(line) == ["id", "time", "event", "device_id", "serial", "peer", "reason",
                              "evidence", "hash"]
        assert (line["id"], line["event"], line["evidence"]) == (5, "finding", {"bits": 1024})
        fill(store, 1500)  # more than one page
        got = [json.loads(text) for text in follower.take(1500)]
        assert [row["id"] for row in got] == list(range(6, 1506))
        stored = {r.id: r.hash for r in read_records(config.parent / "hub-audit.db")}
        assert all(row["hash"] == stored[row["id"]] for row in got)
        assert follower.lines.empty()
    finally:
        code = follower.stop()
    assert code == 0
    assert follower.stderr == ""


def test_follow_since_starts_with_older_records_and_sigint_ends_it(
        config: Path, store: AuditStore) -> None:
    fill(store, 3)
    follower = Follower(config, "--json", "--since", "1h", "--device", "dev-1")
    try:
        follower.wait_started()
        [old] = follower.take(1)
        assert json.loads(old)["id"] == 2
        fill(store, 3)
        [new] = follower.take(1)
        assert json.loads(new)["id"] == 5
    finally:
        code = follower.stop(signal.SIGINT)
    assert code == 0


def test_follow_text_lines_like_events(config: Path, store: AuditStore) -> None:
    follower = Follower(config)
    try:
        follower.wait_started()
        fill(store, 2)
        lines = follower.take(2)
    finally:
        follower.stop()
    assert [line.split()[1:3] for line in lines] == [["accept", "dev-0"], ["accept", "dev-1"]]


def test_follow_exits_0_when_the_reader_goes_away(config: Path, store: AuditStore) -> None:
    """The shipper closes the pipe: the next write fails, the follower exits 0, quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub.cli", "events", "--config", str(config), "--follow",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        assert proc.stderr.readline().startswith("fleet-hub events: following")
        fill(store, 1)
        assert json.loads(proc.stdout.readline())["id"] == 1
        proc.stdout.close()  # the shipper goes away
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            fill(store, 50)  # keep giving it something to write until it notices
        assert proc.wait(timeout=TIMEOUT) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# -- fleet-hub audit ------------------------------------------------------------------------


def findings(store: AuditStore) -> None:
    """Three checks, two devices, one finding without a device, amid ordinary records."""
    store.record("accept", device_id="dev-a", serial="0a")
    store.record("finding", device_id="dev-a", serial="0a", peer="192.0.2.1:1",
                 reason="certificate-shared", evidence={"peers": ["192.0.2.1:1"]})
    store.record("finding", device_id="dev-b", serial="0b", peer="192.0.2.2:2",
                 reason="client-id-conflict", evidence={"takeovers": 3})
    store.record("finding", device_id="dev-a", serial="0c", peer="192.0.2.3:3",
                 reason="certificate-shared", evidence={"peers": ["192.0.2.1:1", "192.0.2.3:3"]})
    store.record("finding", reason="ca-expiring", evidence={"subject": "CN=Issuing CA",
                                                            "days": 12})
    store.record("reject", device_id="dev-b", reason="revoked")
    store.flush()


def test_audit_json_groups_by_check_and_device(config: Path, store: AuditStore) -> None:
    """Contract C2: exact keys; count, first/last, latest serial and evidence; exit 1."""
    findings(store)
    done = hub("audit", "--config", config, "--json")
    assert done.returncode == 1, done.stderr
    groups = json.loads(done.stdout)
    assert [list(g) for g in groups] == [["check", "device_id", "serial", "count", "first",
                                          "last", "evidence"]] * 3
    assert [(g["check"], g["device_id"], g["serial"], g["count"]) for g in groups] == [
        ("ca-expiring", None, None, 1),
        ("certificate-shared", "dev-a", "0c", 2),
        ("client-id-conflict", "dev-b", "0b", 1),
    ]
    shared = groups[1]
    assert shared["evidence"] == {"peers": ["192.0.2.1:1", "192.0.2.3:3"]}
    stored = [r for r in read_records(config.parent / "hub-audit.db")
              if r.reason == "certificate-shared"]
    from hub.audit import format_time

    assert (shared["first"], shared["last"]) == (format_time(stored[0].time),
                                                 format_time(stored[1].time))


def test_audit_text_table_and_exit_codes(config: Path, store: AuditStore) -> None:
    """No finding: exit 0 and says so; findings: a table, the evidence, a total, exit 1."""
    fill(store, 2)
    none = hub("audit", "--config", config)
    assert (none.returncode, none.stdout) == (0, "no findings\n")
    assert hub("audit", "--config", config, "--json").stdout == "[]\n"
    findings(store)
    done = hub("audit", "--config", config)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "DEVICE", "COUNT", "FIRST", "LAST", "SERIAL"]
    assert lines[3].split()[:3] == ["certificate-shared", "dev-a", "2"]
    assert lines[4].strip() == 'evidence: {"peers":["192.0.2.1:1","192.0.2.3:3"]}'
    assert lines[-1] == "4 finding(s) in 3 group(s)"


def test_audit_since_leaves_older_findings_out(config: Path, store: AuditStore) -> None:
    findings(store)
    assert hub("audit", "--config", config, "--since", "1h").returncode == 1
    later = hub("audit", "--config", config, "--since", "2999-01-01", "--json")
    assert (later.returncode, later.stdout) == (0, "[]\n")
    bad = hub("audit", "--config", config, "--since", "yesterday")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --since: 'yesterday' is not a time")


def test_findings_are_read_through_their_partial_index(config: Path, store: AuditStore) -> None:
    """fleet-hub audit does not scan every accept: SQLite plans the partial index."""
    findings(store)
    with sqlite3.connect(config.parent / "hub-audit.db") as conn:
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT id FROM events WHERE time >= 0 AND "
                            "event = 'finding' ORDER BY time DESC, id DESC").fetchall()
    conn.close()
    assert "USING INDEX events_findings" in str(plan)
    from hub.audit.findings import read_findings

    assert [g.check for g in read_findings(config.parent / "hub-audit.db", since=0)] == [
        "ca-expiring", "certificate-shared", "client-id-conflict"]


def test_audit_on_a_missing_store_names_the_file(config: Path) -> None:
    done = hub("audit", "--config", config)
    assert done.returncode == 1
    assert done.stderr == ("error: no audit store: the file does not exist "
                           f"({config.parent / 'hub-audit.db'})\n")
