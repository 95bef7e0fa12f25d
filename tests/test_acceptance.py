"""CMSO's own acceptance scenarios (reference/cmso.md 8.1), replayed through the control
socket of an in-process daemon. MockClock runs the minutes and hours they take in milliseconds."""

from __future__ import annotations

import pytest

from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import NODES, approval, request
from tests.conftest import EPOCH, ControlClient, Daemon

CREATE = "io.cmsod.Schedules.Create"
APPROVE = "io.cmsod.Schedules.Approve"
DELETE = "io.cmsod.Schedules.Delete"
DETAILS = "io.cmsod.Schedules.Details"

FUTURE_CASES = {
    "one-vnf-one-window": dict(nodes=["node1"], normal=3600, additional=0),
    "multiple-vnfs-one-window": dict(
        nodes=["node1", "node2", "node3"], normal=3600, additional=0, concurrency=10
    ),
    "multiple-vnfs-two-windows": dict(
        nodes=NODES, normal=3000, additional=600, group_id="Group1", windows=2
    ),
    "one-vnf-one-window-update": dict(nodes=["node1"], workflow="Update"),
}

# Every test here runs on SQLite and on PostgreSQL (the `backend` fixture).
pytestmark = pytest.mark.usefixtures("backend")


def statuses(view: dict) -> dict[str, str]:
    return {
        e["vnfName"]: e["status"] for g in view["groups"] for e in g["changeManagementSchedules"]
    }


@pytest.mark.parametrize("case", FUTURE_CASES)
async def test_future_schedule_is_approved_and_completes(
    autojump_clock, client: ControlClient, case: str
) -> None:
    body = request(case, now=EPOCH, **FUTURE_CASES[case])
    created = await client.ok(CREATE, schedule=body)
    assert created == {"scheduleId": case, "status": S.PENDING_SCHEDULE}
    view = await client.wait_for(case, S.PENDING_APPROVAL)
    assert view["optimizerStatus"] == "COMPLETED"
    assert set(statuses(view).values()) == {E.PENDING_APPROVAL}
    for group in view["groups"]:
        for item in group["changeManagementSchedules"]:
            assert item["startTime"] >= group["changeWindows"][0]["startTime"]

    # accepted, and its change tickets opened, in one transaction
    assert (await client.ok(APPROVE, scheduleId=case, approval=approval()))["status"] == S.SCHEDULED
    view = await client.wait_for(case, S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    assert set(statuses(view).values()) == {E.COMPLETED}
    rows = (await client.ok(DETAILS, filters={"request.scheduleId": [case]}))["details"]
    assert len(rows) == len(FUTURE_CASES[case]["nodes"])
    assert {r["status"] for r in rows} == {E.COMPLETED}
    assert all(r["tmChangeId"].startswith("CHG") and r["msoRequestId"] for r in rows)
    assert (await client.ok(DELETE, scheduleId=case))["status"] == S.DELETED


IMMEDIATE_CASES = {
    "immediate-replace": dict(workflow="Replace"),
    "immediate-config-update": dict(workflow="VNF Config Update"),
    "immediate-software-in-place": dict(workflow="VNF Update Software In Place"),
    "immediate-update": dict(workflow="Update"),
    "immediate-multiple": dict(
        nodes=["node1", "node2", "node3"], normal=3000, additional=600, concurrency=None
    ),
}


@pytest.mark.parametrize("case", IMMEDIATE_CASES)
async def test_immediate_schedule_is_auto_approved_and_completes(
    autojump_clock, client: ControlClient, case: str
) -> None:
    options = dict(
        normal=100,
        additional=10,
        group_id="group1",
        extra_domain_data={"plans": "x", "question.000000000000001": "y"},
    )
    options.update(IMMEDIATE_CASES[case])
    created = await client.ok(
        CREATE, schedule=request(case, now=EPOCH, minutes_from_now=None, **options)
    )
    assert created["status"] == S.SCHEDULED  # auto-approved (Tier 2), tickets opened
    view = await client.wait_for(case, S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    assert set(statuses(view).values()) == {E.COMPLETED}
    assert view["scheduleApprovals"][0]["userId"] == "jf9860"
    assert view["scheduleApprovals"][0]["approvalType"] == "Tier 2"


@pytest.mark.parametrize("case", FUTURE_CASES)
async def test_cancel_after_approval(autojump_clock, client: ControlClient, case: str) -> None:
    await client.ok(
        CREATE, schedule=request(case, now=EPOCH, minutes_from_now=20, **FUTURE_CASES[case])
    )
    await client.wait_for(case, S.PENDING_APPROVAL)
    await client.ok(APPROVE, scheduleId=case, approval=approval())
    await client.wait_for(case, S.SCHEDULED)
    assert (await client.ok(DELETE, scheduleId=case))["status"] == S.CANCELLED
    view = await client.schedule(case)
    assert view["status"] == S.CANCELLED and "deleteDateTime" in view
    assert set(statuses(view).values()) == {E.CANCELLED}


async def test_rejection(autojump_clock, client: ControlClient) -> None:
    body = request("reject-me", now=EPOCH, normal=100, additional=10)
    await client.ok(CREATE, schedule=body)
    await client.wait_for("reject-me", S.PENDING_APPROVAL)
    assert (await client.ok(APPROVE, scheduleId="reject-me", approval=approval("Rejected")))[
        "status"
    ] == S.REJECTED
    view = await client.schedule("reject-me")
    assert view["status"] == S.REJECTED
    assert set(statuses(view).values()) == {E.APPROVAL_REJECTED}


def failure(**options):
    defaults = dict(group_id="", normal=100, additional=10, policy="dummy-id")
    defaults.update(options)
    return defaults


def swapped(body: dict) -> dict:
    window = body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]
    window["startTime"], window["endTime"] = window["endTime"], window["startTime"]
    return body


def blank_window(key: str):
    def edit(body: dict) -> dict:
        body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0][key] = ""
        return body

    return edit


