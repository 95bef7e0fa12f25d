"""Schedules: create, approve, plan, delete. Each write is a synchronous `fn(tx, ...)` run whole
by `Store.tx`: it loads what it needs, asks the core (`lifecycle`, `ticketing`) and applies the
answer. They re-read the rows they change, so a message that arrives late (an optimizer result
for a schedule deleted meanwhile) changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from cmsod import cmevents, gates, lifecycle, plans, ticketing
from cmsod.errors import RequestError
from cmsod.model import (
    APPROVAL_DOMAIN,
    APPROVAL_TYPE,
    APPROVALS_REQUIRED,
    ELEMENT_FAILED_RUN,
    ELEMENT_FINAL,
    ELEMENT_NOT_PART,
    SCHEDULE_STOPPED,
    NewSchedule,
)
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.problem import Plan, Problem, ProblemGroup
from cmsod.store import dispatch
from cmsod.store.book import blocked_spans, book_busy, merge_busy, other_work
from cmsod.store.store import Tx
from cmsod.ticketing import NewTicket, Opened, TicketGroup
from cmsod.wire.cmso import Approval

# -- create ---------------------------------------------------------------------------------


def schedule_exists(conn: Any, schedule_id: str) -> None:
    if conn.execute("SELECT 1 FROM schedules WHERE schedule_id = ?", (schedule_id,)).fetchone():
        raise RequestError(409, "SCHEDULE_ALREADY_EXISTS", APPROVAL_DOMAIN, schedule_id)


def tickets_for_immediate(
    new: NewSchedule, now_ms: int, per_ticket: int, template: dict[str, str]
) -> list[NewTicket]:
    """An immediate request is accepted as it is stored: its tickets are opened first, planned
    from now over one run of its work flow."""
    end_ms = now_ms + (new.normal_duration_s + new.additional_duration_s) * 1000
    groups = [
        TicketGroup(g.group_id, [e.name for e in g.elements], now_ms, end_ms) for g in new.groups
    ]
    return ticketing.plan_tickets(new.user_id, groups, per_ticket, template, dict(new.domain_data))


def create_schedule(tx: Tx, new: NewSchedule, opened: Opened | None = None) -> S:
    schedule_exists(tx, new.schedule_id)
    status = S.PENDING_APPROVAL if new.immediate else S.PENDING_SCHEDULE
    element_status = E.PENDING_APPROVAL if new.immediate else E.PENDING_SCHEDULE
    lifecycle.check_schedule(None, status)
    lifecycle.check_element(None, element_status)
    (schedule,) = tx.execute(
        "INSERT INTO schedules (schedule_id, domain, user_id, status, immediate, normal_s,"
        " additional_s, concurrency, policy_id, schedule_info, create_ms, updated_ms,"
        " max_failures, max_failure_ratio)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            new.schedule_id,
            new.domain,
            new.user_id,
            status.value,
            int(new.immediate),
            new.normal_duration_s,
            new.additional_duration_s,
            new.concurrency_limit,
            new.policy_id,
            new.schedule_info,
            tx.now_ms,
            tx.now_ms,
            new.max_failures,
            new.max_failure_ratio,
        ),
    ).fetchone()
    tx.conn.executemany(
        "INSERT INTO domain_data (schedule, name, value) VALUES (?, ?, ?)",
        [(schedule, k, v) for k, v in new.domain_data],
    )
    vnfs: list[dict[str, str]] = []
    for group in new.groups:
        (grp,) = tx.execute(
            "INSERT INTO cm_groups (schedule, group_id) VALUES (?, ?) RETURNING id",
            (schedule, group.group_id),
        ).fetchone()
        tx.conn.executemany(
            "INSERT INTO windows (grp, start_ms, end_ms) VALUES (?, ?, ?)",
            [(grp, w.start_ms, w.end_ms) for w in group.windows],
        )
        tx.conn.executemany(
            "INSERT INTO elements (schedule, grp, name, status, request, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    schedule,
                    grp,
                    e.name,
                    element_status.value,
                    e.request,
                    msgspec.json.encode(e.data) if e.data else None,
                )
                for e in group.elements
            ],
        )
        vnfs.extend(
            {"vnf-name": e.name, "group-id": group.group_id, "status": element_status.value}
            for e in group.elements
        )
    tx.edit(
        schedule,
        new.schedule_id,
        cmevents.schedule_edit(
            new.schedule_id,
            "create",
            {
                "schedule-id": new.schedule_id,
                "status": status.value,
                "user-id": new.user_id,
                "change-windows": [
                    {
                        "group-id": g.group_id,
                        "start-time": lifecycle.format_time(w.start_ms),
                        "end-time": lifecycle.format_time(w.end_ms),
                    }
                    for g in new.groups
                    for w in g.windows
                ],
                "vnf": vnfs,
            },
        ),
    )
    tx.transitions += [("schedule", status.value)] + [("element", element_status.value)] * len(vnfs)
    if new.immediate:  # CMSO: auto-approved (Tier 2) by the requesting user, same transaction
        _record_approval(
            tx, schedule, new.user_id, "Accepted", "the immediate request itself (auto-approved)"
        )
        tx.schedule_to(schedule, new.schedule_id, S.PENDING_APPROVAL, S.ACCEPTED)
        return _schedule_with_tickets(tx, schedule, new.schedule_id, opened or [])
    return status


# -- approvals ------------------------------------------------------------------------------


def _schedule_row(tx: Tx, schedule_id: str) -> tuple[int, S]:
    row = tx.execute(
        "SELECT id, status FROM schedules WHERE schedule_id = ?", (schedule_id,)
    ).fetchone()
    if row is None:
        raise RequestError(404, "SCHEDULE_NOT_FOUND", APPROVAL_DOMAIN, schedule_id)
    return row[0], S(row[1])


def _record_approval(
    tx: Tx, schedule: int, user_id: str, status: str, caller: str, plan: str | None = None
) -> None:
    tx.execute(
        "INSERT INTO approvals (schedule, user_id, approval_type, status, approval_ms, caller,"
        " plan) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (schedule, user_id, approval_type)"
        " DO UPDATE SET status = excluded.status, approval_ms = excluded.approval_ms,"
        " caller = excluded.caller, plan = excluded.plan",
        (schedule, user_id, APPROVAL_TYPE, status, tx.now_ms, caller, plan),
    )


# -- the plan an approval is bound to -------------------------------------------------------


def load_slots(db: Any, schedule: int) -> dict[str, plans.Slot]:
    """The schedule's plan as it stands: every element with a slot."""
    return {
        name: (start, finish)
        for name, start, finish in db.execute(
            "SELECT name, start_ms, finish_ms FROM elements WHERE schedule = ?"
            " AND start_ms IS NOT NULL AND finish_ms IS NOT NULL",
            (schedule,),
        )
    }


