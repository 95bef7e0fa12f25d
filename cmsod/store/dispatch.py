"""Dispatch and polling: which elements are due, the committed intent to dispatch (decided by
the core's gates, `cmsod.gates`), the orchestrator's answers, and reconciliation after a crash.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec

from cmsod import cmevents, explain, gates, lifecycle, ticketing
from cmsod.model import (
    ELEMENT_DISPATCHABLE,
    ELEMENT_FAILED_RUN,
    ELEMENT_NOT_COUNTED,
    PollOutcome,
)
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.store import book
from cmsod.store.store import Tx, shared_lock

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


# A hold with no end (pause, halt, a freeze without --until): looked at again only once
# released (resume, freeze off clear it).
INDEFINITE_MS = explain.HELD_UNTIL_RELEASED_MS
FAILED_RUN = tuple(sorted(s.value for s in ELEMENT_FAILED_RUN))
NOT_COUNTED = tuple(sorted(s.value for s in ELEMENT_NOT_COUNTED))
# An element once held that goes more than this after its slot began was released late: its
# run [now, now + duration) is checked against the concurrency (BatchCache.taken). Within it,
# it keeps its slot as on-time work does (which the dispatcher itself may send this late under
# a burst): a carried-over element, whose hold_why stays, sent a few ms after its new slot
# began would otherwise overlap its neighbour's slot by those ms, be carried over again and
# leap-frog it for ever.
LATE_AFTER_MS = 1000


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))


class Loaded(msgspec.Struct):
    """What applying the gates' answer needs besides the snapshot."""

    element: int
    schedule: int
    grp: int
    request: bytes
    key: str | None
    attempts: int
    data: bytes | None
    concurrency: int | None


# What a snapshot reads of an element, its schedule and its ticket (`load_snapshot`).
SNAPSHOT = (
    "SELECT e.id, e.schedule, s.schedule_id, s.status, e.name, e.status, e.start_ms, e.request,"
    " e.dispatch_key, e.dispatch_started_ms, e.dispatch_attempts, e.tm_change_id,"
    " t.approval_status, t.status, s.create_ms, s.normal_s + s.additional_s,"
    " s.control_by, s.control_why, s.max_failures, s.max_failure_ratio,"
    " s.failures_acknowledged, e.hold_why, e.grp, e.data, s.concurrency"
    " FROM elements e JOIN schedules s ON s.id = e.schedule"
    " LEFT JOIN change_tickets t ON t.change_id = e.tm_change_id"
)
IDS = "(SELECT CAST(value AS BIGINT) FROM json_each(?))"  # a JSON array of ids as a parameter


def lock_schedules(tx: Tx, elements: list[int], skip: bool = False) -> set[int] | None:
    """`Tx.lock_schedules` of these elements' schedules."""
    return tx.lock_schedules(
        f"SELECT schedule FROM elements WHERE id IN {IDS}", (json.dumps(elements),), skip
    )