def set_key(path: list[str], value):
    def edit(body: dict) -> dict:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return body

    return edit


def drop_durations(body: dict) -> dict:
    body["schedulingInfo"].pop("normalDurationInSeconds", None)
    body["schedulingInfo"].pop("additionalDurationInSeconds", None)
    return body


# (name, request options, edit, expected messageId, expected variables)
FAILURES = [
    ("empty-domain", failure(domain=""), None, "Scheduler.INVALID_ATTRIBUTE", ["domain", ""]),
    (
        "empty-schedule-id",
        failure(),
        set_key(["scheduleId"], ""),
        "Scheduler.INVALID_ATTRIBUTE",
        ["scheduleId", ""],
    ),
    (
        "empty-user-id",
        failure(user=""),
        None,
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["userId", ""],
    ),
    (
        "negative-normal-duration",
        failure(normal=-5),
        None,
        "Scheduler.INVALID_ATTRIBUTE",
        ["normalDurationInSeconds", "-5"],
    ),
    (
        "no-end-time",
        failure(),
        blank_window("endTime"),
        "Scheduler.INVALID_ATTRIBUTE",
        ["endTime", ""],
    ),
    (
        "no-start-time",
        failure(),
        blank_window("startTime"),
        "Scheduler.INVALID_ATTRIBUTE",
        ["startTime", ""],
    ),
    (
        "no-node-name",
        failure(),
        set_key(["schedulingInfo", "vnfDetails", 0, "node"], [""]),
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["CallbackData", ""],
    ),
    ("switched-time", failure(), swapped, "Scheduler.INVALID_CHANGE_WINDOW", None),
    # ChangeManagementImmediateFailure
    (
        "immediate-empty-id-no-durations",
        failure(minutes_from_now=None),
        lambda b: drop_durations(set_key(["scheduleId"], "")(b)),
        "Scheduler.INVALID_ATTRIBUTE",
        ["scheduleId", ""],
    ),
    (
        "immediate-no-durations",
        failure(minutes_from_now=None),
        drop_durations,
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["additionalDurationInSeconds"],
    ),
    (
        "immediate-empty-scheduling-info",
        failure(minutes_from_now=None),
        set_key(["schedulingInfo"], {}),
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["vnfDetails"],
    ),
    (
        "immediate-empty-user-and-info",
        failure(minutes_from_now=None, user=""),
        set_key(["schedulingInfo"], {}),
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["vnfDetails"],
    ),
    (
        "immediate-multi-no-durations",
        failure(minutes_from_now=None, nodes=["node1", "node2", "node3"]),
        drop_durations,
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["additionalDurationInSeconds"],
    ),
    (
        "immediate-multi-empty-user",
        failure(minutes_from_now=None, nodes=["node1", "node2"], user=""),
        drop_durations,
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["additionalDurationInSeconds"],
    ),
    (
        "no-scheduling-info",
        failure(),
        lambda b: {k: v for k, v in b.items() if k != "schedulingInfo"},
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["schedulingInfo"],
    ),
    (
        "no-concurrency-limit",
        failure(concurrency=None),
        None,
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["concurrencyLimit"],
    ),
    (
        "no-domain-data",
        failure(),
        lambda b: {k: v for k, v in b.items() if k != "domainData"},
        "Scheduler.MISSING_REQUIRED_ATTRIBUTE",
        ["domainData"],
    ),
]


