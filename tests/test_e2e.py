"""End to end: the real `cmsod` process in a temporary state dir, driven by the real `cmsoctl`,
killed with SIGKILL mid-schedule and restarted. Waits read the daemon's own log, never a sleep."""

from __future__ import annotations

import collections
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cmso_requests import iso, request
from tests.conftest import store_rows
from tests.procs import Daemon, cmsoctl


def test_kill_9_mid_schedule_loses_nothing_and_dispatches_nothing_twice(tmp_path: Path) -> None:
    nodes = [f"n{i}" for i in range(30)]
    now = datetime.now(UTC)
    body = request("e2e", now=now, nodes=nodes, normal=1, additional=0, concurrency=6)
    window = body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]
    window["startTime"] = iso(now + timedelta(seconds=3))

    daemon = Daemon(tmp_path)
    code, out = cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))
    assert code == 0, out
    assert out.strip() == "e2e: Pending Schedule"
    daemon.wait_log(r"event=schedule\.optimized schedule_id=e2e")
    code, out = cmsoctl(tmp_path, "approve", "e2e", "--user", "jf9860")
    assert code == 0 and out.startswith("e2e: Scheduled (plan "), out

    daemon.wait_log(r"event=element\.dispatched", count=7)
    daemon.kill()  # mid-schedule: some done, some running, most still to come
    first_run = daemon.lines

    assert "scheduled=0 running=0 to_plan=0" in daemon.wait_log(r"event=daemon\.resumed")[0]
    daemon = Daemon(tmp_path)
    # one line says what the restart took over: most elements still to run, a few running
    (resumed,) = daemon.wait_log(r"event=daemon\.resumed")
    found = re.search(r"scheduled=(\d+) running=(\d+)", resumed)
    assert found is not None, resumed
    assert int(found[1]) >= 30 - 3 * 7 and int(found[1]) + int(found[2]) <= 30 - 1, resumed
    daemon.wait_log(r"event=schedule\.finished schedule_id=e2e", timeout=90)
    code, out = cmsoctl(tmp_path, "--json", "show", "e2e")
    assert code == 0, out
    view = json.loads(out)["schedule"]
    assert view["status"] in ("Completed", "Completed with error(s)")
    items = view["groups"][0]["changeManagementSchedules"]
    assert sorted(i["vnfName"] for i in items) == sorted(nodes)  # nothing lost
    for item in items:
        # every element ran to the end, or was reconciled after the kill with a message
        assert item["status"] == "Completed" or (
            item["status"] == "Error" and "dispatch outcome unknown" in item["statusMessage"]
        ), item

    dispatched = collections.Counter(
        re.search(r" vnf=(\S+)", line).group(1)
        for line in first_run + daemon.lines
        if "event=element.dispatched" in line
    )
    assert max(dispatched.values()) == 1  # no element dispatched twice across the kill
    completed = {i["vnfName"] for i in items if i["status"] == "Completed"}
    reconciled = {i["vnfName"] for i in items if i["status"] == "Error"}
    # A logged dispatch was recorded, so it ran to the end; a reconciled one never was.
    # (A kill between a record's commit and its log line makes completed a superset.)
    assert set(dispatched) <= completed and not set(dispatched) & reconciled
    print(
        f"1 kill, {len(completed) + len(reconciled)} dispatched, 0 duplicated, 0 lost "
        f"({len(reconciled)} reconciled as Error)"
    )

    assert daemon.stop() == 0
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT max(dispatch_attempts) FROM elements").fetchone() == (1,)
        unsent = db.execute("SELECT count(*) FROM events WHERE sent_ms IS NULL").fetchone()
    assert unsent == (0,)
    # every event reached the file, at least once, in order per schedule
    patch_ids = [
        json.loads(line)["event"]["push-change-update"]["datastore-changes"][
            "ietf-yang-patch:yang-patch"
        ]["patch-id"]
        for line in (tmp_path / "events" / "cm-events.jsonl").read_text().splitlines()
    ]
    seqs = [int(p.split(":")[1]) for p in patch_ids]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == sorted(first_seen)