class BatchCache:
    """What the snapshots of one due batch share, read once per transaction: the batch's rows
    (`load`), the freeze, each schedule's failure counts, and the availability book's entries
    on the batch's elements (one query for the whole batch, not one per element)."""

    def __init__(self, tx: Tx, elements: list[int] | None = None) -> None:
        self.tx = tx
        self.rows: dict[int, tuple] | None = None  # element -> its snapshot row, once loaded
        # a schedule's status as this batch changed it (its first dispatch): newer than `rows`
        self.schedule_status: dict[int, S] = {}
        self._freeze: gates.Freeze | None | bool = False
        self._failures: dict[int, gates.Failures] = {}
        self._elements = elements
        self._book: dict[str, list[tuple[int, int, str]]] | None = None
        self.rules: list[gates.Gate] | None = None  # the batch's gates, and from them:
        self.grace_ms = 0
        self.calendar: gates.CalendarGate | None = None
        self._taken: dict[int, int] = {}  # schedule -> `taken`, from the store
        self._sent: dict[int, int] = {}  # schedule -> its late elements this batch sent

    def taken(self, schedule: int, duration_ms: int) -> int:
        """How much of the schedule's concurrency an element sent late now would share during
        its run [now, now + duration): its elements dispatched (or in flight) whose slot
        overlaps it, and those not dispatched yet whose planned slot overlaps it (they go on
        their slot, this batch's included, whatever the late one does), other than the late
        ones (held, their slot begun over LATE_AFTER_MS ago: they compete for what is left);
        read once per batch; plus the late ones this batch decided to send (`sent`)."""
        if schedule not in self._taken:
            now = self.tx.now_ms
            (count,) = self.tx.execute(
                "SELECT count(*) FROM elements WHERE schedule = ? AND start_ms < ?"
                " AND finish_ms > ? AND (status = ? OR (status IN (?, ?)"
                " AND (dispatch_started_ms IS NOT NULL"
                " OR (status = ? AND (hold_why IS NULL OR start_ms >= ?)))))",
                (
                    schedule,
                    now + duration_ms,
                    now,
                    E.TRIGGERED.value,
                    E.SCHEDULED.value,
                    E.SCHEDULED_IMMEDIATE.value,
                    E.SCHEDULED.value,
                    now - LATE_AFTER_MS,
                ),
                # this batch's sends, still deferred, read as not dispatched: an on-time one
                # is counted by its planned slot, a late one by `sent` (none was sent yet: the
                # first late one of the schedule reads this)
                flush=False,
            ).fetchone()
            self._taken[schedule] = count
        return self._taken[schedule] + self._sent.get(schedule, 0)

    def load(self, schedules: set[int] | None) -> None:
        """The batch's snapshot rows in one query, not one round trip per element. On
        PostgreSQL only those of `schedules` (the ones this transaction locked), each element
        row locked too (FOR UPDATE, skipping one another transaction holds)."""
        sql, params = f"{SNAPSHOT} WHERE e.id IN {IDS}", [json.dumps(self._elements)]
        if schedules is not None:
            sql += f" AND e.schedule IN {IDS} ORDER BY e.id FOR UPDATE OF e SKIP LOCKED"
            params.append(json.dumps(sorted(schedules)))
        self.rows = {row[0]: row for row in self.tx.execute(sql, params, flush=False)}

    def sent(self, schedule: int) -> None:
        self._sent[schedule] = self._sent.get(schedule, 0) + 1

    def unavailable(self, names: list[str]) -> tuple[tuple[int, int, str], ...]:
        """The book's entries on these elements (one and those it requires) ending after now."""
        if self._elements is None:  # one element alone (resume, why)
            return tuple(book.entries_on(self.tx.conn, names, self.tx.now_ms))
        if self._book is None:
            wanted: set[str] = set()
            for name, data in self.tx.execute(
                f"SELECT name, data FROM elements WHERE id IN {IDS}",
                (json.dumps(self._elements),),
            ):
                wanted.update(book.needs(name, _data(data)))
            self._book = book.entries_by_element(self.tx.conn, sorted(wanted), self.tx.now_ms)
        if len(names) == 1:
            return tuple(self._book.get(names[0], ()))
        return tuple(sorted(e for n in names for e in self._book.get(n, ())))

    def freeze(self) -> gates.Freeze | None:
        if self._freeze is False:
            self._freeze = load_freeze(self.tx.conn)
        return self._freeze  # type: ignore[return-value]

    def failures(
        self, schedule: int, max_failures: int | None, max_ratio: float | None, acked: int
    ) -> gates.Failures:
        if max_failures is None and max_ratio is None:
            return gates.Failures()
        if schedule not in self._failures:
            failed, total = self.tx.execute(
                f"SELECT count(*) FILTER (WHERE status IN ({_marks(FAILED_RUN)})),"
                f" count(*) FILTER (WHERE status NOT IN ({_marks(NOT_COUNTED)}))"
                " FROM elements WHERE schedule = ?",
                (*FAILED_RUN, *NOT_COUNTED, schedule),
            ).fetchone()
            self._failures[schedule] = gates.Failures(
                failed - acked, total, max_failures, max_ratio
            )
        return self._failures[schedule]


def load_freeze(conn: Any) -> gates.Freeze | None:
    row = conn.execute(
        'SELECT since_ms, "by", why, until_ms FROM "freeze" WHERE id = 1 AND active = 1'
    ).fetchone()
    return None if row is None else gates.Freeze(row[0], row[1], row[2], row[3])


