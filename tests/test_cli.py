"""`cmsoctl` as an operator uses it, against the real daemon: show's progress and filters, list
newest first, why, approvals recorded with the caller, and the rough edges (a closed pipe, an
empty CMSOD_SOCKET, watch ending with the daemon, unknown flags' values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cmsod import ctl
from tests import conftest
from tests.cmso_requests import request
from tests.conftest import EPOCH, ControlClient
from tests.procs import Daemon, cmsoctl

FAR = 60 * 24 * 365  # minutes: a change window a year ahead, nothing runs during the test


def submitted(
    tmp_path: Path, daemon: Daemon, schedule_id: str, nodes: int, concurrency: int = 2
) -> None:
    body = request(
        schedule_id,
        now=EPOCH,
        nodes=[f"{schedule_id}-n{i}" for i in range(nodes)],
        concurrency=concurrency,
        minutes_from_now=FAR,
    )
    code, out = cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))
    assert code == 0, out
    daemon.wait_log(rf"event=schedule\.optimized schedule_id={schedule_id}\b")


def test_show_list_why_and_approval_identity(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        submitted(tmp_path, daemon, "older", 3)
        submitted(tmp_path, daemon, "newer", 1)
        code, out = cmsoctl(tmp_path, "list")
        assert code == 0, out
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["newer", "older"]

        code, out = cmsoctl(tmp_path, "show", "older")
        assert code == 0, out
        (plan,) = [line.split()[1] for line in out.splitlines() if line.startswith("plan ")]
        code, out = cmsoctl(tmp_path, "approve", "older", "--plan", "nothex")
        assert code == 2 and "not a plan fingerprint (12 hex digits)" in out
        code, out = cmsoctl(tmp_path, "approve", "older", "--plan", "0123456789ab")
        assert code == 1 and "409 Scheduler.PLAN_CHANGED: The plan of schedule older is " in out
        code, out = cmsoctl(tmp_path, "approve", "older", "--user", "alice", "--plan", plan)
        assert code == 0 and out == f"older: Scheduled (plan {plan})\n", out
        code, out = cmsoctl(tmp_path, "show", "older")
        assert code == 0, out
        lines = out.splitlines()
        (approval,) = [line for line in lines if line.startswith("approval")]
        assert approval.startswith("approval   Accepted by alice (Tier 2) at ")
        pid = approval.split()[-3].rstrip(",")
        assert approval.endswith(f", sent by uid {os.getuid()} pid {pid}, plan {plan}")
        assert "elements   3 Scheduled" in lines
        (progress,) = [line for line in lines if line.startswith("progress")]
        assert progress.startswith("progress   0 of 3 done; next slot ")
        assert "; expected end " in progress
        header = next(line for line in lines if line.startswith("GROUP"))
        assert "PLANNED START" in header and "ACTUAL START" in header and "MESSAGE" in header
        code, out = cmsoctl(tmp_path, "show", "older", "--status", "Failed")
        assert code == 0 and out.splitlines()[-1].startswith("GROUP")  # no element row
        code, out = cmsoctl(tmp_path, "show", "older", "--status", "Nonsense")
        assert code == 2 and "invalid choice" in out

        code, out = cmsoctl(tmp_path, "why", "older-n0")
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].startswith("older-n0 in schedule older: Scheduled (schedule Scheduled)")
        assert lines[1].split()[0] == "slot" and "waits for its slot" in lines[1]
        code, out = cmsoctl(tmp_path, "why", "older-n0", "--schedule", "newer")
        assert code == 1 and "Element older-n0 not found in schedule newer" in out

        code, out = cmsoctl(tmp_path, "details", "--filter", "scheduleId=older")
        assert code == 1 and "the filters are: request.scheduleId," in out
        code, out = cmsoctl(tmp_path, "details", "--filter", "groupId=group")
        assert code == 0 and len(out.splitlines()) == 1 + 4
        code, out = cmsoctl(tmp_path, "details", "--help")
        assert "groupId" in out and "request.scheduleId" in out and "maxSchedules" in out
    finally:
        assert daemon.stop() == 0


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        submitted(tmp_path, daemon, "big", 2000, concurrency=2000)  # output well past 64 KiB
        for args in (
            ["show", "big"],
            ["--json", "show", "big"],
            ["gantt", "big", "--by", "element"],
        ):
            command = [
                sys.executable,
                "-m",
                "cmsod.ctl",
                "--socket",
                str(tmp_path / "control.sock"),
            ]
            run = subprocess.run(
                ["bash", "-o", "pipefail", "-c", '"$@" | head -c 100', "bash", *command, *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 141, (args, run.stderr)  # as a command killed by SIGPIPE
            assert run.stderr == "", args  # no traceback
            assert len(run.stdout) == 100
    finally:
        assert daemon.stop() == 0


def test_empty_socket_variable_means_the_default() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cmsod.ctl", "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "CMSOD_SOCKET": ""},
        timeout=30,
    )
    assert run.returncode == 69 and "/run/cmsod/control.sock" in run.stderr, run.stderr


def test_usage_errors_are_refused_before_the_daemon_is_asked(tmp_path: Path) -> None:
    code, out = cmsoctl(tmp_path, "list", "--status", "completed")
    assert code == 2 and "invalid choice: 'completed'" in out and "'Completed'" in out
    for command in ("list", "tickets"):  # a sentence, not the daemon's decoder's words
        code, out = cmsoctl(tmp_path, command, "--limit", "0")
        assert code == 2 and "argument --limit: 0 is not between 1 and 1000" in out, out
        code, out = cmsoctl(tmp_path, command, "--limit", "x")
        assert code == 2 and "argument --limit: not a whole number: 'x'" in out, out


def test_resume_says_what_moved_in_a_summary() -> None:
    elements = [{"vnfName": f"n{i}", "status": "Scheduled"} for i in range(200)]
    moved = [
        {"vnfName": f"n{i}", "oldStartTime": "2026-12-03T10:00:00Z", "startTime": start}
        for i, start in enumerate([None] + ["2026-12-03T12:00:00Z"] * 24)
    ]
    answer = {
        "scheduleId": "big",
        "status": "Scheduled",
        "moved": moved,
        "schedule": {
            "status": "Scheduled",
            "planFingerprint": "0123456789ab",
            "groups": [{"groupId": "g", "changeManagementSchedules": elements}],
        },
    }
    lines = ctl.human("resume", answer).splitlines()
    assert lines[:3] == ["big: Scheduled", "plan       0123456789ab", "elements   200 Scheduled"]
    assert "moved      25 elements whose slot passed while it was stopped (1 Past due: no free" in (
        "\n".join(lines)
    )
    assert lines[-2:] == ["... and 5 more", "every element: cmsoctl show big"]
    assert "n0   2026-12-03T10:00:00Z  none: Past due" in lines
    assert len(lines) == 5 + 2 + 20 + 2  # 20 of the moved, not 200 rows
    answer["moved"] = []
    assert "moved      none past the misfire grace" in ctl.human("resume", answer)


def test_delete_of_a_running_schedule_points_at_abort_and_abort_says_what_it_did() -> None:
    error = {"messageId": "Scheduler.CANNOT_CANCEL_IN_PROGRESS", "text": "Cannot delete..."}
    refused = ctl.Reply({"status": 406, "requestError": error}, "io.cmsod.RequestError")
    assert ctl.describe_error(refused, "delete", "r1") == (
        "406 Scheduler.CANNOT_CANCEL_IN_PROGRESS: Cannot delete...\n"  # CMSO's text, then
        "to stop it, `cmsoctl abort r1` cancels every element not yet dispatched"
        " and lets the running ones finish"
    )
    answer = {"scheduleId": "r1", "status": "Notifications Initiated", "cancelled": 7}
    assert ctl.human("abort", answer | {"running": 3}) == (
        "r1: Notifications Initiated: 7 elements cancelled, 3 still running to their end"
        " (cmsoctl show r1 follows them)"
    )
    assert ctl.human("abort", answer | {"status": "Cancelled", "cancelled": 1, "running": 0}) == (
        "r1: Cancelled: 1 element cancelled, 0 still running to their end"
    )


def test_watch_says_when_the_daemon_stops(tmp_path: Path) -> None:
    code, out = cmsoctl(tmp_path, "watch", "--type", "nonsense")
    assert code == 2 and "invalid choice: 'nonsense'" in out
    daemon = Daemon(tmp_path)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "cmsod.ctl", "--socket", str(tmp_path / "control.sock"), "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        daemon.wait_log(r"event=watch\.started")
        assert daemon.stop() == 0
        _, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 69
        assert "the daemon ended the event stream (it stopped or restarted)" in err
    finally:
        watcher.kill()
        watcher.wait()


async def test_the_daemon_refuses_an_unknown_event_type(client: ControlClient) -> None:
    await client.send_raw(
        b'{"method":"io.cmsod.Events.Watch","parameters":{"eventType":"x"},"more":true}\0'
    )
    reply = json.loads(await client.receive_raw() or b"null")
    assert reply["error"] == "org.varlink.service.InvalidParameter"
    assert reply["parameters"]["message"] == (
        "cmsod emits no 'x'; it emits org.onap.ncmp.cm-network-avc-event"
    )


async def test_list_is_newest_first_and_tickets_go_by_planned_start(
    autojump_clock, cmsod: conftest.Daemon, client: ControlClient
) -> None:
    from cmsod.model import ScheduleStatus as S
    from tests.cmso_requests import approval

    for name, minutes in (("first", 600), ("second", 60), ("third", 300)):
        await client.ok(
            "io.cmsod.Schedules.Create",
            schedule=request(name, now=EPOCH, nodes=[f"{name}-n"], minutes_from_now=minutes),
        )
        await client.wait_for(name, S.PENDING_APPROVAL)
        await client.ok("io.cmsod.Schedules.Approve", scheduleId=name, approval=approval())
    pages, after = [], None
    while True:
        reply = await client.ok(
            "io.cmsod.Schedules.List", limit=1, **({"after": after} if after else {})
        )
        pages += [s["scheduleId"] for s in reply["schedules"]]
        if not (after := reply["next"]):
            break
    assert pages == ["third", "second", "first"]  # newest first, page by page
    tickets, after = [], None
    while True:
        reply = await client.ok(
            "io.cmsod.Tickets.List", limit=2, **({"after": after} if after else {})
        )
        tickets += [t["scheduleId"] for t in reply["tickets"]]
        if not (after := reply["next"]):
            break
    assert tickets == ["second", "third", "first"]  # by when their work is planned

    # The cursor is where the page ended, not a row looked up again: a ticket that moves
    # between pages (its elements carried over) cannot make the next page skip the others.
    first_page = await client.ok("io.cmsod.Tickets.List", limit=1)
    assert [t["scheduleId"] for t in first_page["tickets"]] == ["second"]
    moved = first_page["tickets"][0]["changeId"]

    def move_later(tx: Any) -> None:
        tx.execute(
            "UPDATE change_tickets SET planned_start_ms = planned_start_ms + ? WHERE change_id = ?",
            (86_400_000, moved),
        )

    await cmsod.ctx.store.tx(move_later)
    rest = await client.ok("io.cmsod.Tickets.List", after=first_page["next"])
    assert [t["scheduleId"] for t in rest["tickets"]] == ["third", "first", "second"]
    # the id of the last row seen still works as a cursor (where that row is now)
    by_id = await client.ok("io.cmsod.Schedules.List", after="second")
    assert [s["scheduleId"] for s in by_id["schedules"]] == ["first"]
    unknown = await client.call("io.cmsod.Schedules.List", after="nope")
    assert unknown["error"] == "org.varlink.service.InvalidParameter"
    assert unknown["parameters"] == {
        "parameter": "after",
        "message": "'nope' is neither a cursor (a page's `next`) nor a known id",
    }


def test_json_may_come_after_the_command() -> None:
    """`cmsoctl why X --json` as the README writes it, and `cmsoctl --json why X`."""
    parse = ctl.parser().parse_args
    assert parse(["why", "node3", "--json"]).json is True
    assert parse(["--json", "why", "node3"]).json is True
    assert parse(["gantt", "s1", "--svg", "f.svg", "--json"]).json is True
    assert parse(["why", "node3"]).json is False