def test_first_run_commands_and_exit_codes(tmp_path: Path) -> None:
    code, out = cmsoctl(tmp_path, "status")
    assert code == 69 and "no cmsod socket" in out
    daemon = Daemon(tmp_path)
    try:
        code, out = cmsoctl(tmp_path, "status")
        assert code == 0 and "healthy    yes" in out
        code, out = cmsoctl(tmp_path, "show", "nope")
        assert code == 1 and "404 Scheduler.SCHEDULE_NOT_FOUND" in out
        code, out = cmsoctl(tmp_path, "--json", "show", "nope")
        assert code == 1 and json.loads(out.splitlines()[0])["error"] == "io.cmsod.RequestError"
        code, out = cmsoctl(tmp_path, "submit", str(tmp_path / "missing.json"))
        assert code == 2
        code, out = cmsoctl(tmp_path, "reload")
        assert code == 0 and "configuration reloaded" in out
    finally:
        assert daemon.stop() == 0


def test_reload_keeps_the_old_config_when_the_new_one_is_bad(tmp_path: Path) -> None:
    conf = tmp_path / "cmsod.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[dispatcher]\nmisfire_grace_s = 3\n')
    daemon = Daemon(tmp_path, config=conf)
    try:
        conf.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[dispatcher]\nmisfire_grace_s = 4\n')
        code, out = cmsoctl(tmp_path, "reload")
        assert (code, out.strip()) == (0, "configuration reloaded: dispatcher.misfire_grace_s")
        conf.write_text(
            f'[daemon]\nstate_dir = "{tmp_path}"\n[dispatcher]\nmisfire_grace_s = "often"\n'
        )
        code, out = cmsoctl(tmp_path, "reload")
        assert code == 1 and "$.dispatcher.misfire_grace_s" in out
        daemon.proc.send_signal(signal.SIGHUP)  # the same through SIGHUP: logged, old kept
        daemon.wait_log(r"event=config\.reload_failed .*\$\.dispatcher\.misfire_grace_s")
        code, out = cmsoctl(tmp_path, "status")
        assert code == 0 and "healthy    yes" in out
    finally:
        assert daemon.stop() == 0