def set_freeze(
    tx: Tx, active: bool, by: str, why: str, until_ms: int | None = None
) -> gates.Freeze | None:
    """Turn the global freeze on (again: a new reason or end replaces the old) or off. Off
    releases every element it held: they go now, or into their next free slot."""
    tx.exclusive()  # every element the freeze holds, whatever its schedule
    was = load_freeze(tx.conn)
    if not active and was is None:
        return None
    tx.execute(
        'UPDATE "freeze" SET active = ?, since_ms = ?, until_ms = ?, "by" = ?, why = ? WHERE id = 1',
        (int(active), tx.now_ms, until_ms if active else None, by, why),
    )
    value: dict[str, Any] = {
        "status": "Frozen" if active else "Thawed",
        "control-by": by,
        "control-why": why,
        "control-time": lifecycle.format_time(tx.now_ms),
    }
    if active and until_ms is not None:
        value["until-time"] = lifecycle.format_time(until_ms)
    tx.freeze_event(value)
    released = 0 if active else release_holds(tx, "freeze")
    tx.note(
        "freeze.on" if active else "freeze.off",
        by=by,
        why=why,
        until=lifecycle.format_time(until_ms) if active else None,
        released=released if not active else None,
    )
    return load_freeze(tx.conn)


def expire_freeze(tx: Tx) -> None:
    """A freeze whose --until has passed is turned off (its event and log line), once."""
    freeze = load_freeze(tx.conn)
    if freeze is not None and freeze.until_ms is not None and tx.now_ms >= freeze.until_ms:
        set_freeze(tx, False, "cmsod", f"the freeze by {freeze.by} reached its end")


def load_snapshot(
    tx: Tx, element: int, cache: BatchCache | None = None
) -> tuple[gates.Snapshot, Loaded] | None:
    """The element as the gates see it, and what applying their answer needs; None when it
    no longer waits for a dispatch (ended, or its intent already committed)."""
    cache = cache or BatchCache(tx)
    if cache.rows is not None:  # loaded with the batch's
        row = cache.rows.get(element)
    else:
        row = tx.execute(
            f"{SNAPSHOT} WHERE e.id = ?",
            (element,),
            flush=False,  # (deferred writes are other elements' rows; schedules are not deferred)
        ).fetchone()
    if row is None:
        return None
    (
        _,
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
        duration_s,
        stopped_by,
        stopped_why,
        max_failures,
        max_ratio,
        acked,
        held_why,
        grp,
        data,
        concurrency,
    ) = row
    if E(status) not in ELEMENT_DISPATCHABLE or started is not None:
        return None
    element_data = _data(data)
    snapshot = gates.Snapshot(
        now_ms=tx.now_ms,
        schedule_id=schedule_id,
        name=name,
        status=E(status),
        start_ms=start_ms,
        created_ms=created_ms,
        duration_ms=duration_s * 1000,
        change_id=change_id,
        ticket_state=ticketing.state_text(ticket_approval, ticket_status),
        schedule_status=cache.schedule_status.get(schedule) or S(schedule_status),
        stopped_by=stopped_by,
        stopped_why=stopped_why,
        freeze=cache.freeze(),
        failures=cache.failures(schedule, max_failures, max_ratio, acked),
        unavailable=cache.unavailable(book.needs(name, element_data)),
        held_why=held_why,
        data=element_data,
    )
    return snapshot, Loaded(element, schedule, grp, request, key, attempts, data, concurrency)


def snapshot_now(conn: Any, name: str, schedule_id: str, now_ms: int) -> gates.Snapshot | None:
    """The snapshot the gates would see of this element now (`why` asks them again), read on
    a read connection; None when it does not wait for a dispatch."""
    row = conn.execute(
        "SELECT e.id FROM elements e JOIN schedules s ON s.id = e.schedule"
        " WHERE s.schedule_id = ? AND e.name = ?",
        (schedule_id, name),
    ).fetchone()
    if row is None:
        return None
    loaded = load_snapshot(Tx(conn, now_ms, "", ""), row[0])  # SELECTs only
    return None if loaded is None else loaded[0]


def _data(data: bytes | None) -> dict[str, str]:
    return msgspec.json.decode(data, type=dict[str, str]) if data else {}


