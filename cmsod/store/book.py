"""The availability book: times an element cannot be worked on (blackouts, outside tickets)
and the work of other schedules, as the optimizer's Busy input."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from cmsod import lifecycle
from cmsod.calendars import merged_attributes
from cmsod.errors import ControlError
from cmsod.model import ElementStatus as E
from cmsod.optimize.problem import Busy, blocking, requirements
from cmsod.store.store import Tx

if TYPE_CHECKING:
    from cmsod.gates import CalendarGate

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
        f" WHERE o.name IN ({mine}) AND o.schedule IS DISTINCT FROM ? AND o.status IN (?, ?, ?)",
        (*params, schedule, *ACTIVE_WORK),
    ):
        begin = start if start is not None else dispatched
        if begin is None:
            continue  # an immediate element not yet dispatched: no time to avoid yet
        end = finish if finish is not None else begin + duration_s * 1000
        busy.setdefault(name, []).append(Busy(begin, end, f"schedule {other_id}"))
    return busy


def needs(name: str, element_data: dict[str, str]) -> list[str]:
    """The element and those it requires: whose unavailability holds it."""
    if "requires" not in element_data:
        return [name]
    return list(requirements([name], {name: element_data}))


def blocked_spans(
    conn: Any,
    name: str,
    element_data: dict[str, str],
    after_ms: int,
    others: Iterable[Busy],
    windows: Sequence[tuple[int, int]],
    calendar: CalendarGate | None,
) -> list[tuple[int, int]]:
    """Where an element placed again (carried over, or replanned at approval) cannot go: the
    book's entries on it and those it requires from `after_ms`, other schedules' work on it
    (`others`, from other_work), and the freeze calendars' periods denying it until the end
    of its windows."""
    blocked = [(a, b) for a, b, _ in entries_on(conn, needs(name, element_data), after_ms)]
    blocked += [(b.start_ms, b.end_ms) for b in others]
    if calendar is not None and calendar.calendars and windows:
        attributes = merged_attributes(name, element_data, calendar.inventory)
        until_ms = max(b for _, b in windows)
        blocked += [
            (a, b) for a, b, _ in calendar.calendars.denied(name, attributes, after_ms, until_ms)
        ]
    return blocked


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
        "SELECT nextval(pg_get_serial_sequence('availability', 'id'))"  # the identity's
        if tx.postgres
        else "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'availability'), 0) + 1"
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


def entries_on(conn: Any, names: list[str], after_ms: int) -> list[tuple[int, int, str]]:
    """The book's entries on these elements that end after `after_ms`: (start, end, what)."""
    marks = ", ".join("?" * len(names))
    return conn.execute(
        "SELECT start_ms, end_ms, kind || ' ' || ref FROM availability"
        f" WHERE element IN ({marks}) AND end_ms > ? ORDER BY start_ms",
        (*names, after_ms),
    ).fetchall()


def entries_by_element(
    conn: Any, names: list[str], after_ms: int
) -> dict[str, list[tuple[int, int, str]]]:
    """`entries_on` for many elements in one query: each one's entries, by start."""
    found: dict[str, list[tuple[int, int, str]]] = {}
    if not names:
        return found
    for element, start, end, what in conn.execute(
        "SELECT element, start_ms, end_ms, kind || ' ' || ref FROM availability"
        " WHERE element IN (SELECT value FROM json_each(?)) AND end_ms > ?"
        " ORDER BY start_ms",
        (json.dumps(names), after_ms),
    ):
        found.setdefault(element, []).append((start, end, what))
    return found


def merge_busy(*sources: dict[str, list[Busy]]) -> dict[str, list[Busy]]:
    merged: dict[str, list[Busy]] = {}
    for source in sources:
        for name, spans in source.items():
            merged.setdefault(name, []).extend(spans)
    return merged