def test_sd_notify_ready_status_and_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    daemon = Daemon(tmp_path, extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    ready = notify.recv(4096).decode().split("\n")
    assert ready[0] == "READY=1"
    assert ready[1].startswith("STATUS=0 active schedules")
    assert (tmp_path / "control.sock").exists()  # READY only once the socket listens
    daemon.proc.send_signal(signal.SIGTERM)
    assert notify.recv(4096) == b"STOPPING=1"
    assert daemon.proc.wait(20) == 0
    notify.close()


def test_kill_9_mid_stream_loses_no_event(tmp_path: Path) -> None:
    from tests.test_events import Bus, in_order_and_complete

    bus = Bus()
    stop = bus.in_thread()
    env = {
        "CMSOD_EVENTS__SINK": "http",
        "CMSOD_EVENTS__URL": bus.url,
        "CMSOD_EVENTS__BATCH_SIZE": "2",
    }
    try:
        daemon = Daemon(tmp_path, extra_env=env)
        now = datetime.now(UTC)
        for i in range(5):
            body = request(f"ev{i}", now=now, nodes=[f"ev{i}-a", f"ev{i}-b"], minutes_from_now=None)
            assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        daemon.wait_log(r"event=element\.dispatched", count=4)
        daemon.kill()  # events are streaming out to the bus right now
        daemon = Daemon(tmp_path, extra_env=env)
        for i in range(5):
            code, out = cmsoctl(tmp_path, "--json", "show", f"ev{i}")
            if json.loads(out)["schedule"]["status"] not in (
                "Completed",
                "Completed with error(s)",
            ):
                daemon.wait_log(rf"event=schedule\.finished schedule_id=ev{i}", timeout=60)
        assert daemon.stop() == 0
    finally:
        stop()
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        stored = dict(
            db.execute("SELECT schedule_id, count(*) FROM events GROUP BY schedule_id").fetchall()
        )
        unsent = db.execute("SELECT count(*) FROM events WHERE sent_ms IS NULL").fetchone()[0]
    per_schedule = in_order_and_complete(bus.received["cm-events"])
    assert unsent == 0
    assert {s: len(seqs) for s, seqs in per_schedule.items()} == stored  # every event, in order


def test_cmsoctl_watch_prints_events_as_they_happen(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmsod.ctl",
            "--socket",
            str(tmp_path / "control.sock"),
            "--json",
            "watch",
            "watched",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        daemon.wait_log(r"event=watch\.started schedule_id=watched")  # registered before the submit
        body = request("watched", now=datetime.now(UTC), nodes=["w1"], minutes_from_now=None)
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        cmsoctl(
            tmp_path,
            "submit",
            "-",
            stdin=json.dumps(request("other", now=datetime.now(UTC), minutes_from_now=None)),
        )
        daemon.wait_log(r"event=schedule\.finished schedule_id=watched")
        assert watcher.stdout is not None
        statuses = []
        while "Completed" not in statuses:
            event = json.loads(watcher.stdout.readline())
            assert event["eventCorrelationId"] == "watched"  # filtered to the one schedule
            patch = event["event"]["push-change-update"]["datastore-changes"][
                "ietf-yang-patch:yang-patch"
            ]
            statuses += [
                e["value"]["cm-schedule:schedule"][0]["status"]
                for e in patch["edit"]
                if "cm-schedule:schedule" in e["value"]
            ]
        assert statuses[:3] == ["Pending Approval", "Accepted", "Scheduled"]
    finally:
        watcher.kill()
        assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_cmsoctl_watch_on_one_daemon_prints_what_another_daemon_does(
    backend: str, tmp_path: Path
) -> None:
    """Two daemons on one PostgreSQL: a watcher on b prints every event of a schedule that a
    submits (and both run), each once, in order, woken by the other's NOTIFY."""
    a, b = Daemon(tmp_path / "a"), Daemon(tmp_path / "b")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "cmsod.ctl", "--socket", str(tmp_path / "b" / "control.sock")]
        + ["--json", "watch", "across"],
        stdout=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(60, watcher.kill)  # events missed: the read below ends, and fails
    try:
        b.wait_log(r"event=watch\.started schedule_id=across")
        body = request("across", now=datetime.now(UTC), nodes=["x1", "x2"], minutes_from_now=None)
        assert cmsoctl(tmp_path / "a", "submit", "-", stdin=json.dumps(body))[0] == 0
        timer.start()
        assert watcher.stdout is not None
        ids: list[str] = []
        statuses: list[str] = []
        while "Completed" not in statuses:
            line = watcher.stdout.readline()
            assert line, f"the watch ended after {len(ids)} events"
            event = json.loads(line)
            ids.append(event["eventId"])
            patch = event["event"]["push-change-update"]["datastore-changes"][
                "ietf-yang-patch:yang-patch"
            ]
            statuses += [
                e["value"]["cm-schedule:schedule"][0]["status"]
                for e in patch["edit"]
                if "cm-schedule:schedule" in e["value"]
            ]
    finally:
        timer.cancel()
        watcher.kill()
        assert a.stop() == 0 and b.stop() == 0
    stored = store_rows(
        tmp_path, "SELECT body FROM events WHERE schedule_id = 'across' ORDER BY seq"
    )
    assert ids == [json.loads(body)["eventId"] for (body,) in stored]


def test_sigterm_while_the_sink_hangs_stops_within_the_grace(tmp_path: Path) -> None:
    import threading

    from tests.test_events import Bus

    # a bus that takes the connection and the request, then never answers
    hanging = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    asked = threading.Event()

    def take() -> None:
        while True:
            try:
                conn, _ = hanging.accept()
            except OSError:
                return  # closed: the test is over
            held.append(conn)
            if conn.recv(65536):
                asked.set()

    threading.Thread(target=take, daemon=True).start()
    env = {
        "CMSOD_EVENTS__SINK": "http",
        "CMSOD_EVENTS__URL": f"http://127.0.0.1:{hanging.getsockname()[1]}",
        "CMSOD_EVENTS__TIMEOUT_S": "300",  # far longer than the grace: the grace must end it
        "CMSOD_DAEMON__SHUTDOWN_GRACE_S": "1",
    }
    daemon = Daemon(tmp_path, extra_env=env)
    try:
        body = request("held", now=datetime.now(UTC), nodes=["held-a"])
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        assert asked.wait(30)  # a publish is on the wire, unanswered
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0  # the grace (1 s) ends it, not the sink's 300 s
        daemon.wait_log(r"event=daemon\.stopped")
    finally:
        hanging.close()
        for conn in held:
            conn.close()
    # what the sink did not take stayed in the outbox: the next start publishes it
    bus = Bus()
    stop = bus.in_thread()
    try:
        daemon = Daemon(tmp_path, extra_env={**env, "CMSOD_EVENTS__URL": bus.url})
        bus.wait_for(lambda: len(bus.received["cm-events"]) >= 3)  # created, optimizing, planned
        assert daemon.stop() == 0
    finally:
        stop()


def test_status_is_degraded_and_exits_3_while_the_orchestrator_is_down(tmp_path: Path) -> None:
    with socket.socket() as down:  # bound, not listening: connections are refused
        down.bind(("127.0.0.1", 0))
        env = {
            "CMSOD_SO__MODE": "http",
            "CMSOD_SO__URL": f"http://127.0.0.1:{down.getsockname()[1]}",
        }
        daemon = Daemon(tmp_path, extra_env=env)
        try:
            code, out = cmsoctl(tmp_path, "status")
            assert code == 0 and "healthy    yes" in out
            body = request("down", now=datetime.now(UTC), nodes=["n1"], minutes_from_now=None)
            assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
            daemon.wait_log(r"level=warning event=element\.dispatch_retrying schedule_id=down")
            code, out = cmsoctl(tmp_path, "status")
            assert code == 3, out
            assert "healthy    NO, degraded: SO Interface FAILED" in out
            code, out = cmsoctl(tmp_path, "--json", "status")
            assert code == 3 and json.loads(out)["problems"] == ["SO Interface FAILED"]
        finally:
            assert daemon.stop() == 0


def test_cmsoctl_reads_large_answers_as_they_stream(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        later = datetime.now(UTC) + timedelta(days=1)
        nodes = [f"n{i:04}" for i in range(2500)]
        for schedule_id, names in (("big", nodes), ("small", ["m1"])):
            body = request(schedule_id, names, now=later, minutes_from_now=600)
            assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        code, out = cmsoctl(tmp_path, "--json", "details", "--filter", "vnfName=n%")
        assert code == 0, out[-300:]
        rows = json.loads(out)["details"]  # one JSON document, written as the rows came
        assert [r["vnfName"] for r in rows] == nodes
        code, out = cmsoctl(tmp_path, "details", "--filter", "vnfName=n%")
        lines = out.splitlines()
        assert code == 0 and lines[0].startswith("SCHEDULE") and len(lines) == 2501
        code, out = cmsoctl(tmp_path, "--json", "show", "big")
        assert code == 0
        items = json.loads(out)["schedule"]["groups"][0]["changeManagementSchedules"]
        assert [i["vnfName"] for i in items] == nodes
        code, out = cmsoctl(tmp_path, "list", "--all", "--limit", "1")
        assert code == 0 and [line.split()[0] for line in out.splitlines()] == [
            "SCHEDULE",
            "small",  # newest first
            "big",
        ]
        code, out = cmsoctl(tmp_path, "details", "--filter", "vnfName=none%")
        assert code == 1 and "404" in out
    finally:
        assert daemon.stop() == 0