def begin_dispatch(
    tx: Tx, element: int, rules: list[gates.Gate], cache: BatchCache | None = None
) -> DispatchJob | None:
    """Ask the gates; on `Go` commit the intent to dispatch before the orchestrator is called
    (at most once); on `Hold` keep it waiting, or carry it over to its next free slot when
    the hold outlasts its slot; on `End` end it (an element held past its slot is carried
    over instead of `Past due` while its windows have a free slot)."""
    cache = cache or BatchCache(tx)
    loaded = load_snapshot(tx, element, cache)
    if loaded is None:
        return None
    snap, row = loaded
    gate, answer = gates.decide(snap, rules)
    if cache is not None and cache.rules is rules:  # found once per due batch
        grace_ms, calendar = cache.grace_ms, cache.calendar
    else:
        grace_ms, calendar = _grace_and_calendar(rules)
    if isinstance(answer, gates.Hold):
        outlasts = answer.until_ms is not None and answer.until_ms > snap.due_ms + grace_ms
        if snap.start_ms is not None and outlasts:
            why = f"held by {gate}: {answer.why}"
            carry_over(tx, snap, row, answer.until_ms or tx.now_ms, why, calendar)
        else:
            hold(tx, snap, row, gate, answer)
        return None
    if snap.schedule_status is S.SCHEDULED:  # the first dispatch attempt, even if then refused
        tx.schedule_to(row.schedule, snap.schedule_id, S.SCHEDULED, S.NOTIFICATIONS_INITIATED)
        cache.schedule_status[row.schedule] = S.NOTIFICATIONS_INITIATED
    if isinstance(answer, gates.End):
        if answer.status is E.PAST_DUE and snap.held_why is not None:
            carry_over(tx, snap, row, tx.now_ms, snap.held_why, calendar)
            return None
        tx.element_to(
            element,
            row.schedule,
            snap.schedule_id,
            snap.name,
            snap.status,
            answer.status,
            status_message=answer.why,
        )
        return None
    late = (
        snap.held_why is not None
        and snap.start_ms is not None
        and tx.now_ms > snap.start_ms + LATE_AFTER_MS
    )
    if late:  # released after its slot began: only if its schedule's concurrency has room
        # for its whole run from now, next to what runs and what is planned meanwhile
        if cache.taken(row.schedule, snap.duration_ms) >= (row.concurrency or 1):
            carry_over(tx, snap, row, tx.now_ms, snap.held_why or "", calendar)
            return None
        # its slot is now: later carry-overs are placed after it, not on top of it
        tx.element_set(
            element,
            row.schedule,
            snap.schedule_id,
            snap.name,
            snap.status,
            start_ms=tx.now_ms,
            finish_ms=tx.now_ms + snap.duration_ms,
        )
        cache.sent(row.schedule)
    key = row.key or str(uuid.uuid4())
    tx.defer(
        "UPDATE elements SET dispatch_key = ?, dispatch_started_ms = ?,"
        " dispatch_attempts = dispatch_attempts + 1, owner = ? WHERE id = ?",
        (key, tx.now_ms, tx.owner, element),
    )
    return DispatchJob(
        element,
        row.schedule,
        snap.schedule_id,
        snap.name,
        row.request,
        key,
        row.attempts + 1,
        snap.due_ms,
        snap.due_ms + grace_ms,
    )


def _grace_and_calendar(rules: list[gates.Gate]) -> tuple[int, gates.CalendarGate | None]:
    grace_ms = next((r.grace_ms for r in rules if isinstance(r, gates.MisfireGate)), 0)
    return grace_ms, next((r for r in rules if isinstance(r, gates.CalendarGate)), None)


def hold(tx: Tx, snap: gates.Snapshot, row: Loaded, gate: str, answer: gates.Hold) -> None:
    """Keep it waiting until `answer.until_ms` (or until released); say so once per hold (a
    CM event on the element, its status unchanged, and a log line)."""
    until = INDEFINITE_MS if answer.until_ms is None else answer.until_ms
    why = f"held by {gate}: {answer.why}"
    tx.defer(
        "UPDATE elements SET hold_ms = ?, hold_gate = ?, hold_why = ? WHERE id = ?",
        (until, gate, why, row.element),
    )
    if why != snap.held_why:
        value: dict[str, Any] = {
            "vnf-name": snap.name,
            "status": snap.status.value,
            "hold-gate": gate,
            "hold-why": why,
        }
        if answer.until_ms is not None:
            value["hold-until-time"] = lifecycle.format_time(answer.until_ms)
        tx.edit(
            row.schedule,
            snap.schedule_id,
            cmevents.element_edit(snap.schedule_id, snap.name, value),
        )
        tx.note("element.held", schedule_id=snap.schedule_id, vnf=snap.name, gate=gate, why=why)


