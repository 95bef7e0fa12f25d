"""Change tickets against a real HTTP server on loopback playing CMSO's ticket system
(tests/fake_http.py FakeTM), through the daemon's control socket: the calls and their bodies,
a TM outage, refused approval, failed creation (417, nothing stored), already closed, cancel,
active tickets; and the built-in ticket book."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from cmsod.lifecycle import parse_time_ms
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, ControlClient, Daemon, start_daemon, wait_until
from tests.fake_http import FakeTM, Reply
from tests.procs import Daemon as DaemonProcess
from tests.procs import cmsoctl

APPROVE = "io.cmsod.Schedules.Approve"
CREATE = "io.cmsod.Schedules.Create"
DONE = (S.COMPLETED, S.COMPLETED_WITH_ERRORS)
CLOSES_HELD_S = 600  # how long TM stays down after the work flows ended
CREATE_KEYS = {
    "category",
    "type",
    "VNF",
    "summary",
    "description",
    "requesterId",
    "plannedStartDate",
    "plannedEndDate",
    "reason",
    "assetList",
}


async def daemon_for(nursery: trio.Nursery, tmp_path: Path, tm: FakeTM, **overrides: Any) -> Daemon:
    await nursery.start(tm.serve)
    secret = tmp_path / "tm.credentials"
    secret.write_text("tm-user:t0ps3cret\n")
    settings: dict[str, Any] = dict(
        tickets__mode="http",
        tickets__url=tm.url,
        tickets__credentials_file=secret,
        tickets__read_timeout_s=5,
    )
    settings.update(overrides)
    return await start_daemon(nursery, tmp_path, **settings)


def two_groups(schedule_id: str) -> dict[str, Any]:
    """Group east a1..a3 and group west b1, b2; all five fit the first slot."""
    body = request(
        schedule_id,
        now=EPOCH,
        nodes=["a1", "a2", "a3", "b1", "b2"],
        minutes_from_now=60,
        extra_domain_data={"summary": "${dd.WorkflowName} in ${dd.region}", "region": "east"},
    )
    details = body["schedulingInfo"]["vnfDetails"][0]
    body["schedulingInfo"]["vnfDetails"] = [
        {**details, "groupId": "east", "node": ["a1", "a2", "a3"]},
        {**details, "groupId": "west", "node": ["b1", "b2"]},
    ]
    return body


def items(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["vnfName"]: e for g in view["groups"] for e in g["changeManagementSchedules"]}


async def tickets(client: ControlClient, schedule_id: str) -> list[dict[str, Any]]:
    return (await client.ok("io.cmsod.Tickets.List", scheduleId=schedule_id))["tickets"]


async def all_tickets_closed(client: ControlClient, schedule_id: str) -> None:
    async def closed() -> bool:
        found = await tickets(client, schedule_id)
        return all(t["status"] == "Closed" and not t["pendingOperations"] for t in found)

    await wait_until(closed, f"every ticket of {schedule_id} closed in TM")


async def test_two_groups_two_per_ticket_make_exactly_cmsos_calls_in_order(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    cmsod = await daemon_for(nursery, tmp_path, tm, tickets__vnfs_per_ticket=2)
    client = await cmsod.connect()
    await client.ok(CREATE, schedule=two_groups("s2"))
    planned = await client.wait_for("s2", S.PENDING_APPROVAL)
    assert (await client.ok(APPROVE, scheduleId="s2", approval=approval()))["status"] == S.SCHEDULED
    view = await client.wait_for("s2", *DONE)
    assert view["status"] == S.COMPLETED
    await all_tickets_closed(client, "s2")

    # The optimizer asked TM's active tickets first, about all five elements.
    assert tm.calls[0][0] == "activetickets"
    assert {e["elementId"] for e in tm.calls[0][1]["elements"]} == {"a1", "a2", "a3", "b1", "b2"}
    calls = tm.calls[1:]
    creates = [body for call, body in calls if call == "create"]
    assert sorted(b["assetList"] for b in creates) == ["[a1, a2]", "[a3]", "[b1, b2]"]
    assert len(calls) == 4 * len(creates)  # create, get, update, close: nothing else
    last_create = max(i for i, (call, _) in enumerate(calls) if call == "create")
    assert all(call != "create" for call, _ in calls[last_create + 1 :])
    groups = {g["groupId"]: g for g in planned["groups"]}
    by_vnf = items(view)
    for body in creates:
        change_id = body["changeId"]
        assert tm.of(change_id) == ["create", "get", "update", "close"]
        assert set(body) - {"changeId"} == CREATE_KEYS
        group = groups["east" if body["VNF"].startswith("a") else "west"]
        assert body["plannedStartDate"] == parse_time_ms(group["startTime"]) // 1000
        assert body["plannedEndDate"] == parse_time_ms(group["finishTime"]) // 1000
        assert body["category"] == "Virtual Network Change" and body["type"] == "Maintenance"
        assert body["description"] == "Execute workflow Replace for VNF(s)"
        assert body["summary"] == "Replace in east"  # domain data overrides the template
        assert body["requesterId"] == "jf9860" and body["reason"] == ""
        vnfs = body["assetList"].strip("[]").split(", ")
        assert {by_vnf[v]["tmChangeId"] for v in vnfs} == {change_id}
        assert all(by_vnf[v]["tmStatus"] == "Closed" for v in vnfs)
        update = next(b for c, b in calls if c == "update" and b["changeId"] == change_id)
        assert update == {
            "changeId": change_id,
            "status": "WorkInProgress",
            "requesterId": "jf9860",
        }
        close = next(b for c, b in calls if c == "close" and b["changeId"] == change_id)
        dispatched = min(parse_time_ms(by_vnf[v]["dispatchTime"]) for v in vnfs)
        completed = max(parse_time_ms(by_vnf[v]["executionCompletedTime"]) for v in vnfs)
        assert close == {
            "changeId": change_id,
            "status": "Closed",
            "changeClosedBy": "jf9860",
            "closureCode": "Successful As Scheduled",
            "closingComments": "Successful As Scheduled",
            "actualStartDate": dispatched // 1000,
            "actualEndDate": completed // 1000,
        }
    secret = "Basic " + base64.b64encode(b"tm-user:t0ps3cret").decode()
    assert all(r.headers["authorization"] == secret for r in tm.requests)
    assert all(r.headers["x-fromappid"] == "cmso" for r in tm.requests)
    listed = await tickets(client, "s2")
    assert sorted(t["closureCode"] for t in listed) == ["Successful As Scheduled"] * 3
    one = (await client.ok("io.cmsod.Tickets.Get", id=creates[0]["changeId"]))["ticket"]
    assert [o["operation"] for o in one["operations"]] == ["update", "close"]
    assert all(o["attempts"] == 1 and "sentDateTime" in o for o in one["operations"])


async def test_a_ticket_system_down_for_a_while_delays_tickets_but_loses_none(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    cmsod = await daemon_for(nursery, tmp_path, tm, control__idle_timeout_s=86400)
    client = await cmsod.connect()
    await client.ok(CREATE, schedule=request("outage", now=EPOCH, nodes=["node1", "node2"]))
    planned = await client.wait_for("outage", S.PENDING_APPROVAL)
    start_s = parse_time_ms(items(planned)["node1"]["startTime"]) / 1000
    await client.ok(APPROVE, scheduleId="outage", approval=approval())

    tm.down = True  # from before the dispatch: the ticket checks get no answer
    await trio.sleep_until(start_s - EPOCH.timestamp() + 120)
    held = await client.schedule("outage")
    assert {i["status"] for i in items(held).values()} == {E.SCHEDULED}  # held, not failed
    health = await client.ok("io.cmsod.Manager.Status")
    assert {c["name"]: c["status"] for c in health["components"]}["TM Interface"] == "FAILED"

    tm.down = False
    view = await client.wait_for("outage", S.NOTIFICATIONS_INITIATED)
    await wait_until(
        lambda: _statuses_are(client, "outage", {E.TRIGGERED}), "both dispatched once TM is back"
    )
    tm.down = True  # and down again while the work flows run and end: closes must wait
    view = await client.wait_for("outage", *DONE)
    assert view["status"] == S.COMPLETED
    assert all(
        parse_time_ms(i["dispatchTime"]) / 1000 > start_s + 100 for i in items(view).values()
    )
    await trio.sleep_until(trio.current_time() + CLOSES_HELD_S)
    waiting = await tickets(client, "outage")
    assert [t["pendingOperations"] for t in waiting] == [1, 1]  # the closes, kept
    detail = (await client.ok("io.cmsod.Tickets.Get", id=waiting[0]["changeId"]))["ticket"]
    assert detail["operations"][-1]["attempts"] > 3
    assert "HTTP 503" in detail["operations"][-1]["lastError"]

    tm.down = False
    await all_tickets_closed(client, "outage")
    for ticket in waiting:
        assert tm.of(ticket["changeId"]) == ["create", "get", "update", "close"]


async def _statuses_are(client: ControlClient, schedule_id: str, statuses: set[str]) -> bool:
    return {i["status"] for i in items(await client.schedule(schedule_id)).values()} == statuses


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_a_refused_approval_stops_only_that_elements_dispatch(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    tm.refuse = {"node2"}
    cmsod = await daemon_for(nursery, tmp_path, tm)
    client = await cmsod.connect()
    await client.ok(
        CREATE, schedule=request("refused", now=EPOCH, nodes=["node1", "node2", "node3"])
    )
    await client.wait_for("refused", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="refused", approval=approval())
    view = await client.wait_for("refused", *DONE)
    assert view["status"] == S.COMPLETED_WITH_ERRORS
    by_vnf = items(view)
    assert {n: i["status"] for n, i in by_vnf.items()} == {
        "node1": E.COMPLETED,
        "node2": E.SCHEDULING_FAILED,
        "node3": E.COMPLETED,
    }
    change_id = by_vnf["node2"]["tmChangeId"]
    assert by_vnf["node2"]["statusMessage"] == (
        f"CM_TICKET_NOT_APPROVED: change ticket {change_id} is Rejected|Scheduled; dispatch "
        "needs one of Approved|Scheduled, Approved|WorkInProgress (tickets.dispatch_allowed)"
    )
    assert sorted(vnf for _, vnf in cmsod.ctx.so.dispatched) == ["node1", "node3"]  # type: ignore[attr-defined]
    await all_tickets_closed(client, "refused")
    assert tm.of(change_id) == ["create", "get", "close"]
    close = next(b for c, b in tm.calls if c == "close" and b["changeId"] == change_id)
    assert close["closureCode"] == "Unsuccessful"
    assert close["closingComments"] == "Change management request failed for one or more VNFs"


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_ticket_creation_failing_at_approval_is_417_and_stores_nothing(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    cmsod = await daemon_for(nursery, tmp_path, tm)
    client = await cmsod.connect()
    await client.ok(CREATE, schedule=request("no-tm", now=EPOCH, nodes=["node1", "node2"]))
    before = await client.wait_for("no-tm", S.PENDING_APPROVAL)
    tm.faults[tm.count + 2] = Reply(500, b"TM database locked")  # the second create
    reply = await client.call(APPROVE, scheduleId="no-tm", approval=approval())
    assert reply["error"] == "io.cmsod.RequestError"
    assert reply["parameters"]["status"] == 417
    error = reply["parameters"]["requestError"]
    assert error["messageId"] == "Scheduler.UNABLE_TO_CREATE_CHANGE_TICKET"
    assert error["text"] == (
        "Unable to create change ticket in TM: Schedule ID: no-tm : Reason : "
        "TM answered HTTP 500: TM database locked"
    )
    after = await client.schedule("no-tm")
    assert after == before  # not accepted, no approval recorded, no ticket on any element
    assert "scheduleApprovals" not in after or after["scheduleApprovals"] == []
    # the ticket TM did open is cancelled, not left behind
    opened = [b["changeId"] for c, b in tm.calls if c == "create"]
    assert len(opened) == 1
    await wait_until(lambda: _called(tm, "cancel", opened[0]), "the orphan ticket cancelled")

    # TM works again: the same approval now goes through
    assert (await client.ok(APPROVE, scheduleId="no-tm", approval=approval()))[
        "status"
    ] == S.SCHEDULED
    assert all(
        i["tmChangeId"] not in opened for i in items(await client.schedule("no-tm")).values()
    )


async def _called(tm: FakeTM, call: str, change_id: str) -> bool:
    return call in tm.of(change_id)


async def test_an_immediate_request_tm_refuses_is_417_and_not_stored(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    tm.faults[1] = Reply(503, b"maintenance")
    cmsod = await daemon_for(nursery, tmp_path, tm)
    client = await cmsod.connect()
    body = request("now", now=EPOCH, nodes=["node1"], minutes_from_now=None)
    reply = await client.call(CREATE, schedule=body)
    assert reply["parameters"]["status"] == 417
    missing = await client.call("io.cmsod.Schedules.Get", scheduleId="now")
    assert missing["parameters"]["requestError"]["messageId"] == "Scheduler.SCHEDULE_NOT_FOUND"
    created = await client.ok(CREATE, schedule=body)  # TM answers now
    assert created["status"] == S.SCHEDULED
    view = await client.wait_for("now", *DONE)
    assert view["status"] == S.COMPLETED


async def test_a_close_tm_says_is_already_closed_counts_as_done(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    tm.closed_already = True
    cmsod = await daemon_for(nursery, tmp_path, tm)
    client = await cmsod.connect()
    await client.ok(
        CREATE, schedule=request("closed", now=EPOCH, nodes=["node1"], minutes_from_now=None)
    )
    await client.wait_for("closed", *DONE)
    await all_tickets_closed(client, "closed")
    (ticket,) = await tickets(client, "closed")
    assert tm.of(ticket["changeId"]) == ["create", "get", "update", "already-closed"]
    detail = (await client.ok("io.cmsod.Tickets.Get", id=ticket["changeId"]))["ticket"]
    assert [o["attempts"] for o in detail["operations"]] == [1, 1]


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_deleting_a_scheduled_schedule_cancels_its_tickets(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    cmsod = await daemon_for(nursery, tmp_path, tm, tickets__vnfs_per_ticket=2)
    client = await cmsod.connect()
    await client.ok(CREATE, schedule=request("gone", now=EPOCH, nodes=["n1", "n2", "n3"]))
    await client.wait_for("gone", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="gone", approval=approval())
    assert (await client.ok("io.cmsod.Schedules.Delete", scheduleId="gone"))[
        "status"
    ] == S.CANCELLED
    await all_tickets_closed(client, "gone")
    cancels = [b for c, b in tm.calls if c == "cancel"]
    assert sorted(b["changeId"] for b in cancels) == sorted(
        b["changeId"] for c, b in tm.calls if c == "create"
    )
    assert cancels[0] == {
        "changeId": cancels[0]["changeId"],
        "status": "Closed",
        "changeClosedBy": "jf9860",
        "closureCode": "Cancelled",
        "closingComments": "Cancel requested by user",
    }
    assert not [c for c, _ in tm.calls if c in ("get", "update", "close")]


async def test_tms_active_tickets_block_an_element_and_what_it_requires(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    tm.active = [
        {
            "id": "TK1",
            "startTime": "2026-12-01T08:00:00Z",
            "endTime": "2026-12-01T10:30:00Z",
            "elementIds": ["pserver-1"],
            "availability": "unavailable",
        },
        {  # "full" availability: the element can still be worked on
            "id": "TK2",
            "startTime": "2026-12-01T08:00:00Z",
            "endTime": "2026-12-02T08:00:00Z",
            "elementIds": ["node2"],
            "availability": "full",
        },
    ]
    cmsod = await daemon_for(nursery, tmp_path, tm)
    client = await cmsod.connect()
    body = request("hosted", now=EPOCH, nodes=["node1", "node2"])
    body["schedulingInfo"]["elements"] = [
        {"elementId": "node1", "elementData": [{"name": "requires", "value": "pserver-1"}]}
    ]
    await client.ok(CREATE, schedule=body)
    view = await client.wait_for("hosted", S.PENDING_APPROVAL)
    starts = {n: i["startTime"] for n, i in items(view).items()}
    assert starts == {"node1": "2026-12-01T11:01:00Z", "node2": "2026-12-01T08:01:00Z"}
    asked = tm.calls[0][1]
    assert {e["elementId"] for e in asked["elements"]} == {"node1", "node2", "pserver-1"}
    assert asked["changeWindows"] == [
        {"startTime": "2026-12-01T08:01:00Z", "endTime": "2026-12-02T08:01:00Z"}
    ]


async def test_when_tms_active_tickets_fail_the_plan_waits_and_then_goes_on(
    autojump_clock, nursery, tmp_path
) -> None:
    tm = FakeTM()
    tm.down = True
    cmsod = await daemon_for(nursery, tmp_path, tm)
    client = await cmsod.connect()
    await client.ok(CREATE, schedule=request("waits", now=EPOCH, nodes=["node1"]))
    await trio.sleep_until(trio.current_time() + 3 * 10)  # three optimizer sweeps
    assert (await client.schedule("waits"))["status"] == S.OPTIMIZATION_IN_PROGRESS
    tm.down = False
    await client.wait_for("waits", S.PENDING_APPROVAL)


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
async def test_the_builtin_book_keeps_the_tickets_and_checks_them(
    autojump_clock, client: ControlClient
) -> None:
    await client.ok(CREATE, schedule=request("book", now=EPOCH, nodes=["node1", "node2"]))
    await client.wait_for("book", S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId="book", approval=approval())
    opened = await tickets(client, "book")
    assert [(t["approvalStatus"], t["status"]) for t in opened] == [("Approved", "Scheduled")] * 2
    view = await client.wait_for("book", *DONE)
    assert view["status"] == S.COMPLETED
    await all_tickets_closed(client, "book")
    detail = (await client.ok("io.cmsod.Tickets.Get", id=opened[0]["changeId"]))["ticket"]
    assert detail["closureCode"] == "Successful As Scheduled"
    assert [o["operation"] for o in detail["operations"]] == ["update", "close"]
    assert detail["elements"][0]["status"] == E.COMPLETED
    missing = await client.call("io.cmsod.Tickets.Get", id="CHG-none")
    assert missing["error"] == "io.cmsod.Tickets.NoSuchTicket"


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL
def test_ticket_operations_survive_kill_9_and_cmsoctl_shows_them(tmp_path: Path) -> None:
    """The real daemon in http mode: TM goes down while the work flows end, the daemon is
    killed with closes still queued, and after a restart (TM back) every ticket is closed once."""
    tm = FakeTM()
    stop_tm = tm.in_thread()
    env = {
        "CMSOD_TICKETS__MODE": "http",
        "CMSOD_TICKETS__URL": tm.url,
        "CMSOD_TICKETS__RETRY_BASE_S": "0.2",
        "CMSOD_TICKETS__RETRY_MAX_S": "0.5",
    }
    try:
        daemon = DaemonProcess(tmp_path, extra_env=env)
        body = request("kept", now=EPOCH, nodes=["node1", "node2"], minutes_from_now=None)
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body)) == (0, "kept: Scheduled\n")
        daemon.wait_log(r"event=element\.dispatched .*vnf=node", count=2)
        tm.down = True
        daemon.wait_log(r"event=schedule\.finished schedule_id=kept status=Completed")
        # the updates (if they did not go before TM went down) and the closes are queued
        daemon.wait_log(r"event=ticket\.retry .*op=(update|close)", count=4)
        daemon.kill()
        tm.down = False
        daemon = DaemonProcess(tmp_path, extra_env=env)
        daemon.wait_log(r"event=ticket\.closed .*op=close", count=2)
        code, out = cmsoctl(tmp_path, "--json", "tickets", "--schedule", "kept")
        listed = json.loads(out)["tickets"]
        assert code == 0 and [t["status"] for t in listed] == ["Closed", "Closed"]
        for ticket in listed:
            assert tm.of(ticket["changeId"]) == ["create", "get", "update", "close"]
        code, out = cmsoctl(tmp_path, "tickets")
        assert code == 0 and out.count("Approved|Closed") == 2, out
        shown = [cmsoctl(tmp_path, "ticket", t["changeId"]) for t in listed]
        for code, out in shown:
            assert code == 0 and "Successful As Scheduled" in out and "close" in out, out
        # the failed attempts are kept with the operation (of the ticket whose operations were
        # tried while TM was down: the 4 retries logged may all be one ticket's)
        assert any("HTTP 503" in out for _, out in shown), shown
        assert daemon.stop() == 0
    finally:
        stop_tm()
