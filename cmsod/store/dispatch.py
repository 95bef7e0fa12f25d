"""Dispatch and polling: which elements are due, the committed intent to dispatch (decided by
the core's gates, `cmsod.gates`), the orchestrator's answers, and reconciliation after a crash.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from cmsod import gates, ticketing
from cmsod.model import ELEMENT_DISPATCHABLE, PollOutcome
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.store.store import Tx

# -- dispatch -------------------------------------------------------------------------------


class DispatchJob(msgspec.Struct):
    element: int
    schedule: int
    schedule_id: str
    name: str
    request: bytes
    key: str
    attempt: int


def load_snapshot(tx: Tx, element: int) -> tuple[gates.Snapshot, tuple] | None:
    """The element as the gates see it, and what applying their answer needs; None when it
    no longer waits for a dispatch (ended, or its intent already committed)."""
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
    snapshot = gates.Snapshot(
        now_ms=tx.now_ms,
        schedule_id=schedule_id,
        name=name,
        status=E(status),
        start_ms=start_ms,
        created_ms=created_ms,
        change_id=change_id,
        ticket_state=ticketing.state_text(ticket_approval, ticket_status),
    )
    return snapshot, (schedule, S(schedule_status), request, key, attempts)


def begin_dispatch(tx: Tx, element: int, rules: list[gates.Gate]) -> DispatchJob | None:
    """Ask the gates; on `Go` commit the intent to dispatch before the orchestrator is called
    (at most once), on `Hold` the time to look again, on `End` how the element ends."""
    loaded = load_snapshot(tx, element)
    if loaded is None:
        return None
    snap, (schedule, schedule_status, request, key, attempts) = loaded
    _, answer = gates.decide(snap, rules)
    if isinstance(answer, gates.Hold):
        tx.execute("UPDATE elements SET hold_ms = ? WHERE id = ?", (answer.until_ms, element))
        return None
    if schedule_status is S.SCHEDULED:  # the first dispatch attempt, even if then refused
        tx.schedule_to(schedule, snap.schedule_id, S.SCHEDULED, S.NOTIFICATIONS_INITIATED)
    if isinstance(answer, gates.End):
        tx.element_to(
            element,
            schedule,
            snap.schedule_id,
            snap.name,
            snap.status,
            answer.status,
            status_message=answer.why,
        )
        return None
    key = key or str(uuid.uuid4())
    tx.execute(
        "UPDATE elements SET dispatch_key = ?, dispatch_started_ms = ?,"
        " dispatch_attempts = dispatch_attempts + 1 WHERE id = ?",
        (key, tx.now_ms, element),
    )
    return DispatchJob(element, schedule, snap.schedule_id, snap.name, request, key, attempts + 1)


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


def begin_dispatches(tx: Tx, elements: list[int], rules: list[gates.Gate]) -> list[DispatchJob]:
    """`begin_dispatch` for a whole due batch in one transaction (one commit, not hundreds)."""
    jobs = [begin_dispatch(tx, e, rules) for e in elements]
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


def in_flight(conn: Any) -> list[tuple[int, str, str, int | None]]:
    """(element, name, SO request id, dispatch time) of every triggered element."""
    return conn.execute(
        "SELECT id, name, so_request_id, dispatch_ms FROM elements WHERE status = ?"
        " ORDER BY dispatch_ms",
        (E.TRIGGERED.value,),
    ).fetchall()


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
    )
    return outcome.status
