"""`io.cmsod.Schedules.Why` / `cmsoctl why`: for an element in each state, the reasons in the
operator's words, with the machine codes only in their own field."""

from __future__ import annotations

from pathlib import Path

import msgspec

from cmsod import explain
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, ControlClient, start_daemon, wait_until
from tests.fake_http import FakeSO

WHY = "io.cmsod.Schedules.Why"
CREATE = "io.cmsod.Schedules.Create"


def kinds(answer: dict) -> dict[str, str]:
    return {r["kind"]: r["words"] for r in answer["reasons"]}


async def test_why_follows_an_element_from_approval_to_its_end(
    autojump_clock, client: ControlClient
) -> None:
    await client.ok(CREATE, schedule=request("w1", now=EPOCH, nodes=["node1", "node2"]))
    await client.wait_for("w1", S.PENDING_APPROVAL)
    answer = await client.ok(WHY, element="node1")
    assert answer["scheduleId"] == "w1" and answer["status"] == E.PENDING_APPROVAL
    said = kinds(answer)
    assert said["approval"] == ("schedule w1 waits for approval (0 of 1 given): cmsoctl approve w1")
    assert said["slot"].startswith("planned 2026-12-01T08:01:00Z .. 2026-12-01T09:01:00Z (in ")

    # a blackout added after planning over node1's slot is named, with its end
    await client.ok(
        "io.cmsod.Availability.Add",
        element="node1",
        startTime="2026-12-01T08:30:00Z",
        endTime="2026-12-01T10:00:00Z",
        reason="core router upgrade",
    )
    (blackout,) = [
        r for r in (await client.ok(WHY, element="node1"))["reasons"] if r["kind"] == "blackout"
    ]
    assert blackout["words"].startswith("blackout BO000001 makes it unavailable")
    assert blackout["words"].endswith(": core router upgrade")
    assert blackout["until"] == "2026-12-01T10:00:00Z"

    await client.ok("io.cmsod.Schedules.Approve", scheduleId="w1", approval=approval())
    said = kinds(await client.ok(WHY, element="node2"))
    assert said["slot"].startswith("waits for its slot 2026-12-01T08:01:00Z")
    assert said["ticket"].endswith("is Approved|Scheduled: dispatch allowed")
    assert said["concurrency"].startswith("0 of its schedule's elements run now")

    await client.wait_for("w1", S.COMPLETED)
    said = kinds(await client.ok(WHY, element="node2"))
    assert said["done"].startswith("completed at ")

    reply = await client.call(WHY, element="nobody")
    assert reply["parameters"]["requestError"]["text"] == "Element nobody not found in any schedule"


async def test_why_says_what_the_orchestrator_said_and_why_it_could_not_place(
    autojump_clock, nursery, tmp_path: Path
) -> None:
    so = FakeSO(["IN_PROGRESS", "FAILED"])
    await nursery.start(so.serve)
    cmsod = await start_daemon(nursery, tmp_path, so__mode="http", so__url=so.url)
    client = await cmsod.connect()
    await client.ok(
        CREATE, schedule=request("now", now=EPOCH, nodes=["node1"], minutes_from_now=None)
    )

    async def running() -> bool:
        return (await client.ok(WHY, element="node1"))["status"] == E.TRIGGERED

    await wait_until(running, "node1 running")
    said = kinds(await client.ok(WHY, element="node1"))
    assert said["orchestrator"].startswith("running in the orchestrator as request req-1 since")
    await client.wait_for("now", S.COMPLETED_WITH_ERRORS)
    answer = await client.ok(WHY, element="node1")
    (failed,) = answer["reasons"]
    assert failed["kind"] == "failed"
    assert failed["words"].startswith("the orchestrator reported FAILED at 2026-12-01T")
    assert failed["words"].endswith(": failed")  # what the orchestrator said

    # one element, one slot, concurrency 1, and node2 blacked out for the whole window
    await client.ok(
        "io.cmsod.Availability.Add",
        element="node2",
        startTime="2026-12-01T00:00:00Z",
        endTime="2026-12-03T00:00:00Z",
        reason="site power work",
    )
    await client.ok(CREATE, schedule=request("later", now=EPOCH, nodes=["node1", "node2"]))
    await client.wait_for("later", S.OPTIMIZATION_FAILED)
    answer = await client.ok(WHY, element="node2", scheduleId="later")
    optimizer = answer["reasons"][0]
    assert optimizer["kind"] == "optimizer" and optimizer["code"] == "AvailabilityConstraint"
    assert optimizer["words"].startswith(
        "the optimizer could not place it: no slot it could use was free"
    )
    schedule = next(r for r in answer["reasons"] if r["kind"] == "schedule")
    assert schedule["words"] == (  # not "optimal", not "1 scheduled": nothing is
        "the whole schedule failed: 1 of 2 elements could not be scheduled, so none is"
        " (optimizer.allow_partial = false)"
    )
    text = " ".join(r["words"] for r in answer["reasons"])
    for jargon in ("AvailabilityConstraint", "sum of slot numbers", "element classes"):
        assert jargon not in text
    # node1 is in two schedules: the newest is explained, the other is named
    said = kinds(await client.ok(WHY, element="node1"))
    assert said["other-schedules"].startswith("it is also in schedule(s) now")
    await client.aclose()