def release_holds(tx: Tx, gate: str, schedule: int | None = None) -> int:
    """The holds of one gate are over (a resume, the freeze turned off): look again now."""
    where, params = ("", ()) if schedule is None else (" AND schedule = ?", (schedule,))
    return tx.execute(
        "UPDATE elements SET hold_ms = NULL WHERE hold_gate = ? AND hold_ms IS NOT NULL"
        f" AND dispatch_started_ms IS NULL{where}",
        (gate, *params),
    ).rowcount


def carry_over(
    tx: Tx,
    snap: gates.Snapshot,
    row: Loaded,
    not_before_ms: int,
    held_why: str,
    calendar: gates.CalendarGate | None = None,
) -> int | None:
    """Re-place an element held past its slot into the next free slot of its windows (same
    grid, same concurrency limit, clear of the book, of the freeze calendars' periods and of
    other schedules' work), keeping
    its approval and ticket (whose planned dates follow). With no slot left it is `Past due`,
    the message naming what held it. Returns the new start."""
    tx.exclusive()  # the slot is found around other schedules' work
    windows = tx.execute(
        "SELECT start_ms, end_ms FROM windows WHERE grp = ?", (row.grp,)
    ).fetchall()
    origin_ms, concurrency = tx.execute(
        "SELECT min(w.start_ms), max(s.concurrency) FROM windows w JOIN cm_groups g ON g.id = w.grp"
        " JOIN schedules s ON s.id = g.schedule WHERE g.schedule = ?",
        (row.schedule,),
    ).fetchone()
    # Each grid slot counts the elements whose slot overlaps it (one sent late, off the grid,
    # at its release, takes each grid slot it overlaps).
    step = snap.duration_ms
    taken: dict[int, int] = {}
    for start, finish in tx.execute(
        "SELECT start_ms, finish_ms FROM elements WHERE schedule = ? AND id != ?"
        " AND status IN (?, ?) AND start_ms IS NOT NULL",
        (row.schedule, row.element, E.SCHEDULED.value, E.TRIGGERED.value),
    ):
        if origin_ms is None or step <= 0:
            taken[start] = taken.get(start, 0) + 1
            continue
        end = max(finish if finish is not None else start + step, start + 1)
        for k in range((start - origin_ms) // step, -(-(end - origin_ms) // step)):
            slot = origin_ms + k * step
            taken[slot] = taken.get(slot, 0) + 1
    others = book.other_work(tx.conn, row.schedule, [snap.name]).get(snap.name, [])
    blocked = book.blocked_spans(
        tx.conn, snap.name, snap.data, not_before_ms, others, windows, calendar
    )
    slot = gates.next_free_slot(
        [(a, b) for a, b in windows],
        origin_ms,
        snap.duration_ms,
        not_before_ms,
        blocked,
        taken,
        concurrency or 1,
    )
    if slot is None:
        tx.element_to(
            row.element,
            row.schedule,
            snap.schedule_id,
            snap.name,
            snap.status,
            E.PAST_DUE,
            status_message=(f"not dispatched: {held_why}; no free slot left in its change windows")[
                :4000
            ],
        )
        return None
    tx.element_set(
        row.element,
        row.schedule,
        snap.schedule_id,
        snap.name,
        snap.status,
        start_ms=slot,
        finish_ms=slot + snap.duration_ms,
        hold_ms=None,
        hold_why=held_why,
        status_message=f"carried over to {lifecycle.format_time(slot)}: {held_why}"[:4000],
    )
    tx.note(
        "element.carried_over",
        schedule_id=snap.schedule_id,
        vnf=snap.name,
        start=lifecycle.format_time(slot),
        why=held_why,
    )
    if snap.change_id is not None:
        replan_ticket(tx, snap.change_id)
    return slot


def replan_ticket(tx: Tx, change_id: str) -> None:
    """The ticket's planned dates follow its elements' slots; TM is told through the outbox."""
    start, end, user_id = tx.execute(
        "SELECT min(e.start_ms), max(e.finish_ms), max(s.user_id) FROM elements e"
        " JOIN schedules s ON s.id = e.schedule WHERE e.tm_change_id = ?",
        (change_id,),
    ).fetchone()
    changed = tx.execute(
        "UPDATE change_tickets SET planned_start_ms = ?, planned_end_ms = ?, updated_ms = ?"
        " WHERE change_id = ? AND closure_code IS NULL"
        " AND (planned_start_ms != ? OR planned_end_ms != ?)",
        (start, end, tx.now_ms, change_id, start, end),
    ).rowcount
    if changed:
        tx.queue_ticket_op(
            change_id,
            ticketing.Op.RESCHEDULE,
            ticketing.reschedule_body(change_id, user_id, start, end),
        )


def next_due_ms(conn: Any) -> int | None:
    """When the next element falls due (immediates: at once; one whose ticket could not be
    checked: when it is held to), None when nothing waits."""
    (due,) = conn.execute(
        "SELECT min(CASE WHEN coalesce(hold_ms, 0) > coalesce(start_ms, 0) THEN hold_ms"
        " ELSE coalesce(start_ms, 0) END) FROM elements"
        " WHERE status IN (?, ?) AND dispatch_started_ms IS NULL",
        (E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value),
    ).fetchone()
    return due


class Due(msgspec.Struct, array_like=True, frozen=True):
    """An element due now: what the dispatcher asks the peers about before the gates run."""

    element: int
    change_id: str | None
    name: str
    data: bytes | None


def due_elements(
    conn: Any, until_ms: int, limit: int, skipping: list[int] | None = None
) -> list[Due]:
    """Elements to dispatch now, earliest first: immediates, then those starting by `until_ms`;
    each with its change ticket, name and data (the alarm gate's queries). `skipping`: the
    schedules another daemon is claiming (`Claim.skipped`), left out."""
    skip = f" AND schedule NOT IN {IDS}" if skipping else ""
    return [
        Due(element, change_id, name, data)
        for (element, change_id, name, data) in conn.execute(
            "SELECT id, tm_change_id, name, data FROM elements WHERE dispatch_started_ms IS NULL"
            f" AND (status = ? OR (status = ? AND start_ms <= ?)) AND coalesce(hold_ms, 0) <= ?{skip}"
            " ORDER BY coalesce(start_ms, 0), id LIMIT ?",
            (E.SCHEDULED_IMMEDIATE.value, E.SCHEDULED.value, until_ms, until_ms)
            + ((json.dumps(skipping),) if skipping else ())
            + (limit,),
        )
    ]


class Claim(msgspec.Struct):
    jobs: list[DispatchJob]  # the intents committed: to send now
    # PostgreSQL: the batch's schedules another daemon holds (claiming them at this moment):
    # skipped, theirs to do
    skipped: list[int]


@shared_lock
def begin_dispatches(tx: Tx, elements: list[int], rules: list[gates.Gate]) -> Claim:
    """`begin_dispatch` for a whole due batch in one transaction (one commit, not hundreds).
    On PostgreSQL the batch is claimed: its schedules' rows and its elements are locked,
    skipping those another daemon holds (`lock_schedules`), so daemons claiming at once take
    disjoint work and each schedule's concurrency and failure counts stay exact."""
    expire_freeze(tx)
    locked = lock_schedules(tx, elements, skip=True)
    cache = BatchCache(tx, elements)
    cache.load(locked)
    cache.rules = rules
    cache.grace_ms, cache.calendar = _grace_and_calendar(rules)
    jobs = [begin_dispatch(tx, e, rules, cache) for e in elements]
    skipped: list[int] = []
    if locked is not None and cache.rows is not None and len(cache.rows) < len(elements):
        # (a query only when some were not loaded: skipped, or gone meanwhile)
        skipped = [
            schedule
            for (schedule,) in tx.execute(
                f"SELECT DISTINCT schedule FROM elements WHERE id IN {IDS} ORDER BY schedule",
                (json.dumps(elements),),
            )
            if schedule not in locked
        ]
    return Claim([job for job in jobs if job is not None], skipped)


@shared_lock
def record_dispatch_results(tx: Tx, results: list[tuple[int, str | None, str | None]]) -> int:
    """The orchestrator's answers for a batch: (element, SO request id or None, failure
    message or None). An element no longer waiting for its answer is left alone, and so is
    one no longer this daemon's (another took it over and reconciled it: fleet.py)."""
    recorded = 0
    lock_schedules(tx, [element for element, _, _ in results])
    rows = {  # one read for the batch (an answer changes only its own element's row)
        row[0]: row[1:]
        for row in tx.execute(
            "SELECT e.id, e.schedule, s.schedule_id, e.name, e.status, e.owner FROM elements e"
            " JOIN schedules s ON s.id = e.schedule"
            f" WHERE e.id IN {IDS} AND e.dispatch_started_ms IS NOT NULL",
            (json.dumps([element for element, _, _ in results]),),
        )
    }
    for element, request_id, failure in results:
        found = rows.get(element)
        if found is None or E(found[3]) not in ELEMENT_DISPATCHABLE:
            continue
        if found[4] != tx.owner:
            tx.note("element.not_ours", vnf=found[2], owner=found[4])
            continue
        row = found[:4]
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
        f"UPDATE elements SET dispatch_started_ms = NULL, owner = NULL WHERE id IN {IDS}"
        " AND status IN (?, ?)"
        " AND owner IS NOT DISTINCT FROM ?",
        (json.dumps(elements), E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value, tx.owner),
    )


