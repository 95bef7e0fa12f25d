"""Approval bound to the plan (issue 12 point 8): the plan's fingerprint, approvals refused
when the plan changed or its slots passed, `--replan`, pending approvals that expire (at the
first slot, at a configured timeout, after a kill -9), over the socket and over REST. Under
MockClock against the loop-back SO, the fake TM and a real HTTP listener; the restart with
the real daemon."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from cmsod import plans
from cmsod.errors import RequestError
from cmsod.lifecycle import parse_time_ms
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.rest import server as rest
from cmsod.store import schedules
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, ControlClient, Daemon, start_daemon
from tests.fake_http import FakeTM, Reply
from tests.procs import Daemon as DaemonProcess
from tests.procs import cmsoctl
from tests.test_rest import PASSWORD, Rest, write_credentials
from tests.test_rollout import at, edits, fingerprint_of, items
from tests.test_tickets import daemon_for as tm_daemon

APPROVE = "io.cmsod.Schedules.Approve"
CREATE = "io.cmsod.Schedules.Create"
DAY_S = 86400
H = 3_600_000
T0 = parse_time_ms(at("08:01"))


# -- the core -----------------------------------------------------------------------------


def test_the_fingerprint_is_stable_and_moves_with_any_slot() -> None:
    slots = {"n2": (T0 + H, T0 + 2 * H), "n1": (T0, T0 + H)}
    fingerprint = plans.fingerprint("s", slots)
    assert fingerprint is not None and len(fingerprint) == 12
    assert int(fingerprint, 16) >= 0  # hex
    assert plans.fingerprint("s", dict(reversed(slots.items()))) == fingerprint  # any order
    assert plans.fingerprint("s", {**slots, "n2": (T0 + H + 1, T0 + 2 * H + 1)}) != fingerprint
    assert plans.fingerprint("s", {**slots, "n2": (T0 + H, T0 + 2 * H + 1)}) != fingerprint
    assert plans.fingerprint("other", slots) != fingerprint  # another schedule's plan
    assert plans.fingerprint("s", {"n1": slots["n1"]}) != fingerprint
    assert plans.fingerprint("s", {}) is None
    # stable across runs and hosts: a fixed encoding, a fixed hash
    assert (
        plans.fingerprint("s", {"n1": (0, 1)}) == "5c6afb906b94"
    )  # sha256 of ["cmsod-plan-1","s",[["n1",0,1]]]
    assert plans.decode(plans.encode(slots)) == slots
    assert plans.of_placement("s", {"n1": T0, "n2": T0 + H}, H) == fingerprint


def test_a_refusal_names_what_moved_or_passed() -> None:
    old = {"n1": (T0, T0 + H), "n2": (T0 + H, T0 + 2 * H)}
    new = {"n1": (T0 + 3 * H, T0 + 4 * H), "n2": (T0 + H, T0 + 2 * H)}
    seen = plans.fingerprint("s", old)
    assert plans.refusal("s", seen, old, old, T0 - 1) is None  # the plan seen, in time
    assert plans.refusal("s", None, old, None, T0 - 1) is None  # no fingerprint given
    changed = plans.refusal("s", seen, new, old, T0 - 1)
    assert isinstance(changed, RequestError) and changed.status == 409
    assert changed.code == "PLAN_CHANGED"
    assert changed.variables == ["s", seen, plans.fingerprint("s", new)]
    assert changed.text.endswith(
        ": moved: n1 2026-12-01T08:01:00Z..2026-12-01T09:01:00Z"
        " -> 2026-12-01T11:01:00Z..2026-12-01T12:01:00Z"
    )
    unknown = plans.refusal("s", "0123456789ab", new, None, T0 - 1)
    assert unknown is not None and "0123456789ab is not a plan cmsod made" in unknown.text
    began = plans.refusal("s", seen, old, old, T0 + H + 1)
    assert began is not None and began.code == "PLAN_PASSED"
    assert began.text.endswith("2 slot(s) passed: n1 2026-12-01T08:01:00Z; n2 2026-12-01T09:01:00Z")
    assert plans.refusal("s", seen, old, old, T0) is None  # starting now has not passed
    grace = 300_000  # within the misfire grace it is still sent as approved, late
    assert plans.refusal("s", seen, old, old, T0 + grace, grace) is None
    late = plans.refusal("s", seen, old, old, T0 + grace + 1, grace)
    assert late is not None and late.text.endswith("1 slot(s) passed: n1 2026-12-01T08:01:00Z")
    many = {f"n{i:03}": (T0 + i, T0 + H) for i in range(30)}
    text = plans.refusal("s", None, many, None, T0 + H).text  # type: ignore[union-attr]
    assert text.count(" n0") == plans.MAX_LISTED and text.endswith("; and 10 more")


def test_replan_moves_only_begun_slots_by_the_carry_over_rules() -> None:
    window = ((T0, T0 + 6 * H),)
    elements = [
        plans.Element("n1", (T0, T0 + H), window),
        plans.Element("n2", (T0 + H, T0 + 2 * H), window, blocked=((T0 + 3 * H, T0 + 4 * H),)),
        plans.Element("n3", (T0 + 2 * H, T0 + 3 * H), window),
    ]
    now = T0 + H + 30 * 60_000  # 09:31: n1 and n2 passed (no grace)
    after, stuck = plans.replan(elements, T0, H, 1, now)
    assert stuck == []
    assert after == {
        "n1": (T0 + 3 * H, T0 + 4 * H),  # 10:01 is n3's (concurrency 1)
        "n2": (T0 + 4 * H, T0 + 5 * H),  # 11:01 is blocked for it
        "n3": (T0 + 2 * H, T0 + 3 * H),  # not begun: kept
    }
    _, stuck = plans.replan(elements, T0, H, 1, T0 + 5 * H + 1)
    assert stuck == ["n1", "n2", "n3"]  # no slot left in the window
    within, _ = plans.replan(elements, T0, H, 1, now, grace_ms=H)  # n2 is within its grace
    assert within["n2"] == (T0 + H, T0 + 2 * H) and within["n1"] == (T0 + 3 * H, T0 + 4 * H)


def test_expiry_is_once_the_first_slot_passed_unless_a_timeout_is_set() -> None:
    grace = 300_000
    deadline = plans.expires_at(T0, T0 - H, 0, grace)
    assert deadline == T0 + grace + 1  # as soon as `passed` says so, not at its start
    slot = {"n1": (T0, T0 + H)}
    assert plans.passed(slot, deadline - 1, grace) == [] and plans.passed(slot, deadline, grace)
    assert plans.expires_at(T0, T0 - H, 600_000, grace) == T0 - H + 600_000
    assert plans.expires_at(None, T0 - H, 0, grace) is None
    assert plans.expiry_reason(T0, T0 - H, 0, grace) == (
        "not approved before its first slot passed (2026-12-01T08:01:00Z + 300 s;"
        " [dispatcher] misfire_grace_s)"
    )
    assert plans.expiry_reason(T0, T0 - H, 600_000).startswith("not approved within 600 s")


# -- through the daemon ---------------------------------------------------------------------


async def planned(client: ControlClient, schedule_id: str, nodes: list[str]) -> dict[str, Any]:
    """08:01, 09:01, 10:01 ... one element an hour (concurrency 1), pending approval."""
    body = request(schedule_id, now=EPOCH, nodes=nodes, concurrency=1)
    await client.ok(CREATE, schedule=body)
    return await client.wait_for(schedule_id, S.PENDING_APPROVAL)


async def later(cmsod: Daemon, client: ControlClient, hh_mm: str) -> ControlClient:
    """The daemon's clock at `hh_mm` (virtual time: its callers run under MockClock)."""
    await client.aclose()
    await trio.sleep((parse_time_ms(at(hh_mm)) - cmsod.ctx.clock.now_ms()) / 1000)
    return await cmsod.connect()


