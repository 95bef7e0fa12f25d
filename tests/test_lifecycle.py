"""The state machines through a running daemon: lateness, partial plans, refusals, restarts,
and the crash window between a dispatch intent and the orchestrator's answer."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.peers.so import LoopbackSO, SoStatus
from cmsod.wire.events import CmEvent
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, start_daemon, store_rows, wait_until

CREATE = "io.cmsod.Schedules.Create"
APPROVE = "io.cmsod.Schedules.Approve"


def statuses(view: dict) -> dict[str, str]:
    return {
        e["vnfName"]: e["status"] for g in view["groups"] for e in g["changeManagementSchedules"]
    }


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_left_pending_past_its_first_slot_it_expires(
    autojump_clock, nursery, tmp_path: Path
) -> None:
    """An approver who comes back after the first slot began finds the schedule `Expired`
    (not approved then dispatched `Past due`, as CMSO would): nothing of it runs."""
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    await client.ok(
        CREATE, schedule=request("late", now=EPOCH, nodes=["node1"], normal=60, minutes_from_now=1)
    )
    view = await client.wait_for("late", S.PENDING_APPROVAL)
    start = view["groups"][0]["changeManagementSchedules"][0]["startTime"]
    autojump_clock.jump(3600)  # the approver comes back an hour later
    await client.aclose()  # (an hour idle is past the socket's idle timeout: connect anew)
    client = await cmsod.connect()
    view = await client.wait_for("late", S.EXPIRED)
    assert view["control"]["action"] == "expire" and view["control"]["by"] == "cmsod"
    assert view["control"]["reason"] == (
        f"not approved before its first slot passed ({start} + 300 s; [dispatcher] misfire_grace_s)"
    )
    element = view["groups"][0]["changeManagementSchedules"][0]
    assert element["status"] == E.EXPIRED and start in element["statusMessage"]
    refused = await client.call(APPROVE, scheduleId="late", approval=approval())
    assert refused["parameters"]["status"] == 412  # CMSO's NOT_PENDING_APPROVAL
    assert isinstance(cmsod.ctx.so, LoopbackSO) and cmsod.ctx.so.dispatched == []


@pytest.mark.parametrize("allow_partial", [False, True])
async def test_elements_that_do_not_fit(
    autojump_clock, nursery, tmp_path: Path, allow_partial: bool
) -> None:
    cmsod = await start_daemon(nursery, tmp_path, optimizer__allow_partial=allow_partial)
    client = await cmsod.connect()
    body = request(
        "tight", now=EPOCH, nodes=["node1", "node2", "node3"], normal=3600, concurrency=1
    )
    body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["endTime"] = (
        "2026-12-01T10:01:00Z"  # 2 slots
    )
    await client.ok(CREATE, schedule=body)
    view = await client.wait_for("tight", S.PENDING_APPROVAL, S.OPTIMIZATION_FAILED)
    left_out = {n: s for n, s in statuses(view).items() if s == E.NOT_SCHEDULED}
    assert list(left_out) == ["node3"]
    item = [e for e in view["groups"][0]["changeManagementSchedules"] if e["vnfName"] == "node3"][0]
    assert item["statusMessage"].startswith("ConcurrencyConstraint: all 2 slots")
    if not allow_partial:
        assert view["status"] == S.OPTIMIZATION_FAILED
        assert "1 of 3 elements could not be scheduled" in view["optimizerMessage"]
        return
    assert view["status"] == S.PENDING_APPROVAL
    await client.ok(APPROVE, scheduleId="tight", approval=approval())
    view = await client.wait_for("tight", S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED  # the left-out element neither runs nor spoils it (bug 5)
    assert statuses(view) == {"node1": E.COMPLETED, "node2": E.COMPLETED, "node3": E.NOT_SCHEDULED}
    assert sorted(v for _, v in cmsod.ctx.so.dispatched) == ["node1", "node2"]


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_concurrency_limit_holds_and_windows_are_all_used(
    autojump_clock, nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    nodes = [f"n{i}" for i in range(7)]
    body = request(
        "waves", now=EPOCH, nodes=nodes, normal=3000, additional=600, concurrency=2, windows=2
    )
    first = body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]
    first["endTime"] = "2026-12-01T11:01:00Z"  # 3 slots of an hour in window one, the rest in two
    await client.ok(CREATE, schedule=body)
    view = await client.wait_for("waves", S.PENDING_APPROVAL)
    starts = sorted(e["startTime"] for e in view["groups"][0]["changeManagementSchedules"])
    assert starts == [
        "2026-12-01T08:01:00Z",
        "2026-12-01T08:01:00Z",
        "2026-12-01T09:01:00Z",
        "2026-12-01T09:01:00Z",
        "2026-12-01T10:01:00Z",
        "2026-12-01T10:01:00Z",
        "2026-12-02T08:01:00Z",
    ]


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_not_pending_approval_is_412(autojump_clock, client) -> None:
    await client.ok(CREATE, schedule=request("early", now=EPOCH, minutes_from_now=30))
    await client.wait_for("early", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="early", approval=approval())
    await client.wait_for("early", S.SCHEDULED)
    reply = await client.call(APPROVE, scheduleId="early", approval=approval())
    assert reply["parameters"]["status"] == 412
    assert reply["parameters"]["requestError"]["text"].endswith("scheduleId=early state=Scheduled")


async def test_delete_while_in_progress_is_406_and_changes_nothing(autojump_clock, client) -> None:
    await client.ok(
        CREATE, schedule=request("busy", now=EPOCH, nodes=["node1", "node2"], concurrency=1)
    )
    await client.wait_for("busy", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="busy", approval=approval())
    await client.wait_for("busy", S.NOTIFICATIONS_INITIATED)
    reply = await client.call("io.cmsod.Schedules.Delete", scheduleId="busy")
    assert reply["parameters"]["status"] == 406
    assert reply["parameters"]["requestError"]["messageId"] == "Scheduler.CANNOT_CANCEL_IN_PROGRESS"
    view = await client.schedule("busy")
    assert view["status"] == S.NOTIFICATIONS_INITIATED
    assert not set(statuses(view).values()) & {E.CANCELLED, E.DELETED}  # no side effect (bug 15)
    assert (await client.wait_for("busy", S.COMPLETED))["status"] == S.COMPLETED
    # deleting after completion keeps how each element ended (bug 15)
    await client.ok("io.cmsod.Schedules.Delete", scheduleId="busy")
    assert set(statuses(await client.schedule("busy")).values()) == {E.COMPLETED}


async def test_restart_rebuilds_work_from_the_store(
    autojump_clock, nursery, tmp_path: Path
) -> None:
    first = await start_daemon(nursery, tmp_path)
    client = await first.connect()
    await client.ok(
        CREATE,
        schedule=request("survivor", now=EPOCH, nodes=["node1", "node2", "node3"], concurrency=1),
    )
    await client.wait_for("survivor", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="survivor", approval=approval())
    await client.wait_for("survivor", S.NOTIFICATIONS_INITIATED)

    async def node1_triggered() -> bool:
        return statuses(await client.schedule("survivor"))["node1"] == E.TRIGGERED

    await wait_until(node1_triggered, "node1 triggered")
    await trio.testing.wait_all_tasks_blocked()  # nothing in flight: the others are hours away
    first.cancel.cancel()
    await trio.testing.wait_all_tasks_blocked()
    second = await start_daemon(nursery, tmp_path)
    client = await second.connect()
    view = await client.wait_for("survivor", S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    attempts = store_rows(tmp_path, "SELECT name, dispatch_attempts FROM elements ORDER BY name")
    assert attempts == [("node1", 1), ("node2", 1), ("node3", 1)]
    second.cancel.cancel()


class SilentSO(LoopbackSO):
    """Receives the work flow, then never answers (the daemon dies before it can)."""

    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        self.dispatched.append((key, vnf_name))
        await trio.sleep_forever()
        raise AssertionError

    async def status(self, request_id: str) -> SoStatus:
        return await super().status(request_id)


@pytest.mark.parametrize("resend", [False, True])
@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_dispatch_caught_between_intent_and_answer(
    autojump_clock, nursery, tmp_path: Path, resend: bool
) -> None:
    silent = SilentSO(clock=None)  # type: ignore[arg-type]
    first = await start_daemon(nursery, tmp_path, so=silent, so__resend_unconfirmed=resend)
    silent.clock = first.ctx.clock
    client = await first.connect()
    await client.ok(CREATE, schedule=request("caught", now=EPOCH, minutes_from_now=None, normal=60))

    async def sent() -> bool:
        return bool(silent.dispatched)

    await wait_until(sent, "the work flow sent")
    first.cancel.cancel()  # the daemon "dies" with the call in flight
    await trio.testing.wait_all_tasks_blocked()

    second = await start_daemon(nursery, tmp_path, so__resend_unconfirmed=resend)
    client = await second.connect()
    view = await client.wait_for("caught", S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    element = view["groups"][0]["changeManagementSchedules"][0]
    ((key, _),) = silent.dispatched
    if resend:
        assert view["status"] == S.COMPLETED
        assert second.ctx.so.dispatched == [(key, "node1")]  # same X-TransactionId again
    else:
        assert view["status"] == S.COMPLETED_WITH_ERRORS
        assert element["status"] == E.ERROR
        assert (
            "dispatch outcome unknown" in element["statusMessage"]
            and key in element["statusMessage"]
        )
        assert second.ctx.so.dispatched == []  # never blindly re-sent
    second.cancel.cancel()


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_every_transition_is_an_event_in_order(
    autojump_clock, nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    await client.ok(CREATE, schedule=request("evented", now=EPOCH, nodes=["node1", "node2"]))
    await client.wait_for("evented", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="evented", approval=approval())
    await client.wait_for("evented", S.COMPLETED)

    async def all_sent() -> bool:
        return (await client.ok("io.cmsod.Manager.Status"))["counts"]["eventsPending"] == 0

    await wait_until(all_sent, "every event sent")
    lines = (tmp_path / "events" / "cm-events.jsonl").read_bytes().splitlines()
    events = [msgspec.json.decode(line, type=CmEvent) for line in lines]
    patches = [e.event.push_change_update.datastore_changes.yang_patch for e in events]
    assert [p.patch_id for p in patches] == [f"evented:{i}" for i in range(1, len(patches) + 1)]
    assert len({e.eventId for e in events}) == len(events)
    assert all(e.eventCorrelationId == "evented" for e in events)
    schedule_statuses = [
        edit.value["cm-schedule:schedule"][0]["status"]
        for p in patches
        for edit in p.edit
        if edit.target.endswith("schedule=evented")
    ]
    assert schedule_statuses == [
        S.PENDING_SCHEDULE,
        S.OPTIMIZATION_IN_PROGRESS,
        S.PENDING_APPROVAL,
        S.ACCEPTED,
        S.SCHEDULED,
        S.NOTIFICATIONS_INITIATED,
        S.COMPLETED,
    ]
    node1 = [
        edit.value["cm-schedule:vnf"][0]["status"]
        for p in patches
        for edit in p.edit
        if edit.target.endswith("vnf=node1")
    ]
    assert node1 == [E.PENDING_APPROVAL, E.SCHEDULED, E.TRIGGERED, E.COMPLETED]
    assert patches[0].edit[0].operation == "create"
