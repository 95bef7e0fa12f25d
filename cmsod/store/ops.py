"""The write transactions. Each is a synchronous `fn(tx, ...)` run whole by `Store.tx`.

They re-read the rows they change, so a message that arrives late (an optimizer result for a
schedule deleted meanwhile, a poll answer for an element already ended) changes nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec

from cmsod import cmevents, lifecycle, ticketing
from cmsod.errors import ControlError, RequestError
from cmsod.model import (
    APPROVAL_DOMAIN,
    APPROVAL_TYPE,
    APPROVALS_REQUIRED,
    ELEMENT_DISPATCHABLE,
    NewSchedule,
    PollOutcome,
)
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.problem import Busy, Plan, Problem, ProblemGroup, blocking, requirements
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
        " additional_s, concurrency, policy_id, schedule_info, create_ms, updated_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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


def _record_approval(tx: Tx, schedule: int, user_id: str, status: str, caller: str) -> None:
    tx.execute(
        "INSERT INTO approvals (schedule, user_id, approval_type, status, approval_ms, caller)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (schedule, user_id, approval_type)"
        " DO UPDATE SET status = excluded.status, approval_ms = excluded.approval_ms,"
        " caller = excluded.caller",
        (schedule, user_id, APPROVAL_TYPE, status, tx.now_ms, caller),
    )


def _approval_outcome(db: Any, schedule_id: str, approval: Approval) -> tuple[int, S, bool]:
    """CMSO 2.5, in its order: body enums (400), not found (404), not pending (412), user (400).
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
    (others,) = db.execute(
        "SELECT count(*) FROM approvals WHERE schedule = ? AND approval_type = ? AND status = ?"
        " AND user_id != ?",
        (schedule, APPROVAL_TYPE, "Accepted", approval.approvalUserId),
    ).fetchone()
    return schedule, status, others + 1 >= APPROVALS_REQUIRED


def tickets_for_approval(
    conn: Any, schedule_id: str, approval: Approval, per_ticket: int, template: dict[str, str]
) -> tuple[str, list[NewTicket]] | None:
    """The schedule's user and the tickets to open before this approval is recorded, or None
    when it does not accept the schedule. Raises the errors `approve` would, so a bad
    approval opens nothing."""
    schedule, _, accepts = _approval_outcome(conn, schedule_id, approval)
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
    tx: Tx, schedule_id: str, approval: Approval, caller: str, opened: Opened | None = None
) -> S:
    """Record an approval, with who sent it (`caller`, from the socket's peer credentials:
    the user id in the body is only what the sender says). The one that accepts the schedule
    brings the change tickets opened for it (`tickets_for_approval`): accepted and scheduled
    in this one transaction."""
    schedule, status, accepts = _approval_outcome(tx, schedule_id, approval)
    _record_approval(
        tx, schedule, approval.approvalUserId or "", approval.approvalStatus or "", caller
    )
    if approval.approvalStatus == "Rejected":
        tx.schedule_to(schedule, schedule_id, status, S.REJECTED)
        for element, name, old in tx.execute(
            "SELECT id, name, status FROM elements WHERE schedule = ? AND status IN (?, ?)",
            (schedule, E.PENDING_APPROVAL.value, E.NOT_SCHEDULED.value),
        ).fetchall():
            tx.element_to(element, schedule, schedule_id, name, E(old), E.APPROVAL_REJECTED)
        return S.REJECTED
    if not accepts:
        return status
    if opened is None:
        raise RequestError(409, "SCHEDULE_CHANGED", schedule_id)
    tx.schedule_to(schedule, schedule_id, status, S.ACCEPTED)
    return _schedule_with_tickets(tx, schedule, schedule_id, opened)


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


def abandon_tickets(tx: Tx, opened: Opened, user_id: str) -> None:
    """Tickets TM opened for a request that then could not be stored (it changed meanwhile):
    cancel them, through the outbox like any other ticket operation."""
    for change_id, _ in opened:
        body = ticketing.close_body(change_id, user_id, ticketing.Closure.CANCELLED, None, None, 0)
        tx.queue_ticket_op(change_id, ticketing.Op.CANCEL, body)


# -- optimizer ------------------------------------------------------------------------------