def error_of(reply: dict[str, Any]) -> tuple[int, str, str]:
    assert reply.get("error") == "io.cmsod.RequestError", reply
    e = reply["parameters"]["requestError"]
    return reply["parameters"]["status"], e["messageId"], e["text"]


async def test_show_gives_the_fingerprint_and_the_approval_records_it(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    body = request("fp", now=EPOCH, nodes=["n1", "n2", "n3"], concurrency=1)
    dry = await client.ok("io.cmsod.Schedules.Plan", schedule=body)
    view = await planned(client, "fp", ["n1", "n2", "n3"])
    shown = view["planFingerprint"]
    assert shown == fingerprint_of(view)
    assert dry["planFingerprint"] == shown  # `cmsoctl plan` of the same request, same plan
    assert (await client.schedule("fp"))["planFingerprint"] == shown  # stable
    stored = await cmsod.ctx.store.read(
        lambda conn: conn.execute("SELECT plan_fingerprint FROM schedules").fetchone()[0]
    )
    assert stored == shown  # kept with the schedule: a view reads it, not 100,000 slots

    refused = await client.call(APPROVE, scheduleId="fp", approval=approval(), plan="0123456789ab")
    status, message_id, text = error_of(refused)
    assert (status, message_id) == (409, "Scheduler.PLAN_CHANGED")
    assert f"is {shown}, not 0123456789ab" in text and "not a plan cmsod made" in text
    bad = await client.call(APPROVE, scheduleId="fp", approval=approval(), plan="XYZ")
    assert bad["error"] == "org.varlink.service.InvalidParameter"
    assert (await client.schedule("fp"))["status"] == S.PENDING_APPROVAL  # nothing recorded

    done = await client.ok(APPROVE, scheduleId="fp", approval=approval(), plan=shown)
    assert done == {"scheduleId": "fp", "status": S.SCHEDULED, "planFingerprint": shown}
    view = await client.schedule("fp")
    (recorded,) = view["scheduleApprovals"]
    assert recorded["planFingerprint"] == shown
    assert [e["approved-plan"] for e in edits(tmp_path) if "approved-plan" in e] == [shown]


async def test_the_fingerprint_in_a_transaction_that_moved_slots_is_of_the_moved_plan(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The column is written at the transaction's end (Tx.finish): read before that, inside
    the transaction that moved a slot, it was still the plan before the move."""
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    seen = (await planned(client, "mv", ["n1", "n2"]))["planFingerprint"]

    def move_n1(tx: Any) -> tuple[str | None, str | None]:
        schedule, element, start, finish = tx.execute(
            "SELECT s.id, e.id, e.start_ms, e.finish_ms FROM elements e"
            " JOIN schedules s ON s.id = e.schedule WHERE e.name = 'n1'"
        ).fetchone()
        tx.element_set(
            element,
            schedule,
            "mv",
            "n1",
            E.PENDING_APPROVAL,
            start_ms=start + H,
            finish_ms=finish + H,
        )
        moved = plans.fingerprint("mv", schedules.load_slots(tx, schedule))
        return moved, schedules.plan_fingerprint(tx, schedule, "mv")

    moved, read = await cmsod.ctx.store.tx(move_n1)
    assert moved != seen and read == moved
    assert (await client.schedule("mv"))["planFingerprint"] == moved  # and once committed


async def test_an_approval_after_slots_passed_is_refused_unless_replanned(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(
        nursery, tmp_path, optimizer__approval_timeout_s=DAY_S, dispatcher__lead_time_s=0
    )
    client = await cmsod.connect()
    view = await planned(client, "late", ["n1", "n2", "n3"])
    seen = view["planFingerprint"]
    client = await later(cmsod, client, "09:30")
    assert (await client.schedule("late"))["status"] == S.PENDING_APPROVAL  # a day to approve

    for plan in ({"plan": seen}, {}):  # with or without the fingerprint: slots passed
        status, message_id, text = error_of(
            await client.call(APPROVE, scheduleId="late", approval=approval(), **plan)
        )
        assert (status, message_id) == (409, "Scheduler.PLAN_PASSED")
        assert text.endswith(
            "2 slot(s) passed: n1 2026-12-01T08:01:00Z; n2 2026-12-01T09:01:00Z"
        ), text

    done = await client.ok(APPROVE, scheduleId="late", approval=approval(), plan=seen, replan=True)
    assert done["status"] == S.SCHEDULED and done["planFingerprint"] not in (None, seen)
    assert done["replanned"] == {
        "seenFingerprint": seen,
        "changes": [
            {
                "vnfName": "n1",
                "oldStartTime": at("08:01"),
                "oldFinishTime": at("09:01"),
                "startTime": at("11:01"),  # 10:01 is n3's: concurrency 1
                "finishTime": at("12:01"),
            },
            {
                "vnfName": "n2",
                "oldStartTime": at("09:01"),
                "oldFinishTime": at("10:01"),
                "startTime": at("12:01"),
                "finishTime": at("13:01"),
            },
        ],
    }
    view = await client.wait_for("late", S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    assert view["planFingerprint"] == done["planFingerprint"] == fingerprint_of(view)
    assert {n: e["dispatchTime"] for n, e in items(view).items()} == {
        "n1": at("11:01"),
        "n2": at("12:01"),
        "n3": at("10:01"),
    }
    # its message is the orchestrator's now; the re-plan note is in its events
    assert items(view)["n1"]["statusMessage"] == "Done."
    notes = [
        e["status-message"]
        for e in edits(tmp_path)
        if "status-message" in e and e["vnf-name"] == "n1"
    ]
    assert any(n.startswith("re-planned by jf9860") for n in notes[:-1]) and notes[-1] == "Done."
    tickets = (await client.ok("io.cmsod.Tickets.List", scheduleId="late"))["tickets"]
    # opened for the new plan: CMSO plans each ticket over its group's span, now 10:01..13:01
    assert {(t["plannedStartDate"], t["plannedEndDate"]) for t in tickets} == {
        (at("10:01"), at("13:01"))
    }


async def test_with_two_approvers_an_acceptance_of_an_earlier_plan_does_not_count(
    autojump_clock: Any,
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each acceptance is of one plan: when it moved (a re-plan) since another approver
    accepted, theirs no longer counts towards the approvals required."""
    monkeypatch.setattr(schedules, "APPROVALS_REQUIRED", 2)
    cmsod = await start_daemon(
        nursery, tmp_path, optimizer__approval_timeout_s=DAY_S, dispatcher__lead_time_s=0
    )
    client = await cmsod.connect()
    seen = (await planned(client, "two", ["n1", "n2"]))["planFingerprint"]
    alice = await client.ok(APPROVE, scheduleId="two", approval=approval(user="alice"))
    assert alice["status"] == S.PENDING_APPROVAL  # one of two
    client = await later(cmsod, client, "08:30")  # n1's slot passed
    bob = await client.ok(
        APPROVE, scheduleId="two", approval=approval(user="bob"), plan=seen, replan=True
    )
    assert bob["planFingerprint"] != seen
    assert bob["status"] == S.PENDING_APPROVAL  # alice accepted the plan before the move
    again = await client.ok(APPROVE, scheduleId="two", approval=approval(user="alice"))
    assert again["status"] == S.SCHEDULED and again["planFingerprint"] == bob["planFingerprint"]


async def test_an_approval_a_little_late_is_kept_and_sent_late_within_the_grace(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(
        nursery, tmp_path, optimizer__approval_timeout_s=DAY_S, dispatcher__lead_time_s=0
    )
    client = await cmsod.connect()
    seen = (await planned(client, "soon", ["n1", "n2"]))["planFingerprint"]
    client = await later(cmsod, client, "08:03")  # 2 minutes late, within the 300 s grace
    done = await client.ok(APPROVE, scheduleId="soon", approval=approval(), plan=seen)
    assert done["status"] == S.SCHEDULED and done["planFingerprint"] == seen
    view = await client.wait_for("soon", S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    assert {n: e["dispatchTime"] for n, e in items(view).items()} == {
        "n1": at("08:03"),
        "n2": at("09:01"),
    }


async def test_a_plan_changed_since_it_was_seen_is_refused_with_what_moved(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """One approver re-plans but TM refuses the tickets (417: the new plan stays, no approval);
    another approves the plan they saw before: refused, naming what moved."""
    tm = FakeTM()
    cmsod = await tm_daemon(nursery, tmp_path, tm, optimizer__approval_timeout_s=DAY_S)
    client = await cmsod.connect()
    seen = (await planned(client, "moved", ["n1", "n2"]))["planFingerprint"]
    client = await later(cmsod, client, "08:30")
    tm.faults[tm.count + 1] = Reply(500, b"TM database locked")
    status, _, text = error_of(
        await client.call(APPROVE, scheduleId="moved", approval=approval(), replan=True)
    )
    assert status == 417
    now = (await client.schedule("moved"))["planFingerprint"]
    assert now != seen
    # the re-plan was its own transaction: the refusal says it stays, and the plan now
    assert text.endswith(
        f"; the re-plan was kept, not approved: the plan is now {now} (was {seen}; cmsoctl show)"
    ), text
    status, message_id, text = error_of(
        await client.call(
            APPROVE, scheduleId="moved", approval=approval("Accepted", "ops"), plan=seen
        )
    )
    assert (status, message_id) == (409, "Scheduler.PLAN_CHANGED")
    assert text == (
        f"The plan of schedule moved is {now}, not {seen} as approved: look at it again"
        " (cmsoctl show, or GET the schedule), or approve with --replan (REST: ?replan=true):"
        " moved: n1"
        " 2026-12-01T08:01:00Z..2026-12-01T09:01:00Z"
        " -> 2026-12-01T10:01:00Z..2026-12-01T11:01:00Z"
    )
    done = await client.ok(APPROVE, scheduleId="moved", approval=approval(), plan=now)
    assert done["status"] == S.SCHEDULED


async def test_no_free_slot_left_refuses_the_replan_and_changes_nothing(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(nursery, tmp_path, optimizer__approval_timeout_s=2 * DAY_S)
    client = await cmsod.connect()
    before = await planned(client, "full", ["n1", "n2"])
    await client.aclose()
    await trio.sleep(DAY_S)  # the 24-hour window is over
    client = await cmsod.connect()
    status, message_id, text = error_of(
        await client.call(APPROVE, scheduleId="full", approval=approval(), replan=True)
    )
    assert (status, message_id) == (409, "Scheduler.NO_SLOT_LEFT")
    assert text.endswith("no free slot for n1, n2")
    assert await client.schedule("full") == before


async def test_pending_approval_expires_at_a_configured_timeout(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    cmsod = await start_daemon(nursery, tmp_path, optimizer__approval_timeout_s=1800)
    client = await cmsod.connect()
    body = request("slow", now=EPOCH, nodes=["n1", "n2"], minutes_from_now=240)  # 12:00
    await client.ok(CREATE, schedule=body)
    view = await client.wait_for("slow", S.PENDING_APPROVAL)
    planned_at = parse_time_ms(view["optimizerReturnDateTime"])
    await client.aclose()
    await trio.sleep((planned_at - cmsod.ctx.clock.now_ms()) / 1000 + 1799)
    client = await cmsod.connect()
    assert (await client.schedule("slow"))["status"] == S.PENDING_APPROVAL  # not yet
    view = await client.wait_for("slow", S.EXPIRED)
    assert parse_time_ms(view["control"]["time"]) == planned_at + 1_800_000  # on time
    assert view["control"]["reason"] == (
        f"not approved within 1800 s of its plan ({view['optimizerReturnDateTime']};"
        " [optimizer] approval_timeout_s)"
    )
    assert {e["status"] for e in items(view).values()} == {E.EXPIRED}
    why = await client.ok("io.cmsod.Schedules.Why", element="n1", scheduleId="slow")
    assert why["reasons"][0]["words"].startswith("its schedule expired: not approved within")
    changes = edits(tmp_path)
    expired = [e for e in changes if e.get("status") == "Expired"]
    assert [e.get("control-action") for e in expired if "schedule-id" in e] == ["expire"]
    assert [e["vnf-name"] for e in expired if "vnf-name" in e] == ["n1", "n2"]
    deleted = await client.ok("io.cmsod.Schedules.Delete", scheduleId="slow")
    assert deleted["status"] == S.DELETED


async def test_an_approval_within_the_misfire_grace_is_taken_then_it_expires(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """By default a pending schedule expires when its first slot has passed (start + misfire
    grace), not at its start: an approval a minute late is still taken, as `passed` says."""
    cmsod = await start_daemon(nursery, tmp_path, dispatcher__misfire_grace_s=300)
    client = await cmsod.connect()
    starts = {}
    for sid in ("inside", "after"):
        body = request(sid, now=EPOCH, nodes=[f"{sid}1"], minutes_from_now=60)
        await client.ok(CREATE, schedule=body)
        view = await client.wait_for(sid, S.PENDING_APPROVAL)
        starts[sid] = min(parse_time_ms(e["startTime"]) for e in items(view).values())
    await client.aclose()
    await trio.sleep((starts["inside"] + 60_000 - cmsod.ctx.clock.now_ms()) / 1000)
    client = await cmsod.connect()
    done = await client.ok(APPROVE, scheduleId="inside", approval=approval())
    assert done["status"] == S.SCHEDULED  # a minute late: within the grace
    await client.aclose()
    await trio.sleep((starts["after"] + 300_000 - cmsod.ctx.clock.now_ms()) / 1000)
    client = await cmsod.connect()
    assert (await client.schedule("after"))["status"] == S.PENDING_APPROVAL  # grace not over
    await client.aclose()
    await trio.sleep(1)
    client = await cmsod.connect()
    view = await client.wait_for("after", S.EXPIRED)
    # on time: the first millisecond past the grace (the view's times are to the second)
    assert parse_time_ms(view["control"]["time"]) == starts["after"] + 300_000
    assert "[dispatcher] misfire_grace_s" in view["control"]["reason"]
    status, message_id, _ = error_of(
        await client.call(APPROVE, scheduleId="after", approval=approval())
    )
    assert (status, message_id) == (412, "Scheduler.NOT_PENDING_APPROVAL")


# -- over REST ---------------------------------------------------------------------------------


@pytest.fixture
async def http(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Daemon, Rest]]:
    d = await start_daemon(
        nursery,
        tmp_path,
        http__listen="127.0.0.1:0",
        http__credentials_file=write_credentials(tmp_path / "users"),
        optimizer__approval_timeout_s=DAY_S,
    )
    address = await nursery.start(rest.serve, d.ctx)
    async with httpx.AsyncClient(
        base_url=f"http://{address}", auth=("jf9860", PASSWORD), timeout=30
    ) as client:
        yield d, Rest(client)
    d.cancel.cancel()


async def test_the_rest_approvals_path_binds_the_plan_too(
    autojump_clock: Any, http: tuple[Daemon, Rest]
) -> None:
    cmsod, api = http
    created = await api.create(request("web", now=EPOCH, nodes=["n1", "n2"], concurrency=1))
    assert created.status_code == 202
    view = await api.wait_for("web", S.PENDING_APPROVAL)
    seen = view["planFingerprint"]  # the GET carries it (a cmsod field, as scheduleId is)
    assert seen == fingerprint_of(view)
    url = "/cmso/v1/schedules/web/approvals"

    stale = await api.client.post(url, params={"plan": "0123456789ab"}, json=approval())
    assert stale.status_code == 409
    assert stale.json()["requestError"]["messageId"] == "Scheduler.PLAN_CHANGED"
    unknown = await api.client.post(url, params={"other": "1"}, json=approval())
    assert unknown.status_code == 400  # a query parameter that would be ignored

    await trio.sleep((parse_time_ms(at("08:30")) - cmsod.ctx.clock.now_ms()) / 1000)
    began = await api.client.post(url, params={"plan": seen}, json=approval())
    assert began.status_code == 409
    assert began.json()["requestError"]["messageId"] == "Scheduler.PLAN_PASSED"
    assert "approve with --replan (REST: ?replan=true)" in began.json()["requestError"]["text"]

    replanned = await api.client.post(url, params={"plan": seen, "replan": "true"}, json=approval())
    assert replanned.status_code == 200, replanned.text
    answer = replanned.json()
    assert answer["status"] == S.SCHEDULED and answer["replanned"]["seenFingerprint"] == seen
    assert [c["vnfName"] for c in answer["replanned"]["changes"]] == ["n1"]
    assert replanned.headers["X-Cmsod-Plan"] == answer["planFingerprint"]
    view = await api.schedule("web")
    assert view["planFingerprint"] == answer["planFingerprint"] == fingerprint_of(view)
    assert view["scheduleApprovals"][0]["planFingerprint"] == answer["planFingerprint"]

    # CMSO's own request, unchanged: 204, and the header says which plan it approved
    created = await api.create(request("plain", now=EPOCH, nodes=["n3"], minutes_from_now=600))
    view = await api.wait_for("plain", S.PENDING_APPROVAL)
    plain = await api.approve("plain", approval())
    assert plain.status_code == 204 and plain.content == b""
    assert plain.headers["X-Cmsod-Plan"] == view["planFingerprint"]


# -- kill -9 -------------------------------------------------------------------------------------


def test_an_overdue_pending_approval_expires_at_once_after_kill_9(tmp_path: Path) -> None:
    """Killed while the schedule waits for approval; restarted past its timeout (here: a
    shorter timeout, so no test waits for real time to pass): it expires at once, from the
    store, with its event and log line."""
    from datetime import UTC, datetime

    body = request("k9", now=datetime.now(UTC), nodes=["n1", "n2"], minutes_from_now=60)
    (tmp_path / "k9.json").write_text(json.dumps(body))
    daemon = DaemonProcess(tmp_path, extra_env={"CMSOD_OPTIMIZER__APPROVAL_TIMEOUT_S": "3600"})
    code, out = cmsoctl(tmp_path, "submit", str(tmp_path / "k9.json"))
    assert code == 0, out
    daemon.wait_log(r"event=schedule\.optimized .*status=\"?Pending Approval")
    daemon.kill()

    daemon = DaemonProcess(tmp_path, extra_env={"CMSOD_OPTIMIZER__APPROVAL_TIMEOUT_S": "0.001"})
    try:
        (line,) = daemon.wait_log(r"event=schedule\.expired")
        assert "schedule_id=k9" in line and "within 0.001 s of its plan" in line
        code, out = cmsoctl(tmp_path, "show", "k9")
        assert code == 0, out
        assert "status     Expired" in out and "expire     by cmsod" in out
        code, out = cmsoctl(tmp_path, "approve", "k9")
        assert code == 1 and "412 Scheduler.NOT_PENDING_APPROVAL" in out
    finally:
        assert daemon.stop() == 0
    events = [
        json.loads(line)
        for path in sorted(tmp_path.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    statuses = [
        value.get("status")
        for event in events
        for edit in event["event"]["push-change-update"]["datastore-changes"][
            "ietf-yang-patch:yang-patch"
        ]["edit"]
        for value in next(iter(edit["value"].values()))
    ]
    assert statuses.count(S.EXPIRED) == 3  # the schedule and its two elements, once


def test_cmsoctl_approve_says_the_plan_and_what_moved() -> None:
    from cmsod import ctl

    assert ctl.human("approve", {"scheduleId": "s", "status": "Rejected"}) == "s: Rejected"
    reply = {
        "scheduleId": "s",
        "status": "Scheduled",
        "planFingerprint": "bbbbbbbbbbbb",
        "replanned": {
            "seenFingerprint": "aaaaaaaaaaaa",
            "changes": [
                {
                    "vnfName": "n1",
                    "oldStartTime": at("08:01"),
                    "oldFinishTime": at("09:01"),
                    "startTime": at("11:01"),
                    "finishTime": at("12:01"),
                }
            ],
        },
    }
    lines = ctl.human("approve", reply).splitlines()
    assert lines[:3] == [
        "s: Scheduled (plan bbbbbbbbbbbb)",
        "re-planned from aaaaaaaaaaaa to bbbbbbbbbbbb: 1 slot changed",
        "",
    ]
    assert lines[3].split() == ["VNF", "WAS", "START", "WAS", "END", "START", "END"]
    assert lines[4].split() == ["n1", at("08:01"), at("09:01"), at("11:01"), at("12:01")]
    args = ctl.parser().parse_args(["approve", "s", "--plan", "aaaaaaaaaaaa", "--replan"])
    assert ctl.request_for(args)[1] | {"approval": None} == {
        "scheduleId": "s",
        "approval": None,
        "plan": "aaaaaaaaaaaa",
        "replan": True,
    }