def known_plan(db: Any, schedule: int, fingerprint: str) -> dict[str, plans.Slot] | None:
    """A plan cmsod made for this schedule earlier, by its fingerprint."""
    row = db.execute(
        "SELECT slots FROM plans WHERE schedule = ? AND fingerprint = ?", (schedule, fingerprint)
    ).fetchone()
    return None if row is None else plans.decode(row[0])


def plan_fingerprint(db: Any, schedule: int, schedule_id: str) -> str | None:
    """The fingerprint of the schedule's plan as it stands: the one stored with it (or, in a
    transaction that moved its slots, the one it will store), computed when not known (after
    a carry-over moved a slot)."""
    if isinstance(db, Tx) and schedule in db.moved_plans:
        stored = db.moved_plans[schedule]
    else:
        (stored,) = db.execute(
            "SELECT plan_fingerprint FROM schedules WHERE id = ?", (schedule,)
        ).fetchone()
    return stored or plans.fingerprint(schedule_id, load_slots(db, schedule))


def _keep_plan(tx: Tx, schedule: int, schedule_id: str, made_by: str) -> str | None:
    """Remember the schedule's plan as it now stands, under its fingerprint (in `plans`, and
    as the schedule's own)."""
    slots = load_slots(tx, schedule)
    fingerprint = plans.fingerprint(schedule_id, slots)
    tx.plan_kept(schedule, fingerprint)
    if fingerprint is not None:
        tx.execute(
            "INSERT INTO plans (schedule, fingerprint, slots, made_ms, made_by)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (schedule, fingerprint) DO NOTHING",
            (schedule, fingerprint, plans.encode(slots).decode(), tx.now_ms, made_by),
        )
    return fingerprint


def _check_plan(
    db: Any, schedule: int, schedule_id: str, given: str | None, now_ms: int, grace_ms: int
) -> str:
    """The fingerprint of the plan this approval accepts; refused (409) when the plan is no
    longer `given`, or when slots of it have passed (plans.refusal)."""
    slots = load_slots(db, schedule)
    given_slots = known_plan(db, schedule, given) if given is not None else None
    refused = plans.refusal(schedule_id, given, slots, given_slots, now_ms, grace_ms)
    if refused is not None:
        raise refused
    return plans.fingerprint(schedule_id, slots) or ""