def claim_for_optimization(
    tx: Tx, limit: int, inventory: dict[str, dict[str, str]] | None = None
) -> list[Problem]:
    """Schedules to plan: new ones go to `Optimization In Progress`; ones already there (the
    daemon stopped mid-plan) are planned again. (The inventory only tells which elements each
    requires, for the ticket book; the planner merges it into the element data itself.)"""
    problems = []
    rows = tx.execute(
        "SELECT id, schedule_id, status, normal_s, additional_s, concurrency, policy_id,"
        " optimizer_attempts FROM schedules WHERE status IN (?, ?) ORDER BY id LIMIT ?",
        (S.PENDING_SCHEDULE.value, S.OPTIMIZATION_IN_PROGRESS.value, limit),
    ).fetchall()
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


ACTIVE_WORK = (E.PENDING_APPROVAL.value, E.SCHEDULED.value, E.TRIGGERED.value)


def other_work(
    conn: Any, schedule: int | None, names: list[str] | None = None
) -> dict[str, list[Busy]]:
    """The planned or running work of every other active schedule on these elements: those of
    stored `schedule`, or `names` for a schedule that is only being planned."""
    params: tuple[int | str | None, ...]
    if names is not None:  # (a JSON array, not a temporary table: reads are query-only)
        mine, params = "SELECT value FROM json_each(?)", (json.dumps(names),)
    else:
        mine, params = "SELECT name FROM elements WHERE schedule = ?", (schedule,)
    busy: dict[str, list[Busy]] = {}
    for name, start, finish, dispatched, duration_s, other_id in conn.execute(
        "SELECT o.name, o.start_ms, o.finish_ms, o.dispatch_ms, s.normal_s + s.additional_s,"
        " s.schedule_id FROM elements o JOIN schedules s ON s.id = o.schedule"
        f" WHERE o.name IN ({mine}) AND o.schedule IS NOT ? AND o.status IN (?, ?, ?)",
        (*params, schedule, *ACTIVE_WORK),
    ):
        begin = start if start is not None else dispatched
        if begin is None:
            continue  # an immediate element not yet dispatched: no time to avoid yet
        end = finish if finish is not None else begin + duration_s * 1000
        busy.setdefault(name, []).append(Busy(begin, end, f"schedule {other_id}"))
    return busy


def record_plan(tx: Tx, schedule: int, plan: Plan, allow_partial: bool) -> S | None:
    row = tx.execute(
        "SELECT schedule_id, status FROM schedules WHERE id = ?", (schedule,)
    ).fetchone()
    if row is None or row[1] != S.OPTIMIZATION_IN_PROGRESS:
        return None  # deleted while it was being planned
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
    return S.PENDING_APPROVAL


# -- dispatch -------------------------------------------------------------------------------


class DispatchJob(msgspec.Struct):
    element: int
    schedule: int
    schedule_id: str
    name: str
    request: bytes
    key: str
    attempt: int
    planned_ms: int  # its start time, or an immediate one's creation: lateness counts from it
    # Until when a call that never reached the orchestrator may be tried again: the start time
    # (immediates: the creation time) plus the misfire grace, as for a silent ticket system.
    deadline_ms: int = 0


class TicketGate(msgspec.Struct):
    """The change-ticket check before dispatch. `allowed`: the `approvalStatus|status` pairs
    that pass (None: no check, loopback mode). `remote`: what TM answered per changeId (http
    mode), with `unknown` saying why a ticket could not be read; without it our own record of
    the ticket is what is checked (builtin mode)."""

    allowed: tuple[str, ...] | None = None
    remote: dict[str, str] | None = None
    unknown: dict[str, str] = {}
    unreachable: dict[str, str] = {}  # TM did not answer: hold the element, ask again later
    hold_ms: int = 5000

    def refusal(self, change_id: str | None, local_state: str) -> str | None:
        if self.allowed is None or change_id is None:
            return None
        if change_id in self.unknown:
            return (
                f"UNABLE_TO_LOCATE_CHANGE_RECORD: change ticket {change_id}: "
                f"{self.unknown[change_id]}"
            )
        state = local_state if self.remote is None else self.remote.get(change_id, "|")
        if state in self.allowed:
            return None
        return ticketing.refusal(change_id, state, self.allowed)


