"""Stopping and holding a rollout end to end: the real daemon and cmsoctl against a fake SO on
loopback (in a thread), killed with SIGKILL while halted or frozen. The fake SO's own record
(which work flow started when) is what is checked."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cmso_requests import iso, request
from tests.fake_http import FakeAlertmanager, FakeSO
from tests.procs import Daemon, cmsoctl
from tests.test_rollout import edits


@pytest.fixture
def so() -> Iterator[FakeSO]:
    fake = FakeSO(["IN_PROGRESS", "COMPLETE"])
    stop = fake.in_thread()
    yield fake
    stop()


def env(so: FakeSO, **settings: str) -> dict[str, str]:
    return {"CMSOD_SO__MODE": "http", "CMSOD_SO__URL": so.url, **settings}


def submit_and_approve(
    state_dir: Path, daemon: Daemon, schedule_id: str, nodes: list[str], start: datetime, **kw: Any
) -> None:
    body = request(schedule_id, now=start, nodes=nodes, normal=kw.pop("normal", 1), **kw)
    body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"] = iso(start)
    assert cmsoctl(state_dir, "submit", "-", stdin=json.dumps(body))[0] == 0
    daemon.wait_log(rf"event=schedule\.optimized schedule_id={schedule_id} ")
    assert cmsoctl(state_dir, "approve", schedule_id, "--user", "jf9860")[0] == 0


def view(state_dir: Path, schedule_id: str) -> dict[str, Any]:
    code, out = cmsoctl(state_dir, "--json", "show", schedule_id)
    assert code == 0, out
    return json.loads(out)["schedule"]


def soon(seconds: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


def test_a_failing_rollout_halts_at_its_threshold_and_survives_kill_9(
    tmp_path: Path, so: FakeSO
) -> None:
    # five slots of five (1 s each): the threshold is crossed in the third, two are left
    nodes = [f"n{i}" for i in range(25)]
    so.failing = set(nodes[::5])  # 20% of the work flows fail, one in each slot of five
    settings = env(so, CMSOD_DISPATCHER__MAX_FAILURE_RATIO="0.1")
    daemon = Daemon(tmp_path, extra_env=settings)
    submit_and_approve(tmp_path, daemon, "big", nodes, soon(3), concurrency=5)
    daemon.wait_log(r"event=schedule\.halted schedule_id=big", timeout=120)
    at_halt = len(so.started)
    assert at_halt < len(nodes)
    # every element not dispatched comes due and is held by the stop gate, none sent
    daemon.wait_log(r"event=element\.held schedule_id=big", count=len(nodes) - at_halt)
    assert len(so.started) == at_halt
    daemon.kill()
    daemon = Daemon(tmp_path, extra_env=settings)
    halted = view(tmp_path, "big")
    assert halted["status"] == "Halted"
    assert "failure threshold crossed: 3 of 25 elements failed" in halted["control"]["reason"]
    resumed_at = time.time()
    code, out = cmsoctl(tmp_path, "resume", "big", "--reason", "known bad batch")
    assert code == 0 and out.startswith("big: Notifications Initiated"), out
    lines = out.splitlines()  # a summary, not a row for each element
    assert lines[1].startswith("plan       ") and lines[2].startswith("elements   "), out
    assert any(line.startswith("moved      ") for line in lines), out
    assert lines[-1] == "every element: cmsoctl show big" and len(lines) < len(nodes), out
    daemon.wait_log(r"event=schedule\.finished schedule_id=big", timeout=120)
    started = collections.Counter(vnf for _, vnf in so.started)
    assert sorted(started) == sorted(nodes) and set(started.values()) == {1}  # each once
    assert sum(t < resumed_at for _, t in so.started_at) == at_halt
    assert view(tmp_path, "big")["status"] == "Completed with error(s)"
    assert daemon.stop() == 0


def test_a_blackout_added_after_approval_is_never_violated(tmp_path: Path, so: FakeSO) -> None:
    daemon = Daemon(tmp_path, extra_env=env(so))
    start = soon(4)
    submit_and_approve(tmp_path, daemon, "bo", ["b1", "b2", "b3"], start, normal=2, concurrency=1)
    blackout = (start + timedelta(seconds=1), start + timedelta(seconds=7))
    code, out = cmsoctl(
        tmp_path,
        "blackout",
        "add",
        "b2",
        "--from",
        iso(blackout[0]),
        "--to",
        iso(blackout[1]),
        "--reason",
        "power work",
    )
    assert code == 0 and "overlaps the planned or running work of: bo" in out, out
    daemon.wait_log(r"event=schedule\.finished schedule_id=bo", timeout=60)
    runs = [(vnf, t) for vnf, t in so.started_at if vnf == "b2"]
    assert len(runs) == 1
    begin, end = blackout[0].timestamp(), blackout[1].timestamp()
    assert not any(t < end and t + 2 > begin for _, t in runs), (runs, blackout)
    assert view(tmp_path, "bo")["status"] == "Completed"
    assert daemon.stop() == 0


def test_a_freeze_holds_everything_through_kill_9_until_it_is_off(
    tmp_path: Path, so: FakeSO
) -> None:
    settings = env(so, CMSOD_DISPATCHER__MISFIRE_GRACE_S="1")
    daemon = Daemon(tmp_path, extra_env=settings)
    code, out = cmsoctl(tmp_path, "freeze", "on", "--reason", "incident 7")
    assert code == 0 and out.startswith("FROZEN"), out
    submit_and_approve(tmp_path, daemon, "fz", ["f1", "f2", "f3"], soon(3), concurrency=1)
    daemon.wait_log(r"event=element\.held schedule_id=fz .*gate=freeze", count=3, timeout=60)
    daemon.kill()
    daemon = Daemon(tmp_path, extra_env=settings)
    code, out = cmsoctl(tmp_path, "status")
    assert code == 0 and out.splitlines()[0].startswith("FROZEN") and "incident 7" in out, out
    assert so.started == []
    thawed_at = time.time()
    assert cmsoctl(tmp_path, "freeze", "off", "--reason", "resolved")[1].startswith(
        "freeze     off"
    )
    daemon.wait_log(r"event=schedule\.finished schedule_id=fz", timeout=60)
    assert sorted(vnf for vnf, _ in so.started_at) == ["f1", "f2", "f3"]
    assert all(t >= thawed_at for _, t in so.started_at)
    final = view(tmp_path, "fz")
    assert final["status"] == "Completed"
    # their slots had passed: carried over into the next free ones (said by their events;
    # once done, their message is the orchestrator's)
    assert any("carried over" in e.get("status-message", "") for e in edits(tmp_path))
    assert {e["statusMessage"] for e in final["groups"][0]["changeManagementSchedules"]} == {
        "complete"
    }
    assert daemon.stop() == 0


def test_an_alarm_hold_survives_kill_9_and_the_element_runs_once_when_it_ends(
    tmp_path: Path, so: FakeSO
) -> None:
    am = FakeAlertmanager()
    stop_am = am.in_thread()
    try:
        am.fire("LinkDown", instance="a1")
        settings = env(so, CMSOD_ALARMS__URL=am.url, CMSOD_ALARMS__RECHECK_S="1")
        daemon = Daemon(tmp_path, extra_env=settings)
        submit_and_approve(tmp_path, daemon, "al", ["a1", "a2"], soon(3), concurrency=2)
        daemon.wait_log(r"event=element\.held schedule_id=al vnf=a1 gate=alarm", timeout=60)
        daemon.wait_log(r"event=element\.dispatched schedule_id=al vnf=a2", timeout=60)
        daemon.kill()
        asked = len(am.requests)
        daemon = Daemon(tmp_path, extra_env=settings)
        code, out = cmsoctl(tmp_path, "why", "a1")
        assert code == 0 and "held by alarm: alerts firing: LinkDown since" in out, out
        am.wait_for(lambda: len(am.requests) > asked + 1)  # the restarted daemon asks again
        code, out = cmsoctl(tmp_path, "status")
        assert code == 0 and f"alarms     {am.url}: answering" in out, out
        assert [vnf for _, vnf in so.started] == ["a2"]
        am.resolve("LinkDown")
        daemon.wait_log(r"event=schedule\.finished schedule_id=al", timeout=60)
        assert sorted(vnf for _, vnf in so.started) == ["a1", "a2"]  # each once
        assert view(tmp_path, "al")["status"] == "Completed"
        assert daemon.stop() == 0
    finally:
        stop_am()