def reconcile_dispatches(
    tx: Tx, resend: bool, gone: list[str] | None = None, me: str | None = None
) -> list[str]:
    """After a restart, or taking over the work of daemons `gone` (fleet.py): elements whose
    dispatch intent was committed (by them, or by no daemon known) but whose answer was not.
    The orchestrator may or may not have the work flow; never send it blindly again."""
    caught = tx.execute(
        "SELECT e.id, e.schedule, s.schedule_id, e.name, e.status, e.dispatch_key FROM elements e"
        " JOIN schedules s ON s.id = e.schedule"
        " WHERE e.status IN (?, ?) AND e.dispatch_started_ms IS NOT NULL"
        " AND (e.owner IS NULL OR e.owner IN (SELECT value FROM json_each(?)))",
        (E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value, json.dumps(gone or [])),
    ).fetchall()
    names = []
    for element, schedule, schedule_id, name, status, key in caught:
        names.append(name)
        if resend:  # the orchestrator de-duplicates on X-TransactionId: same key again
            tx.execute(
                "UPDATE elements SET dispatch_started_ms = NULL, owner = NULL WHERE id = ?",
                (element,),
            )
            continue
        tx.execute("UPDATE elements SET owner = ? WHERE id = ?", (me, element))
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


def in_flight(conn: Any, owner: str | None = None) -> list[tuple[int, str, str, str, int | None]]:
    """(element, schedule id, name, SO request id, dispatch time) of every triggered element
    this daemon polls (the one that dispatched it, or took it over)."""
    return conn.execute(
        "SELECT e.id, s.schedule_id, e.name, e.so_request_id, e.dispatch_ms FROM elements e"
        " JOIN schedules s ON s.id = e.schedule WHERE e.status = ?"
        " AND e.owner IS NOT DISTINCT FROM ? ORDER BY e.dispatch_ms",
        (E.TRIGGERED.value, owner),
    ).fetchall()