def begin_dispatch(
    tx: Tx, element: int, misfire_grace_ms: int, dispatch_immediate: bool, gate: TicketGate
) -> DispatchJob | None:
    """Commit the intent to dispatch before the orchestrator is called (at most once)."""
    row = tx.execute(
        "SELECT e.schedule, s.schedule_id, s.status, e.name, e.status, e.start_ms, e.request,"
        " e.dispatch_key, e.dispatch_started_ms, e.dispatch_attempts, e.tm_change_id,"
        " t.approval_status, t.status, s.create_ms"
        " FROM elements e JOIN schedules s ON s.id = e.schedule"
        " LEFT JOIN change_tickets t ON t.change_id = e.tm_change_id WHERE e.id = ?",
        (element,),
    ).fetchone()
    if row is None:
        return None
    (
        schedule,
        schedule_id,
        schedule_status,
        name,
        status,
        start_ms,
        request,
        key,
        started,
        attempts,
        change_id,
        ticket_approval,
        ticket_status,
        created_ms,
    ) = row
    if E(status) not in ELEMENT_DISPATCHABLE or started is not None:
        return None
    deadline_ms = (start_ms if start_ms is not None else created_ms) + misfire_grace_ms
    if schedule_status == S.SCHEDULED:  # the first dispatch attempt, even if then refused
        tx.schedule_to(schedule, schedule_id, S.SCHEDULED, S.NOTIFICATIONS_INITIATED)
    silence = gate.unreachable.get(change_id or "")
    if silence is None:
        refused = gate.refusal(change_id, ticketing.state_text(ticket_approval, ticket_status))
    elif tx.now_ms <= deadline_ms:
        tx.execute(
            "UPDATE elements SET hold_ms = ? WHERE id = ?", (tx.now_ms + gate.hold_ms, element)
        )
        return None  # TM did not answer: ask again in a while, within the misfire grace
    else:
        refused = (
            f"UNABLE_TO_LOCATE_CHANGE_RECORD: change ticket {change_id}: the ticket system "
            f"did not answer within the misfire grace: {silence}"
        )
    ended: tuple[E, str] | None = None  # not dispatched after all: how it ends, and why
    if refused is not None:
        ended = E.SCHEDULING_FAILED, refused
    elif status == E.SCHEDULED_IMMEDIATE and not dispatch_immediate:
        ended = (
            E.SCHEDULING_FAILED,
            "immediate dispatch is disabled (dispatcher.dispatch_immediate = false)",
        )
    elif start_ms is not None and tx.now_ms > start_ms + misfire_grace_ms:
        ended = (
            E.PAST_DUE,
            f"not dispatched: {(tx.now_ms - start_ms) / 1000:.0f} s after its start time "
            f"{lifecycle.format_time(start_ms)}, beyond the misfire grace of "
            f"{misfire_grace_ms / 1000:.0f} s",
        )
    if ended is not None:
        new, why = ended
        tx.element_to(element, schedule, schedule_id, name, E(status), new, status_message=why)
        return None
    key = key or str(uuid.uuid4())
    tx.execute(
        "UPDATE elements SET dispatch_key = ?, dispatch_started_ms = ?,"
        " dispatch_attempts = dispatch_attempts + 1 WHERE id = ?",
        (key, tx.now_ms, element),
    )
    planned_ms = start_ms if start_ms is not None else created_ms
    return DispatchJob(
        element, schedule, schedule_id, name, request, key, attempts + 1, planned_ms, deadline_ms
    )


def next_due_ms(conn: Any) -> int | None:
    """When the next element falls due (immediates: at once; one whose ticket could not be
    checked: when it is held to), None when nothing waits."""
    (due,) = conn.execute(
        "SELECT min(max(coalesce(start_ms, 0), coalesce(hold_ms, 0))) FROM elements"
        " WHERE status IN (?, ?) AND dispatch_started_ms IS NULL",
        (E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value),
    ).fetchone()
    return due


def due_elements(conn: Any, until_ms: int, limit: int) -> list[tuple[int, str | None]]:
    """Elements to dispatch now, earliest first: immediates, then those starting by `until_ms`;
    each with its change ticket."""
    return [
        (element, change_id)
        for (element, change_id) in conn.execute(
            "SELECT id, tm_change_id FROM elements WHERE dispatch_started_ms IS NULL AND"
            " (status = ? OR (status = ? AND start_ms <= ?)) AND coalesce(hold_ms, 0) <= ?"
            " ORDER BY coalesce(start_ms, 0), id LIMIT ?",
            (E.SCHEDULED_IMMEDIATE.value, E.SCHEDULED.value, until_ms, until_ms, limit),
        )
    ]


