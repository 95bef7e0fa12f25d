"""Read-only queries: CMSO's schedule view, the paged list, the scheduleDetails search.

The search builds its WHERE clause from a fixed table of filters; values are always bound as
parameters (CMSO concatenated them into the SQL: bug 3).
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from collections.abc import Generator
from typing import Any

from cmsod.errors import InvalidParameter, RequestError
from cmsod.explain import Block, Facts
from cmsod.gates import Freeze
from cmsod.lifecycle import format_time, parse_time_ms
from cmsod.model import APPROVAL_DOMAIN, APPROVALS_REQUIRED, ElementStatus
from cmsod.store.book import ACTIVE_WORK
from cmsod.store.schedules import plan_fingerprint
from cmsod.wire.control import DETAIL_FILTERS, DETAIL_PAGING


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


SCHEDULE_COLUMNS = (
    "s.id, s.schedule_id, s.domain, s.user_id, s.status, s.create_ms, s.optimizer_status,"
    " s.optimizer_message, s.optimizer_ms, s.optimizer_return_ms, s.delete_ms, s.schedule_info"
)


def _schedule_view(conn: sqlite3.Connection, row: tuple, with_info: bool = True) -> dict[str, Any]:
    (
        schedule,
        schedule_id,
        domain,
        user_id,
        status,
        create_ms,
        opt_status,
        opt_message,
        opt_ms,
        opt_return_ms,
        delete_ms,
        info,
    ) = row
    view = {
        "scheduleId": schedule_id,  # CMSO never serialised it (bug 18); we do
        "scheduleName": schedule_id,  # CMSO forces the name to the id
        "domain": domain,
        "userId": user_id,
        "status": status,
        "createDateTime": format_time(create_ms),
        "optimizerDateTime": format_time(opt_ms),
        "optimizerStatus": opt_status,
        "optimizerMessage": opt_message,
        "optimizerReturnDateTime": format_time(opt_return_ms),
        "optimizerTransactionId": schedule_id if opt_ms is not None else None,
        "deleteDateTime": format_time(delete_ms),
        "scheduleInfo": bytes(info).decode() if with_info else None,
        "domainData": [
            {"name": n, "value": v}
            for n, v in conn.execute(
                "SELECT name, value FROM domain_data WHERE schedule = ? ORDER BY rowid", (schedule,)
            )
        ],
        "scheduleApprovals": [
            _clean(
                {
                    "approvalDateTime": format_time(ms),
                    "status": st,
                    "userId": u,
                    "approvalType": t,
                    "caller": caller,  # who sent it (peer credentials); userId is what it said
                    "planFingerprint": plan,  # the plan it approved (or rejected)
                }
            )
            for u, t, st, ms, caller, plan in conn.execute(
                "SELECT user_id, approval_type, status, approval_ms, caller, plan FROM approvals"
                " WHERE schedule = ? ORDER BY approval_ms",
                (schedule,),
            )
        ],
    }
    return _clean(view)


ELEMENT_COLUMNS = (
    "e.name, e.status, e.start_ms, e.finish_ms, e.tm_change_id, e.tm_status, e.tm_approval_status,"
    " e.dispatch_ms, e.completed_ms, e.so_request_id, e.so_status, e.so_message, e.so_ms,"
    " e.status_message"
)


# The element view's keys, in ELEMENT_COLUMNS order; those at _TIME_KEYS are times (ms).
_ELEMENT_KEYS = (
    "vnfName",
    "status",
    "startTime",
    "finishTime",
    "tmChangeId",
    "tmStatus",
    "tmApprovalStatus",
    "dispatchTime",
    "executionCompletedTime",
    "msoRequestId",
    "msoStatus",
    "msoMessage",
    "msoTime",
    "statusMessage",
)
_TIME_KEYS = frozenset({2, 3, 7, 8, 12})


# Elements share their slots' times: each distinct one is formatted once, not per row (a
# third of a 100,000-row search's time went into strftime).
_slot_time = functools.lru_cache(maxsize=4096)(format_time)


def _element_view(row: tuple) -> dict[str, Any]:
    """One pass over the row, leaving out what is not set (a search builds 100,000 of these)."""
    view = {}
    for i, key in enumerate(_ELEMENT_KEYS):
        value = row[i]
        if value is not None:
            view[key] = _slot_time(value) if i in _TIME_KEYS else value
    return view


def get_schedule(
    conn: sqlite3.Connection, schedule_id: str, max_elements: int | None = None
) -> dict[str, Any]:
    """The whole view: the schedule, its groups and every element in them. Past
    `max_elements` elements, only the head (`schedule_head`: `elements` their count), so
    that a caller answering in one body can refuse it without a second read."""
    view = schedule_head(conn, schedule_id)
    if max_elements is not None and view["elements"] > max_elements:
        return view
    by_group = {g["groupId"]: g["changeManagementSchedules"] for g in view["groups"]}
    for item in schedule_elements(conn, schedule_id):
        by_group[item.pop("groupId")].append(item)
    return view


def schedule_head(conn: sqlite3.Connection, schedule_id: str) -> dict[str, Any]:
    """The view without its elements: each group's `changeManagementSchedules` empty, and
    `elements`: how many there are."""
    row = conn.execute(
        f"SELECT {SCHEDULE_COLUMNS} FROM schedules s WHERE s.schedule_id = ?", (schedule_id,)
    ).fetchone()
    if row is None:
        raise RequestError(404, "SCHEDULE_NOT_FOUND", APPROVAL_DOMAIN, schedule_id)
    view = _schedule_view(conn, row)
    (
        normal_s,
        additional_s,
        concurrency,
        policy_id,
        elements,
        action,
        by,
        why,
        control_ms,
        max_failures,
        max_ratio,
    ) = conn.execute(
        "SELECT normal_s, additional_s, concurrency, policy_id,"
        " (SELECT count(*) FROM elements WHERE schedule = ?), control_action, control_by,"
        " control_why, control_ms, max_failures, max_failure_ratio FROM schedules WHERE id = ?",
        (row[0], row[0]),
    ).fetchone()
    if action is not None:  # who last paused, halted, resumed or aborted it, when and why
        view["control"] = {
            "action": action,
            "by": by,
            "reason": why,
            "time": format_time(control_ms),
        }
    # the plan as it stands (plans.fingerprint): what `approve --plan` names
    fingerprint = plan_fingerprint(conn, row[0], schedule_id)
    if fingerprint is not None:
        view["planFingerprint"] = fingerprint
    if max_failures is not None or max_ratio is not None:
        view["failureThreshold"] = _clean(
            {"maxFailures": max_failures, "maxFailureRatio": max_ratio}
        )
    groups = []
    for grp, group_id, start, finish, last in conn.execute(
        "SELECT id, group_id, start_ms, finish_ms, last_instance_ms FROM cm_groups"
        " WHERE schedule = ? ORDER BY id",
        (row[0],),
    ).fetchall():
        groups.append(
            _clean(
                {
                    "groupId": group_id,
                    "startTime": format_time(start),
                    "finishTime": format_time(finish),
                    "lastInstanceStartTime": format_time(last),
                    "normalDurationInSecs": normal_s,
                    "additionalDurationInSecs": additional_s,
                    "concurrencyLimit": concurrency,
                    "policyId": policy_id,
                    "changeWindows": [
                        {"startTime": format_time(s), "endTime": format_time(e)}
                        for s, e in conn.execute(
                            "SELECT start_ms, end_ms FROM windows WHERE grp = ? ORDER BY start_ms",
                            (grp,),
                        )
                    ],
                    "changeManagementSchedules": [],
                }
            )
        )
    view["groups"] = groups
    view["elements"] = elements
    return view


def schedule_stream(
    conn: sqlite3.Connection, schedule_id: str
) -> Generator[dict[str, Any], None, None]:
    """`schedule_head`, then each of `schedule_elements`: the whole view from one snapshot."""
    yield schedule_head(conn, schedule_id)
    yield from schedule_elements(conn, schedule_id)


def schedule_elements(
    conn: sqlite3.Connection, schedule_id: str
) -> Generator[dict[str, Any], None, None]:
    """Every element of the schedule with its stored request and its `groupId`, group by group,
    read from the cursor as they are taken."""
    for element_row in conn.execute(
        f"SELECT {ELEMENT_COLUMNS}, e.request, g.group_id, e.hold_why, e.hold_ms FROM elements e"
        " JOIN cm_groups g ON g.id = e.grp JOIN schedules s ON s.id = e.schedule"
        " WHERE s.schedule_id = ? ORDER BY e.grp, e.id",
        (schedule_id,),
    ):
        item = _element_view(element_row)
        item["request"] = bytes(element_row[14]).decode()
        item["groupId"] = element_row[15]
        if element_row[17] is not None and element_row[1] in ("Scheduled", "Scheduled Immediate"):
            item["heldBy"] = element_row[16]  # held now: by which gate and why
        yield item


# (ASCII digits: str.isdigit takes "²", which int() refuses; at most 18: they fit a BIGINT)
_CURSOR = re.compile(r"(-?[0-9]{1,18})~(.*)", re.DOTALL)


def _cursor(ms: int, key: str) -> str:
    """Where a page ended, as a key position (`<ms>~<id>`): the next page starts after it
    whatever becomes of that row meanwhile (a ticket's planned start follows its slots).
    "~" is in no schedule id (lifecycle.SCHEDULE_ID), so a schedule id never reads as a
    cursor; a change id is the ticket system's, any text, so `_position` looks for an id
    first and reads a cursor only in what matches none."""
    return f"{ms}~{key}"


def _position(conn: sqlite3.Connection, after: str, sql: str) -> tuple[int, str]:
    """Where a page starts: after the row whose id is `after` (where that row is now, found
    by `sql`), else at a cursor (`_cursor`)."""
    row = conn.execute(sql, (after,)).fetchone()
    if row is not None:
        return row[0], row[1]
    cursor = _CURSOR.fullmatch(after)
    if cursor is None:
        raise InvalidParameter(
            "after", f"{after!r} is neither a cursor (a page's `next`) nor a known id"
        )
    return int(cursor[1]), cursor[2]


def list_schedules(
    conn: sqlite3.Connection, statuses: list[str] | None, limit: int, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Schedules newest first, `limit` at a time, from `after` (the previous page's `next`)."""
    where: list[str] = []
    params: list[Any] = []
    if after is not None:
        where.append("(s.create_ms, s.schedule_id) < (?, ?)")
        params.extend(
            _position(
                conn, after, "SELECT create_ms, schedule_id FROM schedules WHERE schedule_id = ?"
            )
        )
    if statuses:
        where.append(f"s.status IN ({', '.join('?' * len(statuses))})")
        params.extend(statuses)
    rows = conn.execute(
        "SELECT s.schedule_id, s.status, s.user_id, s.create_ms,"
        " (SELECT count(*) FROM elements e WHERE e.schedule = s.id)"
        f" FROM schedules s WHERE {' AND '.join(where) or '1 = 1'}"
        " ORDER BY s.create_ms DESC, s.schedule_id DESC LIMIT ?",
        [*params, limit + 1],
    ).fetchall()
    page = [
        {
            "scheduleId": sid,
            "status": st,
            "userId": u,
            "createDateTime": format_time(ms),
            "elements": n,
        }
        for sid, st, u, ms, n in rows[:limit]
    ]
    return page, (_cursor(rows[limit - 1][3], rows[limit - 1][0]) if len(rows) > limit else None)


# -- scheduleDetails (reference/cmso.md 2.7, every filter working) --------------------------

_TEXT, _DATE = "text", "date"
FILTERS: dict[str, tuple[str, str]] = {
    "request.scheduleId": ("s.schedule_id", _TEXT),
    "request.scheduleName": ("s.schedule_id", _TEXT),
    "request.userId": ("s.user_id", _TEXT),
    "request.status": ("s.status", _TEXT),
    "request.optimizerStatus": ("s.optimizer_status", _TEXT),
    "request.createDateTime": ("s.create_ms", _DATE),
    "request.concurrencyLimit": ("CAST(s.concurrency AS TEXT)", _TEXT),
    "request.approvalUserId": ("a.user_id", _TEXT),
    "request.approvalStatus": ("a.status", _TEXT),
    "request.approvalType": ("a.approval_type", _TEXT),
    "WorkflowName": ("d.value", _TEXT),
    "groupId": ("g.group_id", _TEXT),
    "vnfName": ("e.name", _TEXT),
    "vnfId": ("e.name", _TEXT),
    "vnfStatus": ("e.status", _TEXT),
    "tmChangeId": ("e.tm_change_id", _TEXT),
    "startTime": ("e.start_ms", _DATE),
    "finishTime": ("e.finish_ms", _DATE),
    "lastInstanceTime": ("g.last_instance_ms", _DATE),
}
PAGING = set(DETAIL_PAGING)
assert tuple(FILTERS) == DETAIL_FILTERS, "the filters of the wire format and of the search"


def _condition(name: str, values: list[str]) -> tuple[str, list[Any]]:
    column, kind = FILTERS[name]
    parts: list[str] = []
    params: list[Any] = []
    if kind == _DATE:
        for value in values:
            low_text, _, high_text = value.partition(",")
            try:
                low = parse_time_ms(low_text)
                high = parse_time_ms(high_text) if high_text else None
            except ValueError:
                raise RequestError(400, "INVALID_DATE_FILTER", name, value) from None
            if high is None:
                parts.append(f"{column} >= ?")
                params.append(low)
            else:
                parts.append(f"{column} BETWEEN ? AND ?")
                params.extend([low, high])
    else:
        exact = [v for v in values if "%" not in v]
        if exact:
            parts.append(f"{column} IN ({', '.join('?' * len(exact))})")
            params.extend(exact)
        for pattern in (v for v in values if "%" in v):
            parts.append(f"{column} LIKE ?")
            params.append(pattern)
    sql = "(" + " OR ".join(parts) + ")"
    if name.startswith("request.approval"):
        sql = f"EXISTS (SELECT 1 FROM approvals a WHERE a.schedule = s.id AND {sql})"
    elif name == "WorkflowName":
        sql = f"EXISTS (SELECT 1 FROM domain_data d WHERE d.schedule = s.id AND d.name = 'WorkflowName' AND {sql})"
    return sql, params


def details(
    conn: sqlite3.Connection, filters: dict[str, list[str]]
) -> Generator[dict[str, Any], None, None]:
    """The matching elements, each with its schedule's view, read from the cursor as they are
    taken (a caller holds as many as it takes, not all). Ordered by schedule id, so only the
    current schedule's view is kept; `maxSchedules` stops after that many schedules."""
    for name in filters:
        if name not in FILTERS and name not in PAGING:
            raise RequestError(
                400,
                "UNDEFINED_FILTER_ATTRIBUTE",
                name,
                detail="the filters are: " + ", ".join(DETAIL_FILTERS + DETAIL_PAGING),
            )
    where: list[str] = []
    params: list[Any] = []
    for name, values in filters.items():
        if name in FILTERS and values:
            sql, more = _condition(name, values)
            where.append(sql)
            params.extend(more)
    if filters.get("lastScheduleId"):
        where.append("s.schedule_id > ?")
        params.append(filters["lastScheduleId"][0])
    max_schedules = None
    if filters.get("maxSchedules"):
        value = filters["maxSchedules"][0]
        if not value.isdigit() or int(value) < 1:
            raise RequestError(400, "INVALID_ATTRIBUTE", "maxSchedules", value)
        max_schedules = int(value)
    # Not the schedule's stored request (schedule_info, the size of all its elements): it is
    # not shown here, and read for every row it made a 10,000-row search take seconds and
    # hundreds of MB (the sort carried it).
    schedule_columns = SCHEDULE_COLUMNS.replace("s.schedule_info", "NULL")
    rows = conn.execute(
        f"SELECT {ELEMENT_COLUMNS}, g.group_id, g.last_instance_ms, s.policy_id, {schedule_columns}"
        " FROM elements e JOIN cm_groups g ON g.id = e.grp JOIN schedules s ON s.id = e.schedule"
        f" WHERE {' AND '.join(where) or '1 = 1'} ORDER BY s.schedule_id, e.id",
        params,
    )
    schedules = 0
    parent_id, parent = None, {}
    for row in rows:
        schedule_row = row[17:]
        if schedule_row[1] != parent_id:
            if max_schedules is not None and schedules >= max_schedules:
                break
            schedules += 1
            parent_id, parent = schedule_row[1], _schedule_view(conn, schedule_row, False)
        item = _element_view(row)
        item.update(
            _clean(
                {
                    "groupId": row[14],
                    "lastInstanceStartTime": format_time(row[15]),
                    "policyId": row[16],
                    "scheduleRequest": parent,
                }
            )
        )
        yield item
    if not schedules:
        raise RequestError(404, "SCHEDULE_NOT_FOUND", APPROVAL_DOMAIN, "")


def snapshot(conn: Any) -> str:
    """PostgreSQL: the snapshot this read sees, as `xmin:xmax:running xids`. The same text
    twice means no transaction of the server (of any daemon) committed or aborted in
    between (one that starts writing takes an xid at or above xmax, which the text leaves
    out; only its end moves xmax or takes it out of the running list): a view read after
    the first is still what a read now would see. One short query, no row that every write
    would have to update."""
    return conn.execute("SELECT CAST(pg_current_snapshot() AS TEXT)").fetchone()[0]


def status_counts(conn: sqlite3.Connection) -> dict[str, Any]:
    return {
        "schedules": dict(
            conn.execute("SELECT status, count(*) FROM schedules GROUP BY status").fetchall()
        ),
        "elements": dict(
            conn.execute(
                "SELECT status, count(*) FROM elements WHERE status IN"
                " ('Scheduled', 'Scheduled Immediate', 'Triggered') GROUP BY status"
            ).fetchall()
        ),
        "eventsPending": conn.execute(
            "SELECT count(*) FROM events WHERE sent_ms IS NULL AND refused IS NULL"
        ).fetchone()[0],
        "eventsRefused": conn.execute(
            "SELECT count(*) FROM events WHERE refused IS NOT NULL"
        ).fetchone()[0],
    }


# -- change tickets -----------------------------------------------------------------------------

_TICKET_COLUMNS = (
    "t.change_id, s.schedule_id, t.group_id, t.vnfs, t.approval_status, t.status,"
    " t.closure_code, t.planned_start_ms, t.planned_end_ms, t.actual_start_ms, t.actual_end_ms,"
    " t.created_ms, t.updated_ms,"
    " (SELECT count(*) FROM ticket_ops o WHERE o.change_id = t.change_id AND o.sent_ms IS NULL)"
)
_PLANNED_START = 7  # where t.planned_start_ms is in _TICKET_COLUMNS (a page's cursor)


def _ticket_view(row: tuple) -> dict[str, Any]:
    (change_id, schedule_id, group_id, vnfs, approval, status, closure, *times, pending) = row
    planned_start, planned_end, actual_start, actual_end, created, updated = times
    return _clean(
        {
            "changeId": change_id,
            "scheduleId": schedule_id,
            "groupId": group_id,
            "vnfs": json.loads(vnfs),
            "approvalStatus": approval,
            "status": status,
            "closureCode": closure,
            "plannedStartDate": format_time(planned_start),
            "plannedEndDate": format_time(planned_end),
            "actualStartDate": format_time(actual_start),
            "actualEndDate": format_time(actual_end),
            "createDateTime": format_time(created),
            "updateDateTime": format_time(updated),
            "pendingOperations": pending,
        }
    )


def list_tickets(
    conn: sqlite3.Connection, schedule_id: str | None, limit: int, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Change tickets by planned start, `limit` at a time, of one schedule or all, from
    `after` (the previous page's `next`)."""
    where: list[str] = []
    params: list[Any] = []
    if after is not None:
        where.append("(t.planned_start_ms, t.change_id) > (?, ?)")
        params.extend(
            _position(
                conn,
                after,
                "SELECT planned_start_ms, change_id FROM change_tickets WHERE change_id = ?",
            )
        )
    if schedule_id is not None:
        where.append("s.schedule_id = ?")
        params.append(schedule_id)
    rows = conn.execute(
        f"SELECT {_TICKET_COLUMNS} FROM change_tickets t JOIN schedules s ON s.id = t.schedule"
        f" WHERE {' AND '.join(where) or '1 = 1'} ORDER BY t.planned_start_ms, t.change_id LIMIT ?",
        [*params, limit + 1],
    ).fetchall()
    page = [_ticket_view(r) for r in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return page, (None if last is None else _cursor(last[_PLANNED_START], last[0]))


def get_ticket(conn: sqlite3.Connection, change_id: str) -> dict[str, Any] | None:
    """One ticket with its elements and every operation sent or waiting to be sent to TM."""
    row = conn.execute(
        f"SELECT {_TICKET_COLUMNS} FROM change_tickets t JOIN schedules s ON s.id = t.schedule"
        " WHERE t.change_id = ?",
        (change_id,),
    ).fetchone()
    if row is None:
        return None
    ticket = _ticket_view(row)
    ticket["elements"] = [
        {"vnfName": name, "status": status}
        for name, status in conn.execute(
            "SELECT name, status FROM elements WHERE tm_change_id = ? ORDER BY id", (change_id,)
        )
    ]
    ticket["operations"] = [
        _clean(
            {
                "operation": op,
                "body": json.loads(body),
                "createDateTime": format_time(created),
                "sentDateTime": format_time(sent),
                "attempts": attempts,
                "nextAttemptDateTime": format_time(due) if sent is None else None,
                "lastError": error,
            }
        )
        for op, body, created, sent, attempts, due, error in conn.execute(
            "SELECT op, body, created_ms, sent_ms, attempts, due_ms, last_error FROM ticket_ops"
            " WHERE change_id = ? ORDER BY id",
            (change_id,),
        )
    ]
    return ticket


# -- the global freeze --------------------------------------------------------------------------


def freeze_view(freeze: Freeze | None) -> dict[str, Any] | None:
    if freeze is None:
        return None
    return _clean(
        {
            "status": "Frozen",
            "by": freeze.by,
            "reason": freeze.why,
            "since": format_time(freeze.since_ms),
            "until": format_time(freeze.until_ms),
        }
    )


def freeze_in_force(conn: sqlite3.Connection, now_ms: int) -> dict[str, Any] | None:
    """The freeze as `status` shows it: None when off or past its --until."""
    row = conn.execute(
        'SELECT since_ms, "by", why, until_ms FROM "freeze" WHERE id = 1 AND active = 1'
    ).fetchone()
    if row is None or (row[3] is not None and now_ms >= row[3]):
        return None
    return freeze_view(Freeze(*row))


# -- why (cmsod.explain reads this snapshot) -------------------------------------------------


def why_facts(
    conn: sqlite3.Connection, element: str, schedule_id: str | None, now_ms: int
) -> Facts:
    """One element's facts: in `schedule_id`, or in the newest schedule that has it."""
    rows = conn.execute(
        "SELECT s.id, s.schedule_id FROM elements e JOIN schedules s ON s.id = e.schedule"
        " WHERE e.name = ? ORDER BY s.create_ms DESC, s.id DESC",
        (element,),
    ).fetchall()
    chosen = [r for r in rows if schedule_id is None or r[1] == schedule_id]
    if not chosen:
        where = f" in schedule {schedule_id}" if schedule_id else " in any schedule"
        raise RequestError(404, "ELEMENT_NOT_FOUND", element, where)
    schedule, sid = chosen[0]
    (
        schedule_status,
        immediate,
        concurrency,
        optimizer_message,
        delete_ms,
        status,
        start,
        finish,
        hold,
        started,
        dispatched,
        completed,
        message,
        so_id,
        so_status,
        so_message,
        so_ms,
        change_id,
        ticket_approval,
        ticket_status,
        hold_gate,
        hold_why,
    ) = conn.execute(
        "SELECT s.status, s.immediate, s.concurrency, s.optimizer_message, s.delete_ms,"
        " e.status, e.start_ms, e.finish_ms, e.hold_ms, e.dispatch_started_ms, e.dispatch_ms,"
        " e.completed_ms, e.status_message, e.so_request_id, e.so_status, e.so_message,"
        " e.so_ms, e.tm_change_id, t.approval_status, t.status, e.hold_gate, e.hold_why"
        " FROM elements e JOIN schedules s ON s.id = e.schedule"
        " LEFT JOIN change_tickets t ON t.change_id = e.tm_change_id"
        " WHERE e.schedule = ? AND e.name = ?",
        (schedule, element),
    ).fetchone()
    # the ticket book over its slot, or from now on when it has none (yet)
    low, high = (start, finish) if start is not None and finish is not None else (now_ms, 2**62)
    blocks = [
        Block(f"{kind} {ref}", s, e, reason)
        for kind, ref, s, e, reason in conn.execute(
            "SELECT kind, ref, start_ms, end_ms, reason FROM availability"
            " WHERE element = ? AND start_ms < ? AND end_ms > ? ORDER BY start_ms",
            (element, high, low),
        )
    ]
    other_work = [
        Block(f"schedule {other}", s, e)
        for other, s, e in conn.execute(
            "SELECT s.schedule_id, o.start_ms, o.finish_ms FROM elements o"
            " JOIN schedules s ON s.id = o.schedule WHERE o.name = ? AND o.schedule != ?"
            " AND o.status IN (?, ?, ?) AND o.start_ms < ? AND o.finish_ms > ?",
            (element, schedule, *ACTIVE_WORK, high, low),
        )
    ]
    (running,) = conn.execute(
        "SELECT count(*) FROM elements WHERE schedule = ? AND status = ?",
        (schedule, ElementStatus.TRIGGERED.value),
    ).fetchone()
    return Facts(
        element=element,
        schedule_id=sid,
        schedule_status=schedule_status,
        status=status,
        immediate=bool(immediate),
        concurrency=concurrency,
        start_ms=start,
        finish_ms=finish,
        hold_ms=hold,
        hold_gate=hold_gate,
        hold_why=hold_why,
        dispatch_started_ms=started,
        dispatch_ms=dispatched,
        completed_ms=completed,
        status_message=message,
        so_request_id=so_id,
        so_status=so_status,
        so_message=so_message,
        so_ms=so_ms,
        change_id=change_id,
        ticket_state=None
        if change_id is None
        else f"{ticket_approval or ''}|{ticket_status or ''}",
        approvals=conn.execute(
            "SELECT user_id, status, approval_ms FROM approvals WHERE schedule = ?"
            " ORDER BY approval_ms",
            (schedule,),
        ).fetchall(),
        approvals_needed=APPROVALS_REQUIRED,
        optimizer_message=optimizer_message,
        delete_ms=delete_ms,
        running=running,
        blocks=blocks,
        other_work=other_work,
        other_schedules=[r[1] for r in rows if r[1] != sid],
    )
