"""Stopping and holding a rollout, under MockClock against the fake SO on loopback: pause and
resume (held elements carried over into the free slots left), abort, the failure threshold,
the global freeze, and a blackout added after approval enforced at dispatch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from cmsod import plans
from cmsod.lifecycle import parse_time_ms
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, ControlClient, Daemon, wait_until
from tests.fake_http import FakeSO
from tests.test_so_http import daemon_for

DONE = (S.COMPLETED, S.COMPLETED_WITH_ERRORS)


async def daemon(nursery: trio.Nursery, tmp_path: Path, so: FakeSO, **overrides: Any) -> Daemon:
    """The daemon against the fake SO, dispatching at the start times themselves."""
    return await daemon_for(nursery, tmp_path, so, dispatcher__lead_time_s=0, **overrides)


def at(hh_mm: str) -> str:
    return f"2026-12-01T{hh_mm}:00Z"


def items(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["vnfName"]: e for g in view["groups"] for e in g["changeManagementSchedules"]}


def fingerprint_of(view: dict[str, Any]) -> str | None:
    """The fingerprint computed from the view's own slots (the definition, not the code): the
    one the view shows (stored with the schedule) must stay equal to it whatever moved them."""
    return plans.fingerprint(
        view["scheduleId"],
        {
            name: (parse_time_ms(e["startTime"]), parse_time_ms(e["finishTime"]))
            for name, e in items(view).items()
            if "startTime" in e
        },
    )


async def approved(
    client: ControlClient, schedule_id: str, nodes: list[str], concurrency: int = 1, **info: Any
) -> None:
    """Planned from 08:01 (EPOCH 08:00), one hour a slot, and approved."""
    body = request(schedule_id, now=EPOCH, nodes=nodes, concurrency=concurrency)
    body["schedulingInfo"].update(info)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    await client.wait_for(schedule_id, S.PENDING_APPROVAL)
    await client.ok("io.cmsod.Schedules.Approve", scheduleId=schedule_id, approval=approval())


async def started(client: ControlClient, so: FakeSO, count: int) -> None:
    async def enough() -> bool:
        await client.ok("org.varlink.service.GetInfo")  # keeps the connection from idling out
        return len(so.started) >= count

    await wait_until(enough, f"{count} work flows started")


async def sleep_until(cmsod: Daemon, client: ControlClient, hh_mm: str) -> ControlClient:
    """Let the schedule's time pass to hh:mm (virtual: costs nothing); the idle connection is
    closed by the daemon meanwhile, so a new one is returned."""
    await client.aclose()
    await trio.sleep((parse_time_ms(at(hh_mm)) - cmsod.ctx.clock.now_ms()) / 1000)
    return await cmsod.connect()


def events(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(tmp_path.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def edits(tmp_path: Path) -> list[dict[str, Any]]:
    found = []
    for event in events(tmp_path):
        patch = event["event"]["push-change-update"]["datastore-changes"]
        for edit in patch["ietf-yang-patch:yang-patch"]["edit"]:
            found.extend(next(iter(edit["value"].values())))
    return found


def peak(starts: list[float] | list[int], run: float) -> int:
    """The most work flows running at one instant, each running `run` from its start."""
    return max(sum(1 for s in starts if s <= t < s + run) for t in starts)


async def test_pause_holds_the_rest_and_resume_carries_it_over(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    client = await cmsod.connect()
    await approved(client, "roll", ["n1", "n2", "n3"])  # 08:01, 09:01, 10:01
    await started(client, so, 1)
    paused = await client.ok(
        "io.cmsod.Schedules.Pause", scheduleId="roll", reason="odd alarms", by="ops"
    )
    assert paused["status"] == S.PAUSED
    again = await client.ok("io.cmsod.Schedules.Pause", scheduleId="roll")
    assert again["status"] == S.PAUSED  # pausing twice changes nothing

    client = await sleep_until(cmsod, client, "11:30")
    assert [vnf for _, vnf in so.started] == ["n1"]
    view = await client.schedule("roll")
    assert view["status"] == S.PAUSED
    assert view["control"]["action"] == "pause" and view["control"]["reason"] == "odd alarms"
    assert view["control"]["by"].startswith("ops (uid ")
    assert view["control"]["time"].startswith("2026-12-01T08:01:")
    element = items(view)
    assert element["n1"]["status"] == E.COMPLETED  # running work is polled to its end
    for name in ("n2", "n3"):
        assert element[name]["status"] == E.SCHEDULED
        assert element[name]["heldBy"].startswith("held by stop: Paused by ops (uid ")

    why = await client.ok("io.cmsod.Schedules.Why", element="n2", scheduleId="roll")
    (held,) = [r for r in why["reasons"] if r["kind"] == "stop"]  # cmsoctl why says it too
    assert held["words"].startswith("held by stop: Paused by ops (uid ") and "until" not in held
    resumed = await client.ok("io.cmsod.Schedules.Resume", scheduleId="roll", reason="clear")
    assert resumed["status"] == S.NOTIFICATIONS_INITIATED
    new_plan = items(resumed["schedule"])  # the answer shows the new plan
    assert {n: new_plan[n]["startTime"] for n in ("n2", "n3")} == {
        "n2": at("12:01"),
        "n3": at("13:01"),
    }
    assert "carried over to 2026-12-01T12:01:00Z: held by stop" in new_plan["n2"]["statusMessage"]
    assert resumed["moved"] == [  # what moved, for a summary (cmsoctl resume)
        {
            "vnfName": name,
            "oldStartTime": at(was),
            "oldFinishTime": at(was_end),
            "startTime": at(start),
            "finishTime": at(end),
        }
        for name, was, was_end, start, end in (
            ("n2", "09:01", "10:01", "12:01", "13:01"),
            ("n3", "10:01", "11:01", "13:01", "14:01"),
        )
    ]
    assert resumed["schedule"]["planFingerprint"] == fingerprint_of(resumed["schedule"])
    done = await client.wait_for("roll", *DONE)
    assert done["status"] == S.COMPLETED
    assert done["planFingerprint"] == fingerprint_of(done)
    assert sorted(vnf for _, vnf in so.started) == ["n1", "n2", "n3"]  # each once
    assert {e["vnfName"]: e["dispatchTime"] for e in items(done).values()} == {
        "n1": at("08:01"),
        "n2": at("12:01"),
        "n3": at("13:01"),
    }
    actions = [e.get("control-action") for e in edits(tmp_path) if "control-action" in e]
    assert actions == ["pause", "resume"]
    tickets = (await client.ok("io.cmsod.Tickets.List", scheduleId="roll"))["tickets"]
    planned = {t["vnfs"][0]: (t["plannedStartDate"], t["plannedEndDate"]) for t in tickets}
    assert planned == {  # (a ticket per element) the carried-over ones followed their slot
        "n1": (at("08:01"), at("11:01")),
        "n2": (at("12:01"), at("13:01")),
        "n3": (at("13:01"), at("14:01")),
    }


async def test_abort_cancels_what_was_not_dispatched(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    client = await cmsod.connect()
    refused = await client.call("io.cmsod.Schedules.Delete", scheduleId="nothing")
    assert refused["parameters"]["status"] == 404
    await approved(client, "ab", ["n1", "n2", "n3"])
    await started(client, so, 1)
    delete = await client.call("io.cmsod.Schedules.Delete", scheduleId="ab")
    assert delete["parameters"]["status"] == 406  # running: abort is the way
    aborted = await client.ok(
        "io.cmsod.Schedules.Abort", scheduleId="ab", reason="wrong firmware", by="ops"
    )
    assert aborted["status"] == S.NOTIFICATIONS_INITIATED  # n1 still runs
    assert (aborted["cancelled"], aborted["running"]) == (2, 1)
    view = await client.wait_for("ab", *DONE)
    assert view["status"] == S.COMPLETED_WITH_ERRORS
    element = items(view)
    assert element["n1"]["status"] == E.COMPLETED
    for name in ("n2", "n3"):
        assert element[name]["status"] == E.CANCELLED
        assert element[name]["statusMessage"].startswith("aborted by ops (uid ")
        assert element[name]["statusMessage"].endswith(": wrong firmware")
    client = await sleep_until(cmsod, client, "12:00")
    assert [vnf for _, vnf in so.started] == ["n1"]

    await approved(client, "ab2", ["m1"])
    nothing_ran = await client.ok("io.cmsod.Schedules.Abort", scheduleId="ab2", reason="no")
    assert nothing_ran["status"] == S.CANCELLED
    assert (nothing_ran["cancelled"], nothing_ran["running"]) == (1, 0)
    ticket = (await client.ok("io.cmsod.Tickets.List", scheduleId="ab2"))["tickets"][0]
    assert ticket["closureCode"] == "Cancelled"
    not_running = await client.call("io.cmsod.Schedules.Pause", scheduleId="ab2")
    assert not_running["parameters"]["requestError"]["messageId"] == "Scheduler.NOT_RUNNING"
    not_stopped = await client.call("io.cmsod.Schedules.Resume", scheduleId="ab")
    assert not_stopped["parameters"]["requestError"]["messageId"] == "Scheduler.NOT_STOPPED"


async def test_the_failure_threshold_halts_the_rollout(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    so.failing = {"n1", "n2"}
    cmsod = await daemon(nursery, tmp_path, so, poller__interval_s=60)
    client = await cmsod.connect()
    nodes = [f"n{i}" for i in range(1, 7)]
    await approved(client, "ft", nodes, concurrency=2, maxFailures=1)  # 3 slots of 2
    view = await client.wait_for("ft", S.HALTED)
    assert view["control"] == {
        "action": "halt",
        "by": "cmsod",
        "reason": "failure threshold crossed: 2 elements failed, more than max_failures = 1",
        "time": view["control"]["time"],
    }
    client = await sleep_until(cmsod, client, "14:00")
    assert sorted(vnf for _, vnf in so.started) == ["n1", "n2"]  # nothing more dispatched
    assert all(
        e["status"] == E.SCHEDULED and e["heldBy"].startswith("held by stop: Halted by cmsod")
        for name, e in items(await client.schedule("ft")).items()
        if name not in ("n1", "n2")
    )
    resumed = await client.ok("io.cmsod.Schedules.Resume", scheduleId="ft", reason="known")
    assert resumed["status"] == S.NOTIFICATIONS_INITIATED
    done = await client.wait_for("ft", *DONE)
    assert done["status"] == S.COMPLETED_WITH_ERRORS
    assert sorted(vnf for _, vnf in so.started) == nodes  # the two failures were acknowledged
    assert [e["status"] for e in items(done).values()].count(E.COMPLETED) == 4


async def test_a_freeze_stops_every_dispatch_until_it_is_off(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    client = await cmsod.connect()
    await approved(client, "fz", ["n1", "n2"])  # 08:01, 09:01
    frozen = await client.ok("io.cmsod.Manager.Freeze", on=True, reason="incident 42", by="ops")
    assert frozen["freeze"]["status"] == "Frozen"
    status = await client.ok("io.cmsod.Manager.Status")
    assert next(iter(status)) == "freeze"  # shown first
    assert status["freeze"]["reason"] == "incident 42"
    client = await sleep_until(cmsod, client, "10:30")
    assert so.started == []
    assert items(await client.schedule("fz"))["n1"]["heldBy"].startswith("held by freeze")
    scrape = (await client.ok("io.cmsod.Manager.Metrics"))["text"]
    assert 'cmsod_gate_on{gate="freeze"} 1.0' in scrape
    assert 'cmsod_elements_held{gate="freeze"} 2.0' in scrape  # both carried past 10:30
    thawed = await client.ok("io.cmsod.Manager.Freeze", on=False, reason="resolved")
    assert thawed["freeze"] is None
    assert (await client.ok("io.cmsod.Manager.Status"))["freeze"] is None
    done = await client.wait_for("fz", *DONE)
    assert {e["vnfName"]: e["dispatchTime"] for e in items(done).values()} == {
        "n1": at("11:01"),  # the next free slots after the freeze
        "n2": at("12:01"),
    }
    freezes = [e["status"] for e in edits(tmp_path) if e.get("status") in ("Frozen", "Thawed")]
    assert freezes == ["Frozen", "Thawed"]


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_a_freeze_off_within_the_grace_keeps_the_concurrency_limit(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Two waves of 3 (concurrency 3, 10 s slots from 08:01:00) held by a freeze until
    08:02:05, past both slots but within the misfire grace: the first wave goes then, the
    second is carried over after it, not sent with it."""
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    client = await cmsod.connect()
    await client.ok("io.cmsod.Manager.Freeze", on=True, reason="incident 7")
    nodes = [f"n{i}" for i in range(1, 7)]
    body = request("fw", now=EPOCH, nodes=nodes, concurrency=3, normal=10, additional=0)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    planned = await client.wait_for("fw", S.PENDING_APPROVAL)
    starts = sorted(e["startTime"] for e in items(planned).values())
    assert starts == [at("08:01")] * 3 + ["2026-12-01T08:01:10Z"] * 3  # two waves
    await client.ok("io.cmsod.Schedules.Approve", scheduleId="fw", approval=approval())
    await client.aclose()
    await trio.sleep((parse_time_ms("2026-12-01T08:02:05Z") - cmsod.ctx.clock.now_ms()) / 1000)
    client = await cmsod.connect()
    assert so.started == []
    await client.ok("io.cmsod.Manager.Freeze", on=False, reason="resolved")
    done = await client.wait_for("fw", *DONE)
    sent = sorted(parse_time_ms(e["dispatchTime"]) for e in items(done).values())
    assert len(sent) == 6
    assert peak(sent, 10_000) <= 3  # at no instant more than 3 run (10 s from its dispatch)
    assert sent[:3] == [parse_time_ms("2026-12-01T08:02:05Z")] * 3  # at the thaw
    assert sent[3:] == [parse_time_ms("2026-12-01T08:02:20Z")] * 3  # the next free slot
    assert done["planFingerprint"] == fingerprint_of(done)  # sent late, carried over: moved


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
@pytest.mark.parametrize("stop", ["freeze", "pause"])
async def test_a_wave_released_late_does_not_run_on_top_of_the_next(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path, stop: str
) -> None:
    """The new-user trial's shape: three waves of 3 (concurrency 3, 10 s slots from 08:01:00);
    a freeze (or a pause) from 08:01:05 to 08:01:14 holds the second wave past its slot's start,
    within the misfire grace. Sent at the release it would run 08:01:14-24 next to the third
    wave's 08:01:20 slot: 6 at once. It is carried over to the free slot after the third."""
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    so.clock = cmsod.ctx.clock.now
    client = await cmsod.connect()
    nodes = [f"n{i}" for i in range(1, 10)]
    body = request("tr", now=EPOCH, nodes=nodes, concurrency=3, normal=10, additional=0)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    planned = await client.wait_for("tr", S.PENDING_APPROVAL)
    assert sorted(e["startTime"] for e in items(planned).values()) == [
        f"2026-12-01T08:01:{s}Z" for s in ("00", "10", "20") for _ in range(3)
    ]
    await client.ok("io.cmsod.Schedules.Approve", scheduleId="tr", approval=approval())
    await client.aclose()

    async def at_s(second: int) -> ControlClient:
        moment = parse_time_ms(f"2026-12-01T08:01:{second:02}Z")
        await trio.sleep((moment - cmsod.ctx.clock.now_ms()) / 1000)
        return await cmsod.connect()

    client = await at_s(5)
    assert len(so.started) == 3  # the first wave
    if stop == "freeze":
        await client.ok("io.cmsod.Manager.Freeze", on=True, reason="test")
    else:
        await client.ok("io.cmsod.Schedules.Pause", scheduleId="tr", reason="test")
    await client.aclose()
    client = await at_s(14)
    assert len(so.started) == 3  # the second wave held
    if stop == "freeze":
        await client.ok("io.cmsod.Manager.Freeze", on=False, reason="test")
    else:
        await client.ok("io.cmsod.Schedules.Resume", scheduleId="tr", reason="test")
    done = await client.wait_for("tr", *DONE)
    starts = [t - EPOCH.timestamp() - 60 for _, t in so.started_at]  # s after 08:01:00
    assert len(starts) == 9
    assert peak(starts, 10) <= 3  # the orchestrator's record: at no instant more than 3 run
    assert sorted(round(s) for s in starts) == [0] * 3 + [20] * 3 + [30] * 3
    assert done["planFingerprint"] == fingerprint_of(done)


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_a_freeze_until_ends_by_itself(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    client = await cmsod.connect()
    past = await client.call("io.cmsod.Manager.Freeze", on=True, until="2026-12-01T07:00:00Z")
    assert past["parameters"]["requestError"]["variables"][0] == "until"
    await client.ok("io.cmsod.Manager.Freeze", on=True, reason="change", until=at("08:03"))
    await approved(client, "fu", ["n1"])
    view = await client.wait_for("fu", *DONE)
    assert items(view)["n1"]["dispatchTime"] == at("08:03")  # within the grace: no carry-over
    assert (await client.ok("io.cmsod.Manager.Status"))["freeze"] is None


async def test_a_blackout_added_after_approval_is_kept_at_dispatch(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    cmsod = await daemon(nursery, tmp_path, so)
    client = await cmsod.connect()
    await approved(client, "bo", ["n1", "n2", "n3"])  # 08:01, 09:01, 10:01
    added = await client.ok(
        "io.cmsod.Availability.Add",
        element="n2",
        startTime=at("09:30"),
        endTime=at("10:30"),
        reason="fibre works",
    )
    assert added["touches"] == ["bo"]
    await client.ok(
        "io.cmsod.Availability.Add",
        element="n3",
        startTime=at("09:00"),
        endTime="2026-12-03T00:00:00Z",  # past the end of its window
        reason="decommissioning",
    )
    view = await client.wait_for("bo", *DONE)
    element = items(view)
    assert element["n1"]["dispatchTime"] == at("08:01")
    assert element["n2"]["dispatchTime"] == at("11:01")  # n3's slot is 10:01, taken then free
    assert element["n3"]["status"] == E.PAST_DUE
    assert element["n3"]["statusMessage"] == (
        "not dispatched: held by blackout: blackout BO000002 until 2026-12-03T00:00:00Z;"
        " no free slot left in its change windows"
    )
    assert sorted(vnf for _, vnf in so.started) == ["n1", "n2"]