def begin_dispatches(
    tx: Tx, elements: list[int], misfire_grace_ms: int, dispatch_immediate: bool, gate: TicketGate
) -> list[DispatchJob]:
    """`begin_dispatch` for a whole due batch in one transaction (one commit, not hundreds)."""
    jobs = [begin_dispatch(tx, e, misfire_grace_ms, dispatch_immediate, gate) for e in elements]
    return [job for job in jobs if job is not None]


def record_dispatch_results(tx: Tx, results: list[tuple[int, str | None, str | None]]) -> int:
    """The orchestrator's answers for a batch: (element, SO request id or None, failure
    message or None). An element no longer waiting for its answer is left alone."""
    recorded = 0
    for element, request_id, failure in results:
        row = tx.execute(
            "SELECT e.schedule, s.schedule_id, e.name, e.status FROM elements e"
            " JOIN schedules s ON s.id = e.schedule"
            " WHERE e.id = ? AND e.dispatch_started_ms IS NOT NULL",
            (element,),
        ).fetchone()
        if row is None or E(row[3]) not in ELEMENT_DISPATCHABLE:
            continue
        schedule, schedule_id, name, status = row
        new, columns = (
            (
                E.TRIGGERED,
                {"dispatch_ms": tx.now_ms, "so_request_id": request_id, "so_status": "Accepted"},
            )
            if request_id is not None
            else (E.SCHEDULING_FAILED, {"status_message": (failure or "dispatch failed")[:4000]})
        )
        tx.element_to(element, schedule, schedule_id, name, E(status), new, **columns)
        recorded += 1
    return recorded


def release_dispatches(tx: Tx, elements: list[int]) -> None:
    """Nothing was sent for these (the daemon stopped while the orchestrator could not be
    reached): clear the intent, so the next start dispatches them instead of reconciling."""
    tx.execute(
        "UPDATE elements SET dispatch_started_ms = NULL WHERE id IN"
        " (SELECT value FROM json_each(?)) AND status IN (?, ?)",
        (json.dumps(elements), E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value),
    )


def reconcile_dispatches(tx: Tx, resend: bool) -> list[str]:
    """After a restart: elements whose dispatch intent was committed but whose answer was not.
    The orchestrator may or may not have the work flow; never send it blindly again."""
    caught = tx.execute(
        "SELECT e.id, e.schedule, s.schedule_id, e.name, e.status, e.dispatch_key FROM elements e"
        " JOIN schedules s ON s.id = e.schedule"
        " WHERE e.status IN (?, ?) AND e.dispatch_started_ms IS NOT NULL",
        (E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value),
    ).fetchall()
    names = []
    for element, schedule, schedule_id, name, status, key in caught:
        names.append(name)
        if resend:  # the orchestrator de-duplicates on X-TransactionId: same key again
            tx.execute("UPDATE elements SET dispatch_started_ms = NULL WHERE id = ?", (element,))
            continue
        tx.element_to(
            element,
            schedule,
            schedule_id,
            name,
            E(status),
            E.ERROR,
            status_message=(
                "dispatch outcome unknown: cmsod stopped after sending the work flow "
                f"(X-TransactionId {key}) and before recording the orchestrator's answer; "
                "not re-sent (so.resend_unconfirmed = false). Check the orchestrator for it."
            ),
        )
    return names


# -- polling --------------------------------------------------------------------------------


def in_flight(conn: Any) -> list[tuple[int, str, str, str, int | None]]:
    """(element, schedule id, name, SO request id, dispatch time) of every triggered element."""
    return conn.execute(
        "SELECT e.id, s.schedule_id, e.name, e.so_request_id, e.dispatch_ms FROM elements e"
        " JOIN schedules s ON s.id = e.schedule WHERE e.status = ? ORDER BY e.dispatch_ms",
        (E.TRIGGERED.value,),
    ).fetchall()


def record_polls(tx: Tx, outcomes: list[tuple[int, PollOutcome]]) -> list[E | None]:
    """`record_poll` for a whole round of polls in one transaction; each element's new status
    (None: still running)."""
    return [record_poll(tx, element, outcome) for element, outcome in outcomes]