def test_explain_a_ticket_that_does_not_allow_dispatch_and_a_past_due_slot() -> None:
    facts = explain.Facts(
        element="n1",
        schedule_id="s",
        schedule_status=S.NOTIFICATIONS_INITIATED,
        status=E.SCHEDULED,
        immediate=False,
        concurrency=3,
        start_ms=0,
        finish_ms=3_600_000,
        change_id="CHG1",
        ticket_state="Pending|Scheduled",
        running=2,
    )
    rules = explain.Rules(
        now_ms=600_000,
        lead_ms=1000,
        misfire_grace_ms=300_000,
        dispatch_immediate=True,
        ticket_check="builtin",
        dispatch_allowed=("Approved|Scheduled",),
    )
    said = {r.kind: r for r in explain.explain(facts, rules)}
    assert said["slot"].words == (
        "its start 1970-01-01T00:00:00Z is more than the misfire grace of 300 s past:"
        " it will end Past due"
    )
    assert said["ticket"].code == "CM_TICKET_NOT_APPROVED"
    assert "is Pending|Scheduled; dispatch needs one of Approved|Scheduled" in said["ticket"].words
    assert said["concurrency"].words.startswith("2 of its schedule's elements run now")


def test_explain_a_due_element_held_by_a_freeze_says_it_waits() -> None:
    """Due, inside its misfire grace, but a freeze holds it: the slot must not say it is sent
    now; past the grace, that it is carried over rather than ending Past due."""
    facts = explain.Facts(
        element="n1",
        schedule_id="s",
        schedule_status=S.NOTIFICATIONS_INITIATED,
        status=E.SCHEDULED,
        immediate=False,
        start_ms=0,
        finish_ms=3_600_000,
        hold_ms=explain.HELD_UNTIL_RELEASED_MS,
        hold_gate="freeze",
        hold_why="held by freeze: incident 7",
        gates_now=[("freeze", "incident 7", None)],
    )
    rules = explain.Rules(
        now_ms=60_000,
        lead_ms=0,
        misfire_grace_ms=300_000,
        dispatch_immediate=True,
        ticket_check="loopback",
        dispatch_allowed=(),
    )
    said = [(r.kind, r.words) for r in explain.explain(facts, rules)]
    assert said == [
        (
            "slot",
            "due since 1970-01-01T00:00:00Z, held: sent once released by 1970-01-01T00:05:00Z"
            " (the misfire grace), else carried over to its next free slot",
        ),
        ("freeze", "held by freeze: incident 7"),
    ]
    late = explain.explain(facts, msgspec.structs.replace(rules, now_ms=600_000))
    assert late[0].words == (
        "its start 1970-01-01T00:00:00Z is more than the misfire grace of 300 s past:"
        " it was held, so it is carried over to its next free slot"
    )
    released = msgspec.structs.replace(facts, gates_now=[], hold_ms=None)
    assert explain.explain(released, rules)[0].words == (
        "due since 1970-01-01T00:00:00Z: the dispatcher sends it now"
    )