def _approval_outcome(
    db: Any, schedule_id: str, approval: Approval, plan: str | None, now_ms: int, grace_ms: int
) -> tuple[int, S, bool]:
    """CMSO 2.5, in its order: body enums (400), not found (404), not pending (412), user (400);
    then cmsod's own: an acceptance of a plan that changed, or whose slots passed (409).
    Returns the schedule, its status and whether this approval accepts it."""
    if approval.approvalStatus not in ("Accepted", "Rejected"):
        raise RequestError(
            400, "INVALID_ATTRIBUTE", "approvalStatus", approval.approvalStatus or ""
        )
    if approval.approvalType != APPROVAL_TYPE:
        raise RequestError(400, "INVALID_ATTRIBUTE", "approvalType", approval.approvalType or "")
    schedule, status = _schedule_row(db, schedule_id)
    if status is not S.PENDING_APPROVAL:
        raise RequestError(412, "NOT_PENDING_APPROVAL", APPROVAL_DOMAIN, schedule_id, status.value)
    if not approval.approvalUserId:
        raise RequestError(400, "MISSING_REQUIRED_ATTRIBUTE", "userId")
    if approval.approvalStatus != "Accepted":
        return schedule, status, False
    current = _check_plan(db, schedule, schedule_id, plan, now_ms, grace_ms)
    (others,) = db.execute(  # only those of the plan as it stands: one of another plan is stale
        "SELECT count(*) FROM approvals WHERE schedule = ? AND approval_type = ? AND status = ?"
        " AND user_id != ? AND plan = ?",
        (schedule, APPROVAL_TYPE, "Accepted", approval.approvalUserId, current),
    ).fetchone()
    return schedule, status, others + 1 >= APPROVALS_REQUIRED


def tickets_for_approval(
    conn: Any,
    schedule_id: str,
    approval: Approval,
    per_ticket: int,
    template: dict[str, str],
    plan: str | None,
    now_ms: int,
    grace_ms: int,
) -> tuple[str, list[NewTicket]] | None:
    """The schedule's user and the tickets to open before this approval is recorded, or None
    when it does not accept the schedule. Raises the errors `approve` would, so a bad
    approval opens nothing."""
    schedule, _, accepts = _approval_outcome(conn, schedule_id, approval, plan, now_ms, grace_ms)
    if not accepts:
        return None
    (user_id,) = conn.execute("SELECT user_id FROM schedules WHERE id = ?", (schedule,)).fetchone()
    groups = []
    for grp, group_id, start_ms, finish_ms in conn.execute(
        "SELECT id, group_id, start_ms, finish_ms FROM cm_groups WHERE schedule = ? ORDER BY id",
        (schedule,),
    ).fetchall():
        names = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM elements WHERE grp = ? AND status = ? ORDER BY id",
                (grp, E.PENDING_APPROVAL.value),
            )
        ]
        if names:
            groups.append(TicketGroup(group_id, names, start_ms, finish_ms))
    domain_data = dict(
        conn.execute("SELECT name, value FROM domain_data WHERE schedule = ?", (schedule,))
    )
    return user_id, ticketing.plan_tickets(user_id, groups, per_ticket, template, domain_data)


def approve(
    tx: Tx,
    schedule_id: str,
    approval: Approval,
    caller: str,
    plan: str | None = None,
    grace_ms: int = 0,
    opened: Opened | None = None,
) -> tuple[S, str | None]:
    """Record an approval, with who sent it (`caller`, from the socket's peer credentials:
    the user id in the body is only what the sender says) and the plan it approves (its
    fingerprint: `plan`, the one the approver saw, else the plan as it stands). The one that
    accepts the schedule brings the change tickets opened for it (`tickets_for_approval`):
    accepted and scheduled in this one transaction. Returns the schedule's status and the
    fingerprint of the plan approved."""
    schedule, status, accepts = _approval_outcome(
        tx, schedule_id, approval, plan, tx.now_ms, grace_ms
    )
    fingerprint = plan_fingerprint(tx, schedule, schedule_id)
    _record_approval(
        tx,
        schedule,
        approval.approvalUserId or "",
        approval.approvalStatus or "",
        caller,
        fingerprint,
    )
    if approval.approvalStatus == "Rejected":
        tx.schedule_to(schedule, schedule_id, status, S.REJECTED)
        for element, name, old in tx.execute(
            "SELECT id, name, status FROM elements WHERE schedule = ? AND status IN (?, ?)",
            (schedule, E.PENDING_APPROVAL.value, E.NOT_SCHEDULED.value),
        ).fetchall():
            tx.element_to(element, schedule, schedule_id, name, E(old), E.APPROVAL_REJECTED)
        return S.REJECTED, fingerprint
    if not accepts:
        return status, fingerprint
    if opened is None:
        raise RequestError(409, "SCHEDULE_CHANGED", schedule_id)
    tx.schedule_to(schedule, schedule_id, status, S.ACCEPTED, approved_plan=fingerprint)
    tx.note(
        "schedule.plan_approved",
        schedule_id=schedule_id,
        plan=fingerprint,
        by=approval.approvalUserId,
        caller=caller,
    )
    return _schedule_with_tickets(tx, schedule, schedule_id, opened), fingerprint