def record_poll(tx: Tx, element: int, outcome: PollOutcome) -> E | None:
    row = tx.execute(
        "SELECT e.schedule, s.schedule_id, e.name, e.status FROM elements e"
        " JOIN schedules s ON s.id = e.schedule WHERE e.id = ?",
        (element,),
    ).fetchone()
    if row is None or row[3] != E.TRIGGERED:
        return None
    schedule, schedule_id, name, _ = row
    if outcome.status is None:
        tx.execute(
            "UPDATE elements SET so_status = ?, so_message = ?, so_ms = ?,"
            " poll_errors = poll_errors + ? WHERE id = ?",
            (
                outcome.so_status,
                outcome.so_message,
                tx.now_ms,
                int(outcome.connection_error),
                element,
            ),
        )
        return None
    tx.element_to(
        element,
        schedule,
        schedule_id,
        name,
        E.TRIGGERED,
        outcome.status,
        so_status=outcome.so_status,
        so_message=outcome.so_message,
        so_ms=tx.now_ms,
        completed_ms=outcome.completed_ms or tx.now_ms,
        **failure_message(outcome),
    )
    return outcome.status


def failure_message(outcome: PollOutcome) -> dict[str, str]:
    """A work flow that ended badly keeps the orchestrator's reason as its status message (the
    MESSAGE an operator reads), not only in the SO columns."""
    if outcome.status is E.COMPLETED:
        return {}
    reason = (
        f"{outcome.so_status}: {outcome.so_message}" if outcome.so_message else outcome.so_status
    )
    return {"status_message": f"orchestrator: {reason}"[:4000]}


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


# -- event outbox ---------------------------------------------------------------------------


def pending_events(conn: Any, limit: int) -> list[tuple[int, str, str, bytes]]:
    return conn.execute(
        "SELECT seq, schedule_id, topic, body FROM events"
        " WHERE sent_ms IS NULL AND refused IS NULL ORDER BY seq LIMIT ?",
        (limit,),
    ).fetchall()


def last_event_seq(conn: Any) -> int:
    return conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]


def refuse_event(tx: Tx, seq: int, reason: str) -> None:
    tx.execute("UPDATE events SET refused = ? WHERE seq = ?", (reason[:1000], seq))


def mark_events_sent(tx: Tx, seqs: list[int]) -> None:
    tx.conn.executemany(
        "UPDATE events SET sent_ms = ? WHERE seq = ?", [(tx.now_ms, seq) for seq in seqs]
    )


# -- ticket outbox --------------------------------------------------------------------------


class TicketOp(msgspec.Struct):
    id: int
    change_id: str
    op: ticketing.Op
    body: bytes
    attempts: int


_TICKET_HEAD = (
    " o.sent_ms IS NULL AND NOT EXISTS (SELECT 1 FROM ticket_ops p"
    " WHERE p.change_id = o.change_id AND p.sent_ms IS NULL AND p.id < o.id)"
)


def due_ticket_ops(conn: Any, now_ms: int, limit: int) -> list[TicketOp]:
    """The first unsent operation of each ticket, if due: a ticket's operations go in order,
    and one TM keeps refusing holds back only that ticket's."""
    return [
        TicketOp(id, change_id, ticketing.Op(op), body, attempts)
        for id, change_id, op, body, attempts in conn.execute(
            "SELECT o.id, o.change_id, o.op, o.body, o.attempts FROM ticket_ops o"
            f" WHERE o.due_ms <= ? AND{_TICKET_HEAD} ORDER BY o.id LIMIT ?",
            (now_ms, limit),
        )
    ]


def next_ticket_op_ms(conn: Any) -> int | None:
    return conn.execute(f"SELECT min(o.due_ms) FROM ticket_ops o WHERE{_TICKET_HEAD}").fetchone()[0]