@shared_lock
def record_polls(tx: Tx, outcomes: list[tuple[int, PollOutcome]]) -> list[E | None]:
    """`record_poll` for a whole round of polls in one transaction, their rows read in one
    query; each element's new status (None: still running)."""
    elements = [element for element, _ in outcomes]
    lock_schedules(tx, elements)
    rows = {
        row[0]: row[1:]
        for row in tx.execute(
            "SELECT e.id, e.schedule, s.schedule_id, e.name, e.status, e.owner FROM elements e"
            f" JOIN schedules s ON s.id = e.schedule WHERE e.id IN {IDS}",
            (json.dumps(elements),),
        )
    }
    return [record_poll(tx, element, rows.get(element), outcome) for element, outcome in outcomes]


def record_poll(tx: Tx, element: int, row: tuple | None, outcome: PollOutcome) -> E | None:
    if row is None or row[3] != E.TRIGGERED:
        return None
    if row[4] != tx.owner:  # another daemon took it over: its poll now, not ours
        tx.note("element.not_ours", vnf=row[2], owner=row[4])
        return None
    schedule, schedule_id, name, _, _ = row
    if outcome.status is None:
        tx.defer(
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
        status_message=end_message(outcome),
    )
    return outcome.status


def end_message(outcome: PollOutcome) -> str | None:
    """The status message of a work flow that ended (the MESSAGE an operator reads): the
    orchestrator's, replacing a note of how the element got there (re-planned, carried over,
    which its events keep); one that ended badly says the orchestrator's state too."""
    if outcome.status is E.COMPLETED:
        return outcome.so_message[:4000] if outcome.so_message else None
    reason = (
        f"{outcome.so_status}: {outcome.so_message}" if outcome.so_message else outcome.so_status
    )
    return f"orchestrator: {reason}"[:4000]