def _schedule_with_tickets(tx: Tx, schedule: int, schedule_id: str, opened: Opened) -> S:
    """The change tickets exist: record them; elements become `Scheduled` (or `Scheduled
    Immediate` when they have no start time), the schedule `Scheduled`. Elements the
    optimizer left out stay out."""
    change_ids = {}
    for change_id, ticket in opened:
        tx.execute(
            "INSERT INTO change_tickets (change_id, schedule, group_id, vnfs, planned_start_ms,"
            " planned_end_ms, approval_status, status, created_ms, updated_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                change_id,
                schedule,
                ticket.group_id,
                msgspec.json.encode(ticket.vnfs).decode(),
                ticket.planned_start_ms,
                ticket.planned_end_ms,
                ticketing.APPROVED,
                ticketing.OPEN,
                tx.now_ms,
                tx.now_ms,
            ),
        )
        change_ids.update(dict.fromkeys(ticket.vnfs, change_id))
    for element, name, start_ms in tx.execute(
        "SELECT id, name, start_ms FROM elements WHERE schedule = ? AND status = ?",
        (schedule, E.PENDING_APPROVAL.value),
    ).fetchall():
        tx.element_to(
            element,
            schedule,
            schedule_id,
            name,
            E.PENDING_APPROVAL,
            E.SCHEDULED if start_ms is not None else E.SCHEDULED_IMMEDIATE,
            tm_change_id=change_ids.get(name),
            tm_approval_status=ticketing.APPROVED if name in change_ids else None,
        )
    tx.schedule_to(schedule, schedule_id, S.ACCEPTED, S.SCHEDULED)
    return S.SCHEDULED


# -- optimizer ------------------------------------------------------------------------------


# Schedules to plan that this daemon may take: nobody else plans them (fleet.py).
TO_PLAN = (
    " FROM schedules WHERE status IN (?, ?)"
    " AND (optimizer_owner IS NULL OR optimizer_owner IS NOT DISTINCT FROM ?)"
)


def any_to_plan(conn: Any, owner: str | None) -> bool:
    """Is there a schedule to plan (`claim_for_optimization`)? A read: the optimizer takes the
    write lock (exclusive: a plan reads other schedules' slots) only when there is one."""
    return (
        conn.execute(
            f"SELECT 1{TO_PLAN} LIMIT 1",
            (S.PENDING_SCHEDULE.value, S.OPTIMIZATION_IN_PROGRESS.value, owner),
        ).fetchone()
        is not None
    )