@pytest.mark.parametrize(
    "name,options,edit,message_id,variables", FAILURES, ids=[f[0] for f in FAILURES]
)
async def test_create_failures_answer_cmso_errors(
    client: ControlClient, cmsod: Daemon, name, options, edit, message_id, variables
) -> None:
    body = request(name, now=EPOCH, **options)
    if edit:
        body = edit(body)
    reply = await client.call(CREATE, schedule=body)
    assert reply["error"] == "io.cmsod.RequestError"
    assert reply["parameters"]["status"] == 400
    error = reply["parameters"]["requestError"]
    assert error["messageId"] == message_id
    if variables is not None:
        assert error["variables"] == variables
    assert error["text"]
    listed = await client.ok("io.cmsod.Schedules.List")
    assert listed["schedules"] == []  # nothing half-stored


ACCEPTED_ODDITIES = [
    ("empty-schedule-name", dict(group_id=""), set_key(["scheduleName"], "")),
    ("incorrect-workflow", dict(group_id="", workflow="Not A Workflow"), None),
    (
        "immediate-empty-name-no-group",
        dict(group_id=None, minutes_from_now=None, normal=100, additional=10),
        set_key(["scheduleName"], ""),
    ),
]


@pytest.mark.parametrize(
    "name,options,edit", ACCEPTED_ODDITIES, ids=[a[0] for a in ACCEPTED_ODDITIES]
)
async def test_cmso_accepted_oddities_are_accepted(
    client: ControlClient, name, options, edit
) -> None:
    body = request(name, now=EPOCH, **options)
    if edit:
        body = edit(body)
    created = await client.ok(CREATE, schedule=body)
    view = await client.schedule(name)
    assert view["scheduleName"] == name  # forced to the id, as CMSO does
    assert created["status"] in (S.PENDING_SCHEDULE, S.SCHEDULED)
    assert view["groups"][0]["groupId"] == "default-1"  # the group is defaulted, not the element


async def test_duplicate_schedule_is_409(client: ControlClient) -> None:
    body = request("twice", now=EPOCH)
    await client.ok(CREATE, schedule=body)
    reply = await client.call(CREATE, schedule=body)
    assert reply["parameters"]["status"] == 409
    assert reply["parameters"]["requestError"] == {
        "messageId": "Scheduler.SCHEDULE_ALREADY_EXISTS",
        "text": "Schedule already exists domain=ChangeManagement schedule id=twice",
        "variables": ["ChangeManagement", "twice"],
    }