def record_ticket_ops(
    tx: Tx, sent: list[TicketOp], failed: list[tuple[TicketOp, str, int]]
) -> None:
    """TM took these operations (our record of the ticket follows) or refused these (each
    with why and when to try again)."""
    for op in sent:
        tx.execute(
            "UPDATE ticket_ops SET sent_ms = ?, attempts = attempts + 1 WHERE id = ?",
            (tx.now_ms, op.id),
        )
        status = ticketing.WORK_IN_PROGRESS if op.op is ticketing.Op.UPDATE else ticketing.CLOSED
        tx.execute(
            "UPDATE change_tickets SET status = ?, updated_ms = ? WHERE change_id = ?",
            (status, tx.now_ms, op.change_id),
        )
        if status == ticketing.CLOSED:  # CMSO: the elements' tmStatus once closed
            tx.execute(
                "UPDATE elements SET tm_status = ? WHERE tm_change_id = ?",
                (ticketing.CLOSED, op.change_id),
            )
    for op, error, due_ms in failed:
        tx.execute(
            "UPDATE ticket_ops SET attempts = attempts + 1, last_error = ?, due_ms = ?"
            " WHERE id = ?",
            (error[:2000], due_ms, op.id),
        )


# -- the ticket book: element unavailability ------------------------------------------------


class Unavailability(msgspec.Struct):
    id: str
    kind: str
    element: str
    startTime: str
    endTime: str
    reason: str
    createdBy: str


def _unavailability(row: tuple) -> Unavailability:
    ref, kind, element, start, end, reason, by = row
    return Unavailability(
        ref,
        kind,
        element,
        lifecycle.format_time(start) or "",
        lifecycle.format_time(end) or "",
        reason,
        by,
    )


def add_unavailability(
    tx: Tx,
    kind: str,
    element: str,
    start_ms: int,
    end_ms: int,
    reason: str,
    by: str,
    ref: str | None,
) -> tuple[Unavailability, list[str]]:
    """Record it; also say which active schedules have work on the element in that time."""
    # the next number never handed out, even to an entry since removed
    (n,) = tx.execute(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'availability'), 0) + 1"
    ).fetchone()
    if ref is None:
        ref = f"BO{n:06d}" if kind == "blackout" else f"TK{n:06d}"
    if tx.execute("SELECT 1 FROM availability WHERE ref = ?", (ref,)).fetchone():
        raise ControlError(
            f"an entry {ref!r} is already in the ticket book", name="io.cmsod.Availability.Exists"
        )
    tx.execute(
        "INSERT INTO availability (id, ref, kind, element, start_ms, end_ms, reason, created_ms,"
        " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (n, ref, kind, element, start_ms, end_ms, reason, tx.now_ms, by),
    )
    touched = [
        schedule_id
        for (schedule_id,) in tx.execute(
            "SELECT DISTINCT s.schedule_id FROM elements e JOIN schedules s ON s.id = e.schedule"
            " WHERE e.name = ? AND e.status IN (?, ?, ?) AND e.start_ms < ? AND e.finish_ms > ?"
            " ORDER BY s.schedule_id",
            (element, *ACTIVE_WORK, end_ms, start_ms),
        )
    ]
    return _unavailability((ref, kind, element, start_ms, end_ms, reason, by)), touched


def list_unavailability(conn: Any, element: str | None) -> list[Unavailability]:
    where, params = ("WHERE element = ?", (element,)) if element else ("", ())
    rows = conn.execute(
        "SELECT ref, kind, element, start_ms, end_ms, reason, created_by FROM availability"
        f" {where} ORDER BY start_ms, ref",
        params,
    ).fetchall()
    return [_unavailability(r) for r in rows]


def remove_unavailability(tx: Tx, ref: str) -> bool:
    return tx.execute("DELETE FROM availability WHERE ref = ?", (ref,)).rowcount > 0


def book_busy(
    conn: Any, names: list[str], element_data: dict[str, dict[str, str]]
) -> dict[str, list[Busy]]:
    """Entries of the ticket book that block these elements: those on the element itself and
    those on any element it requires."""
    wanted = requirements(names, element_data)
    if not wanted:
        return {}
    rows = conn.execute(  # (a JSON array, not a temporary table: reads are query-only)
        "SELECT element, start_ms, end_ms, kind || ' ' || ref, reason FROM availability"
        " WHERE element IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(wanted)),),
    ).fetchall()
    return blocking(rows, wanted)


def merge_busy(*sources: dict[str, list[Busy]]) -> dict[str, list[Busy]]:
    merged: dict[str, list[Busy]] = {}
    for source in sources:
        for name, spans in source.items():
            merged.setdefault(name, []).extend(spans)
    return merged