def claim_for_optimization(
    tx: Tx, limit: int, inventory: dict[str, dict[str, str]] | None = None
) -> list[Problem]:
    """Schedules to plan: new ones go to `Optimization In Progress`; ones already there (the
    daemon stopped mid-plan) are planned again. (The inventory only tells which elements each
    requires, for the ticket book; the planner merges it into the element data itself.)"""
    problems = []
    rows = tx.execute(  # one optimizer per schedule: those nobody else plans (fleet.py)
        "SELECT id, schedule_id, status, normal_s, additional_s, concurrency, policy_id,"
        f" optimizer_attempts{TO_PLAN} ORDER BY id LIMIT ?",
        (S.PENDING_SCHEDULE.value, S.OPTIMIZATION_IN_PROGRESS.value, tx.owner, limit),
    ).fetchall()
    if rows and tx.owner is not None:
        tx.execute(
            "UPDATE schedules SET optimizer_owner = ? WHERE id IN"
            " (SELECT CAST(value AS BIGINT) FROM json_each(?))",
            (tx.owner, json.dumps([r[0] for r in rows])),
        )
    for (
        schedule,
        schedule_id,
        status,
        normal_s,
        additional_s,
        concurrency,
        policy_id,
        attempts,
    ) in rows:
        if status == S.PENDING_SCHEDULE:
            tx.schedule_to(
                schedule,
                schedule_id,
                S.PENDING_SCHEDULE,
                S.OPTIMIZATION_IN_PROGRESS,
                optimizer_ms=tx.now_ms,
                optimizer_attempts=attempts + 1,
            )
        groups = []
        element_data: dict[str, dict[str, str]] = {}
        for grp, group_id in tx.execute(
            "SELECT id, group_id FROM cm_groups WHERE schedule = ? ORDER BY id", (schedule,)
        ).fetchall():
            windows = tx.execute(
                "SELECT start_ms, end_ms FROM windows WHERE grp = ? ORDER BY start_ms", (grp,)
            ).fetchall()
            names = []
            for name, data in tx.execute(
                "SELECT name, data FROM elements WHERE grp = ? ORDER BY id", (grp,)
            ):
                names.append(name)
                if data:
                    element_data[name] = msgspec.json.decode(data, type=dict[str, str])
            groups.append(ProblemGroup(group_id, [(s, e) for s, e in windows], names))
        problems.append(
            Problem(
                key=schedule,
                schedule_id=schedule_id,
                duration_ms=(normal_s + additional_s) * 1000,
                concurrency=concurrency or 1,
                policy_id=policy_id,
                not_before_ms=tx.now_ms,
                groups=groups,
                element_data=element_data,
                busy=merge_busy(
                    other_work(tx.conn, schedule),
                    book_busy(
                        tx.conn,
                        [n for g in groups for n in g.elements],
                        {n: {**(inventory or {}).get(n, {}), **d} for n, d in element_data.items()}
                        | {n: d for n, d in (inventory or {}).items() if n not in element_data},
                    ),
                ),
            )
        )
    return problems


def record_plan(tx: Tx, schedule: int, plan: Plan, allow_partial: bool) -> S | None:
    row = tx.execute(
        "SELECT schedule_id, status, optimizer_owner FROM schedules WHERE id = ?", (schedule,)
    ).fetchone()
    if row is None or row[1] != S.OPTIMIZATION_IN_PROGRESS:
        return None  # deleted while it was being planned
    if tx.owner is not None and row[2] != tx.owner:
        tx.note("schedule.not_ours", schedule_id=row[0], owner=row[2])
        return None  # another daemon took its planning over
    schedule_id = row[0]
    elements = {
        name: (element, grp)
        for element, grp, name in tx.execute(
            "SELECT id, grp, name FROM elements WHERE schedule = ? AND status = ?",
            (schedule, E.PENDING_SCHEDULE.value),
        )
    }
    for name, (reason, message) in plan.unplaced.items():
        element, _ = elements[name]
        tx.element_to(
            element,
            schedule,
            schedule_id,
            name,
            E.PENDING_SCHEDULE,
            E.NOT_SCHEDULED,
            status_message=f"{reason}: {message}",
        )
    figures = dict(optimizer_return_ms=tx.now_ms)
    if not plan.placed or (plan.unplaced and not allow_partial):
        why = (
            f"No elements scheduled; {plan.summary}"
            if not plan.placed
            else f"{len(plan.unplaced)} of {len(elements)} elements could not be scheduled,"
            " so none is (optimizer.allow_partial = false)"
        )
        tx.schedule_to(
            schedule,
            schedule_id,
            S.OPTIMIZATION_IN_PROGRESS,
            S.OPTIMIZATION_FAILED,
            optimizer_status="FAILED",
            optimizer_message=why,
            **figures,
        )
        return S.OPTIMIZATION_FAILED
    duration_ms = plan.duration_ms
    spans: dict[int, list[int]] = {}
    for name, start_ms in plan.placed.items():
        element, grp = elements[name]
        tx.element_to(
            element,
            schedule,
            schedule_id,
            name,
            E.PENDING_SCHEDULE,
            E.PENDING_APPROVAL,
            start_ms=start_ms,
            finish_ms=start_ms + duration_ms,
        )
        spans.setdefault(grp, []).append(start_ms)
    for grp, starts in spans.items():
        tx.execute(
            "UPDATE cm_groups SET start_ms = ?, finish_ms = ?, last_instance_ms = ? WHERE id = ?",
            (min(starts), max(starts) + duration_ms, max(starts), grp),
        )
    tx.schedule_to(
        schedule,
        schedule_id,
        S.OPTIMIZATION_IN_PROGRESS,
        S.PENDING_APPROVAL,
        optimizer_status="COMPLETED",
        optimizer_message=plan.summary,
        **figures,
    )
    _keep_plan(tx, schedule, schedule_id, "optimizer")
    return S.PENDING_APPROVAL