async def test_query_cases(autojump_clock, client: ControlClient) -> None:
    body = request("query", now=EPOCH, nodes=["node1", "node2", "node3"], workflow="Replace")
    await client.ok(CREATE, schedule=body)
    await client.wait_for("query", S.PENDING_APPROVAL)

    async def count(**filters) -> int | dict:
        reply = await client.call(DETAILS, filters={"request.scheduleId": ["query"], **filters})
        return reply["parameters"] if "error" in reply else len(reply["parameters"]["details"])

    assert await count() == 3
    assert await count(vnfName=["node1", "node3"], WorkflowName=["Replace"]) == 2
    assert (
        await count(**{"vnfName": ["node%"], "request.createDateTime": ["2018-01-01T00:00:00Z"]})
        == 3
    )
    missing = await count(
        **{
            "vnfName": ["NoNode"],
            "request.createDateTime": ["2018-01-01T00:00:00Z,2018-01-01T01:00:00Z"],
        }
    )
    assert (
        missing["status"] == 404
        and missing["requestError"]["messageId"] == "Scheduler.SCHEDULE_NOT_FOUND"
    )
    bad = await count(bad=["NoNode"])
    assert (
        bad["status"] == 400
        and bad["requestError"]["messageId"] == "Scheduler.UNDEFINED_FILTER_ATTRIBUTE"
    )
    assert bad["requestError"]["variables"] == ["bad"]
    assert bad["requestError"]["text"].startswith(  # the error lists the filters there are
        "Undefined filter attribute bad: the filters are: request.scheduleId,"
    )
    assert await count(groupId=["group"]) == 3
    assert (await count(groupId=["other"]))["status"] == 404  # exists, matches nothing
    date = await count(**{"request.createDateTime": ["2018-01-010"]})
    assert (
        date["status"] == 400
        and date["requestError"]["messageId"] == "Scheduler.INVALID_DATE_FILTER"
    )
    # the filters CMSO broke (bug 3) work here
    assert await count(vnfStatus=["Pending Approval"]) == 3
    assert await count(finishTime=["2026-12-01T00:00:00Z,2026-12-03T00:00:00Z"]) == 3
    assert await count(lastInstanceTime=["2026-12-01T00:00:00Z"]) == 3
    assert await count(maxSchedules=["1"]) == 3
    nobody = await count(**{"request.approvalUserId": ["nobody"]})
    assert nobody["status"] == 404
    await client.ok(APPROVE, scheduleId="query", approval=approval(user="approver1"))
    assert (
        await count(
            **{"request.approvalUserId": ["approver1"], "request.approvalStatus": ["Accepted"]}
        )
        == 3
    )


async def test_misc_not_found_and_bad_approval(client: ControlClient) -> None:
    reply = await client.call("io.cmsod.Schedules.Get", scheduleId="doesNotExist")
    assert reply["parameters"]["status"] == 404
    reply = await client.call(DELETE, scheduleId="doesNotExist")
    assert reply["parameters"]["status"] == 404
    reply = await client.call(APPROVE, scheduleId="DoesNotExist", approval=approval("Accespted"))
    assert reply["parameters"]["status"] == 400
    assert reply["parameters"]["requestError"]["variables"] == ["approvalStatus", "Accespted"]


async def test_errors_name_the_node(client: ControlClient) -> None:
    """A node without its CallbackData entry, and an unknown time zone on one node, are refused
    at submit naming that node (not, later, failing every node with a misleading message)."""
    body = request("named", now=EPOCH, nodes=["node1", "node2"])
    body["schedulingInfo"]["vnfDetails"][0]["node"].append("node3")
    reply = (await client.call(CREATE, schedule=body))["parameters"]["requestError"]
    assert reply["variables"] == ["CallbackData", "node3"]
    assert reply["text"] == (
        "Missing required attribute 'CallbackData': no requestDetails entry has vnfName 'node3'"
    )
    body = request("zoned", now=EPOCH, nodes=["node1", "node2"])
    body["schedulingInfo"]["elements"] = [
        {"elementId": "node2", "elementData": [{"name": "timezone", "value": "Mars/Olympus"}]}
    ]
    reply = (await client.call(CREATE, schedule=body))["parameters"]["requestError"]
    assert reply["messageId"] == "Scheduler.INVALID_ATTRIBUTE"
    assert reply["text"].endswith(": node node2: unknown time zone 'Mars/Olympus'")