# -- delete ---------------------------------------------------------------------------------


def delete_schedule(tx: Tx, schedule_id: str) -> S:
    schedule, status = _schedule_row(tx, schedule_id)
    if status in (S.DELETED, S.CANCELLED):
        return status  # already gone: deleting again changes nothing
    rows = tx.execute(
        "SELECT id, name, status FROM elements WHERE schedule = ?", (schedule,)
    ).fetchall()
    new_status, changes = lifecycle.delete_plan(status, (E(s) for _, _, s in rows))
    for element, name, old in rows:
        if E(old) in changes:
            tx.element_to(element, schedule, schedule_id, name, E(old), changes[E(old)])
    tx.schedule_to(schedule, schedule_id, status, new_status, delete_ms=tx.now_ms)
    return new_status


# -- stopping a rollout ---------------------------------------------------------------------


def _control(action: str, by: str, why: str, now_ms: int) -> dict[str, Any]:
    return {"control_action": action, "control_by": by, "control_why": why, "control_ms": now_ms}


def pause(tx: Tx, schedule_id: str, by: str, why: str) -> S:
    """Hold every element not yet dispatched (the stop gate); running ones are polled on."""
    schedule, status = _schedule_row(tx, schedule_id)
    lifecycle.check_stop(schedule_id, status, "pause")
    if status is S.PAUSED:
        return status
    tx.schedule_to(schedule, schedule_id, status, S.PAUSED, **_control("pause", by, why, tx.now_ms))
    tx.note("schedule.paused", schedule_id=schedule_id, by=by, why=why, was=status.value)
    return S.PAUSED


class Resumed(msgspec.Struct):
    """What a resume did: the schedule's status now, and each element carried over (its
    slot passed while the rollout was stopped; `new` None: no slot left, `Past due`)."""

    status: S
    moved: list[plans.Change]


def resume(
    tx: Tx,
    schedule_id: str,
    by: str,
    why: str,
    misfire_grace_ms: int,
    calendar: gates.CalendarGate | None = None,
) -> Resumed:
    """Back to where it was; the failures so far are acknowledged (the threshold counts anew);
    elements whose slot passed while it was stopped are carried over into the free slots
    left in their windows, now, so the answer shows the new plan and what moved."""
    schedule, status = _schedule_row(tx, schedule_id)
    if status not in SCHEDULE_STOPPED:
        raise RequestError(412, "NOT_STOPPED", schedule_id, status.value)
    rows = tx.execute(
        "SELECT status, dispatch_started_ms FROM elements WHERE schedule = ?", (schedule,)
    ).fetchall()
    statuses = [E(s) for s, _ in rows]
    ended = ELEMENT_FINAL - ELEMENT_NOT_PART
    started = any(d is not None or E(s) in ended for s, d in rows)
    new = lifecycle.resumed_status(started)
    failed = sum(s in ELEMENT_FAILED_RUN for s in statuses)
    tx.schedule_to(
        schedule,
        schedule_id,
        status,
        new,
        failures_acknowledged=failed,
        **_control("resume", by, why, tx.now_ms),
    )
    tx.note("schedule.resumed", schedule_id=schedule_id, by=by, why=why, status=new.value)
    dispatch.release_holds(tx, "stop", schedule)
    dispatch.release_holds(tx, "failures", schedule)
    late = tx.execute(
        "SELECT id, start_ms, finish_ms FROM elements WHERE schedule = ? AND status = ?"
        " AND dispatch_started_ms IS NULL AND start_ms < ? ORDER BY start_ms, id",
        (schedule, E.SCHEDULED.value, tx.now_ms - misfire_grace_ms),
    ).fetchall()
    moved = []
    for element, start, finish in late:
        loaded = dispatch.load_snapshot(tx, element)
        if loaded is not None:
            snap, row = loaded
            held = snap.held_why or f"{status.value}"
            slot = dispatch.carry_over(tx, snap, row, tx.now_ms, held, calendar)
            new_slot = None if slot is None else (slot, slot + snap.duration_ms)
            moved.append(plans.Change(snap.name, (start, finish), new_slot))
    return Resumed(new, moved)


class Aborted(msgspec.Struct):
    """What an abort did: the schedule's status now, the elements it cancelled, and those
    dispatched and not yet ended, which run to their end."""

    status: S
    cancelled: int
    running: int


def abort(tx: Tx, schedule_id: str, by: str, why: str) -> Aborted:
    """End every element not yet dispatched (`Cancelled`; their tickets cancelled or closed
    by CMSO's rules as the last of their elements ends); running ones are polled to their
    end. A schedule of which nothing ran is `Cancelled`."""
    schedule, status = _schedule_row(tx, schedule_id)
    lifecycle.check_stop(schedule_id, status, "abort")
    rows = tx.execute(
        "SELECT id, name, status, dispatch_started_ms FROM elements WHERE schedule = ?",
        (schedule,),
    ).fetchall()
    waiting = [(e, n, E(s)) for e, n, s, d in rows if d is None]  # no intent committed
    changes, ran = lifecycle.abort_plan(s for _, _, s in waiting)
    ran = ran or len(waiting) < len(rows)
    message = f"aborted by {by}: {why}"[:4000]
    control = _control("abort", by, why, tx.now_ms)
    if ran:
        if status is S.NOTIFICATIONS_INITIATED:
            tx.schedule_set(schedule, schedule_id, status, **control)
        else:
            tx.schedule_to(schedule, schedule_id, status, S.NOTIFICATIONS_INITIATED, **control)
    cancelled = 0
    for element, name, old in waiting:
        if old in changes:
            tx.element_to(
                element, schedule, schedule_id, name, old, changes[old], status_message=message
            )
            cancelled += 1
    if not ran:
        tx.schedule_to(schedule, schedule_id, status, S.CANCELLED, **control)
    running = sum(d is not None and E(s) not in ELEMENT_FINAL for _, _, s, d in rows)
    tx.note(
        "schedule.aborted",
        schedule_id=schedule_id,
        by=by,
        why=why,
        cancelled=cancelled,
        running=running,
    )
    return Aborted(S.NOTIFICATIONS_INITIATED if ran else S.CANCELLED, cancelled, running)


# -- re-planning at an approval, and pending approvals that expire ---------------------------


class Replanned(msgspec.Struct):
    """What `approve --replan` did: the plan the approver saw (else the plan before), the plan
    now, and each element whose slot differs between them."""

    seen: str | None
    plan: str | None
    changes: list[plans.Change]
    moved: int = 0  # the elements this re-plan re-placed (their slot had passed)


def replan(
    tx: Tx,
    schedule_id: str,
    seen: str | None,
    by: str,
    grace_ms: int,
    calendar: gates.CalendarGate | None = None,
) -> Replanned:
    """Re-place the elements of a schedule pending approval whose slots have passed, by the
    carry-over's rules (plans.replan), before it is approved; the others keep their slots.
    Refused, changing nothing, when one of them has no free slot left (409 NO_SLOT_LEFT)."""
    schedule, status = _schedule_row(tx, schedule_id)
    if status is not S.PENDING_APPROVAL:
        raise RequestError(412, "NOT_PENDING_APPROVAL", APPROVAL_DOMAIN, schedule_id, status.value)
    before = load_slots(tx, schedule)
    seen_slots = known_plan(tx, schedule, seen) if seen is not None else None
    late = set(plans.passed(before, tx.now_ms, grace_ms))
    if late:
        concurrency, duration_s = tx.execute(
            "SELECT concurrency, normal_s + additional_s FROM schedules WHERE id = ?", (schedule,)
        ).fetchone()
        (origin_ms,) = tx.execute(
            "SELECT min(w.start_ms) FROM windows w JOIN cm_groups g ON g.id = w.grp"
            " WHERE g.schedule = ?",
            (schedule,),
        ).fetchone()
        windows: dict[int, tuple[tuple[int, int], ...]] = {}
        rows = tx.execute(
            "SELECT id, name, grp, data FROM elements WHERE schedule = ? AND status = ?"
            " AND start_ms IS NOT NULL",
            (schedule, E.PENDING_APPROVAL.value),
        ).fetchall()
        ids = {name: element for element, name, _, _ in rows}
        others = other_work(tx.conn, schedule, sorted(late))
        elements = []
        for _, name, grp, data in rows:
            if grp not in windows:
                windows[grp] = tuple(
                    (a, b)
                    for a, b in tx.execute(
                        "SELECT start_ms, end_ms FROM windows WHERE grp = ?", (grp,)
                    )
                )
            blocked: tuple[tuple[int, int], ...] = ()
            if name in late:
                element_data = msgspec.json.decode(data, type=dict[str, str]) if data else {}
                blocked = tuple(
                    blocked_spans(
                        tx.conn,
                        name,
                        element_data,
                        tx.now_ms,
                        others.get(name, ()),
                        windows[grp],
                        calendar,
                    )
                )
            elements.append(plans.Element(name, before[name], windows[grp], blocked))
        after, stuck = plans.replan(
            elements, origin_ms, duration_s * 1000, concurrency or 1, tx.now_ms, grace_ms
        )
        if stuck:
            raise RequestError(
                409, "NO_SLOT_LEFT", schedule_id, detail="no free slot for " + ", ".join(stuck)
            )
        for change in plans.difference(before, after):
            assert change.old is not None and change.new is not None
            tx.element_set(
                ids[change.vnfName],
                schedule,
                schedule_id,
                change.vnfName,
                E.PENDING_APPROVAL,
                start_ms=change.new[0],
                finish_ms=change.new[1],
                status_message=(
                    f"re-planned by {by}: its slot {lifecycle.format_time(change.old[0])}"
                    " passed before the approval"
                )[:4000],
            )
        for grp, first, last, finish in tx.execute(
            "SELECT grp, min(start_ms), max(start_ms), max(finish_ms) FROM elements"
            " WHERE schedule = ? AND start_ms IS NOT NULL GROUP BY grp",
            (schedule,),
        ).fetchall():
            tx.execute(
                "UPDATE cm_groups SET start_ms = ?, finish_ms = ?, last_instance_ms = ?"
                " WHERE id = ?",
                (first, finish, last, grp),
            )
    fingerprint = _keep_plan(tx, schedule, schedule_id, f"replan by {by}")
    now = load_slots(tx, schedule)
    changes = plans.difference(seen_slots if seen_slots is not None else before, now)
    if late:
        tx.note(
            "schedule.replanned",
            schedule_id=schedule_id,
            was=plans.fingerprint(schedule_id, before),
            plan=fingerprint,
            moved=len(late),
            by=by,
        )
    return Replanned(
        seen or plans.fingerprint(schedule_id, before), fingerprint, changes, len(late)
    )


def next_expiry_ms(conn: Any, timeout_ms: int, grace_ms: int = 0) -> int | None:
    """When the next schedule left pending approval expires (plans.expires_at; `grace_ms`
    the misfire grace), None when none waits for approval."""
    if timeout_ms > 0:
        (planned,) = conn.execute(
            "SELECT min(optimizer_return_ms) FROM schedules WHERE status = ?",
            (S.PENDING_APPROVAL.value,),
        ).fetchone()
        return None if planned is None else planned + timeout_ms
    (first,) = conn.execute(  # (elements_status_start: no scan)
        "SELECT min(start_ms) FROM elements WHERE status = ?", (E.PENDING_APPROVAL.value,)
    ).fetchone()
    return None if first is None else plans.expires_at(first, None, 0, grace_ms)


def expire_pending(tx: Tx, timeout_ms: int, grace_ms: int = 0) -> list[str]:
    """Schedules left `Pending Approval` past their approval timeout (plans.expires_at;
    `grace_ms` the misfire grace) are `Expired`, their
    waiting elements too, with a message saying why. (They have no change tickets yet:
    those are opened at acceptance.) Returns their ids."""
    expired = []
    for schedule, schedule_id, planned, first in tx.execute(
        "SELECT s.id, s.schedule_id, s.optimizer_return_ms, min(e.start_ms) FROM schedules s"
        " LEFT JOIN elements e ON e.schedule = s.id AND e.start_ms IS NOT NULL"
        " WHERE s.status = ? GROUP BY s.id, s.schedule_id, s.optimizer_return_ms",
        (S.PENDING_APPROVAL.value,),
    ).fetchall():
        deadline = plans.expires_at(first, planned, timeout_ms, grace_ms)
        if deadline is None or deadline > tx.now_ms:
            continue
        why = plans.expiry_reason(first, planned, timeout_ms, grace_ms)
        tx.schedule_to(
            schedule,
            schedule_id,
            S.PENDING_APPROVAL,
            S.EXPIRED,
            **_control("expire", "cmsod", why, tx.now_ms),
        )
        for element, name in tx.execute(
            "SELECT id, name FROM elements WHERE schedule = ? AND status = ?",
            (schedule, E.PENDING_APPROVAL.value),
        ).fetchall():
            tx.element_to(
                element,
                schedule,
                schedule_id,
                name,
                E.PENDING_APPROVAL,
                E.EXPIRED,
                status_message=f"its schedule expired: {why}"[:4000],
            )
        tx.note("schedule.expired", schedule_id=schedule_id, why=why)
        expired.append(schedule_id)
    return expired
