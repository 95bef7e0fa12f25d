"""`cmsoctl`: drive a running cmsod through its control socket.

Exit codes: 0 ok; 1 the daemon answered with an error; 2 usage; 3 `status`: the daemon
answered but is not healthy (degraded: a peer failing, an actor stalled); 69 daemon unreachable
(or, for `watch`, it ended the stream); 73 cannot write the --svg file; 75 timed out; 76 protocol
error (a reply that does not decode); 77 permission denied; 141 the reader of stdout went away.
With --json, stdout holds exactly one JSON document (the reply's parameters, or the error);
`watch --json` prints one JSON document per line (JSON lines), one per CM event.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from cmsod import gantt
from cmsod.model import ELEMENT_FINAL, SCHEDULE_FINAL, ScheduleStatus
from cmsod.model import ElementStatus as E
from cmsod.wire.control import DETAIL_FILTERS, DETAIL_PAGING
from cmsod.wire.events import EVENT_TYPES

EX_OK, EX_ERROR, EX_USAGE, EX_UNHEALTHY = 0, 1, 2, 3
EX_UNAVAILABLE, EX_CANTCREAT, EX_TEMPFAIL, EX_PROTOCOL, EX_NOPERM = 69, 73, 75, 76, 77
EX_SIGPIPE = 141  # 128 + SIGPIPE, as the shell reports a writer whose reader went away
DEFAULT_SOCKET = "/run/cmsod/control.sock"
MAX_REPLY = 256 * 1024 * 1024
WAITING = frozenset({E.PENDING_APPROVAL, E.SCHEDULED})  # elements with a slot still to come


class Reply(msgspec.Struct):
    parameters: dict[str, Any] = {}
    error: str | None = None
    continues: bool = False


class CtlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def connect(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            return _connect(sock, path)
        except BlockingIOError:  # the daemon's accept queue is full for now: wait a little
            sock.close()
            if time.monotonic() > deadline:
                raise CtlError(
                    EX_TEMPFAIL, f"cmsod at {path} is not accepting connections in time"
                ) from None
            time.sleep(0.01)


def _connect(sock: socket.socket, path: str) -> socket.socket:
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise CtlError(
            EX_UNAVAILABLE,
            f"no cmsod socket at {path} (is the daemon running? --socket PATH or CMSOD_SOCKET"
            " names another, e.g. var/control.sock of `make run`)",
        ) from None
    except PermissionError:
        raise CtlError(EX_NOPERM, f"permission denied on {path}") from None
    except ConnectionRefusedError:
        raise CtlError(EX_UNAVAILABLE, f"cmsod is not accepting connections on {path}") from None
    except TimeoutError:
        raise CtlError(EX_TEMPFAIL, f"timed out connecting to {path}") from None
    except OSError as exc:
        code = EX_UNAVAILABLE if exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED) else EX_ERROR
        if exc.errno == errno.EAGAIN:
            raise BlockingIOError from None
        raise CtlError(code, f"cannot connect to {path}: {exc.strerror}") from None
    return sock


def call(path: str, method: str, parameters: dict[str, Any], timeout: float) -> Reply:
    return next(replies(path, method, parameters, timeout, more=False))


def replies(
    path: str, method: str, parameters: dict[str, Any], timeout: float, more: bool = True
) -> Iterator[Reply]:
    """The daemon's replies to one call, as they come: with `more`, until one does not say it
    continues (or is an error); `timeout` is for each reply."""
    sock = connect(path, timeout)
    message: dict[str, Any] = {"method": method, "parameters": parameters}
    if more:
        message["more"] = True
    buffer = bytearray()
    with sock:
        try:
            sock.sendall(msgspec.json.encode(message) + b"\0")
        except OSError as exc:
            raise CtlError(EX_UNAVAILABLE, f"connection to cmsod failed: {exc.strerror}") from None
        while True:
            try:
                while b"\0" not in buffer:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise CtlError(
                            EX_PROTOCOL, "the daemon closed the connection without a reply"
                        )
                    buffer += chunk
                    if len(buffer) > MAX_REPLY:
                        raise CtlError(EX_PROTOCOL, "reply too large")
            except TimeoutError:
                raise CtlError(EX_TEMPFAIL, f"no reply from cmsod within {timeout:g} s") from None
            except OSError as exc:
                raise CtlError(
                    EX_UNAVAILABLE, f"connection to cmsod failed: {exc.strerror}"
                ) from None
            end = buffer.index(b"\0")
            try:
                reply = msgspec.json.decode(bytes(buffer[:end]), type=Reply)
            except msgspec.DecodeError as exc:
                raise CtlError(EX_PROTOCOL, f"malformed reply: {exc}") from None
            del buffer[: end + 1]
            yield reply
            if reply.error or not reply.continues:
                return


def whole_schedule(stream: Iterator[Reply]) -> Reply:
    """A streamed Schedules.Get put back together: the schedule, then its elements."""
    head = next(stream)
    if head.error:
        return head
    schedule = head.parameters["schedule"]
    groups = {g["groupId"]: g["changeManagementSchedules"] for g in schedule["groups"]}
    for reply in stream:
        if reply.error:
            return reply
        for element in reply.parameters["elements"]:
            groups[element.pop("groupId")].append(element)
    return Reply({"schedule": schedule})


def print_rows(
    stream: Iterator[Reply], key: str, as_json: bool, as_table: Callable[[list[Any], bool], str]
) -> Reply | None:
    """Print the rows of a streamed reply as they come: one JSON document `{key: [...]}`, or
    a table (its header once). The error reply that ended it, if one did."""
    first = True
    for reply in stream:
        if reply.error:
            if as_json and not first:
                print("]}")
            return reply
        rows = reply.parameters[key]
        if as_json:
            out = ",".join(msgspec.json.encode(row).decode() for row in rows)
            print(("{" + f'"{key}":[' if first else ",") + out, end="")
        elif rows or first:
            print(as_table(rows, first))
        first = False
    if as_json:
        print("]}")
    return None


# -- human output -----------------------------------------------------------------------------


def when(text: str) -> str:
    """Any time a reply carries (CMSO's optimizer format, NCMP's event time, ours) in the one
    format human output uses: 2026-12-01T08:01:00Z, in UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(rows: list[list[Any]], header: list[str], with_header: bool = True) -> str:
    """Columns as wide as their widest cell (of these rows: a streamed table is printed a
    chunk at a time, under the first chunk's header)."""
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in cells[0 if with_header else 1 :]
    )


def progress(elements: list[dict[str, Any]], schedule_status: str) -> list[str]:
    """Counts by status, done of total, the next slot and the expected end of a schedule's
    elements (as its view has them)."""
    counts = Counter(e["status"] for e in elements)
    done = sum(n for status, n in counts.items() if status in ELEMENT_FINAL)
    if schedule_status in SCHEDULE_FINAL and done < len(elements):
        return [
            "elements   " + ", ".join(f"{n} {status}" for status, n in counts.most_common()),
            f"progress   {done} of {len(elements)} ended; the schedule is {schedule_status}:"
            " the others will not run",
        ]
    waiting = [e["startTime"] for e in elements if e["status"] in WAITING and e.get("startTime")]
    open_ends = [
        e["finishTime"]
        for e in elements
        if e["status"] not in ELEMENT_FINAL and e.get("finishTime")
    ]
    ends = [e["executionCompletedTime"] for e in elements if e.get("executionCompletedTime")]
    line = f"progress   {done} of {len(elements)} done"
    if waiting:
        line += f"; next slot {min(waiting)}"
    if open_ends:
        line += f"; expected end {max(open_ends)}"
    elif ends and done == len(elements):
        line += f"; ended {max(ends)}"
    return [
        "elements   "
        + (", ".join(f"{n} {status}" for status, n in counts.most_common()) or "none"),
        line,
    ]


def element_message(e: dict[str, Any]) -> str | None:
    """Why it ended or what it waits on: the gate holding it, our own message, else the
    orchestrator's."""
    return e.get("heldBy") or e.get("statusMessage") or e.get("msoMessage")


def show_schedule(s: dict[str, Any], statuses: list[str] | None = None) -> str:
    lines = [
        f"schedule   {s['scheduleId']}",
        f"status     {s['status']}",
        f"user       {s.get('userId', '')}    created {s.get('createDateTime', '')}",
    ]
    if "optimizerStatus" in s:
        lines.append(f"optimizer  {s['optimizerStatus']}: {s.get('optimizerMessage', '')}")
    if "planFingerprint" in s:  # what `approve --plan` names
        lines.append(f"plan       {s['planFingerprint']}")
    if "control" in s:  # who last paused, halted, resumed or aborted it
        c = s["control"]
        lines.append(f"{c['action']:<10} by {c['by']} at {c['time']}: {c['reason'] or '-'}")
    if "failureThreshold" in s:
        t = s["failureThreshold"]
        lines.append(
            "threshold  "
            + ", ".join(
                f"{k} {v}"
                for k, v in (
                    ("max_failures", t.get("maxFailures")),
                    ("max_failure_ratio", t.get("maxFailureRatio")),
                )
                if v is not None
            )
        )
    for a in s.get("scheduleApprovals", []):
        lines.append(
            f"approval   {a['status']} by {a['userId']} ({a['approvalType']})"
            f" at {a['approvalDateTime']}"
            + (f", sent by {a['caller']}" if a.get("caller") else "")
            + (f", plan {a['planFingerprint']}" if a.get("planFingerprint") else "")
        )
    elements = [
        {**e, "groupId": g["groupId"]}
        for g in s.get("groups", [])
        for e in g.get("changeManagementSchedules", [])
    ]
    lines += progress(elements, s["status"])
    rows = [
        [
            e["groupId"],
            e["vnfName"],
            e["status"],
            e.get("startTime"),
            e.get("finishTime"),
            e.get("dispatchTime"),
            e.get("executionCompletedTime"),
            e.get("tmChangeId"),
            e.get("msoRequestId"),
            element_message(e),
        ]
        for e in elements
        if not statuses or e["status"] in statuses
    ]
    lines.append("")
    lines.append(
        table(
            rows,
            [
                "GROUP",
                "VNF",
                "STATUS",
                "PLANNED START",
                "PLANNED END",
                "ACTUAL START",
                "ACTUAL END",
                "TICKET",
                "SO REQUEST",
                "MESSAGE",
            ],
        )
    )
    return "\n".join(lines)


def show_plan(response: dict[str, Any], fingerprint: str | None = None) -> str:
    solution = response["schedules"][0]
    lines = [
        table(
            [
                [e["elementId"], e["groupId"], when(e["startTime"]), when(e["endTime"])]
                for e in solution["scheduledElements"]
            ],
            ["ELEMENT", "GROUP", "START", "END"],
        )
    ]
    if solution["unScheduledElements"]:
        lines.append("")
        lines.append(
            table(
                [
                    [
                        e["elementId"],
                        e["groupId"],
                        e["notScheduledReaons"][0],
                        e["notScheduledMessages"][0],
                    ]
                    for e in solution["unScheduledElements"]
                ],
                ["NOT SCHEDULED", "GROUP", "REASON", "MESSAGE"],
            )
        )
    lines.append(f"{response['status']}: {response['summary']}")
    if fingerprint:
        lines.append(f"plan {fingerprint} (the same plan, once stored, has this fingerprint)")
    return "\n".join(lines)


MOVED_ROWS = 20  # a resume shows this many of the elements it moved; `show` has them all


def show_resume(p: dict[str, Any]) -> str:
    """A summary, not the schedule's rows (10,000 of them would flood a terminal): its status,
    counts by element status, the plan and what moved; `show` has every element."""
    s = p["schedule"]
    elements = [e for g in s.get("groups", []) for e in g.get("changeManagementSchedules", [])]
    lines = [f"{p['scheduleId']}: {p['status']}"]
    if "planFingerprint" in s:
        lines.append(f"plan       {s['planFingerprint']}")
    lines += progress(elements, s["status"])
    moved = p.get("moved", [])
    if not moved:
        lines.append(  # (one whose slot began within the misfire grace is the dispatcher's)
            "moved      none past the misfire grace; one whose slot began meanwhile goes now"
            f" or is carried over by the dispatcher (cmsoctl show {p['scheduleId']})"
        )
    else:
        past_due = sum(m["startTime"] is None for m in moved)
        lines.append(
            f"moved      {len(moved)} element{'s' if len(moved) != 1 else ''} whose slot passed"
            " while it was stopped"
            + (f" ({past_due} Past due: no free slot left)" if past_due else "")
        )
        lines.append("")
        lines.append(
            table(
                [
                    [m["vnfName"], m["oldStartTime"], m["startTime"] or "none: Past due"]
                    for m in moved[:MOVED_ROWS]
                ],
                ["VNF", "WAS START", "START"],
            )
        )
        if len(moved) > MOVED_ROWS:
            lines.append(f"... and {len(moved) - MOVED_ROWS} more")
    lines.append(f"every element: cmsoctl show {p['scheduleId']}")
    return "\n".join(lines)


def show_approval(p: dict[str, Any]) -> str:
    """The status, the plan approved and, after --replan, what moved from the plan seen."""
    line = f"{p['scheduleId']}: {p['status']}"
    if p.get("planFingerprint"):
        line += f" (plan {p['planFingerprint']})"
    lines = [line]
    replanned = p.get("replanned")
    if replanned is not None:
        changes = replanned["changes"]
        lines.append(
            f"re-planned from {replanned.get('seenFingerprint') or 'no plan'}"
            f" to {p.get('planFingerprint') or 'no plan'}: {len(changes) or 'no'}"
            f" slot{'s' if len(changes) != 1 else ''} changed"
        )
        if changes:
            lines.append("")
            lines.append(
                table(
                    [
                        [
                            c["vnfName"],
                            c.get("oldStartTime"),
                            c.get("oldFinishTime"),
                            c.get("startTime"),
                            c.get("finishTime"),
                        ]
                        for c in changes
                    ],
                    ["VNF", "WAS START", "WAS END", "START", "END"],
                )
            )
    return "\n".join(lines)


def show_why(p: dict[str, Any]) -> str:
    lines = [
        f"{p['element']} in schedule {p['scheduleId']}: {p['status']}"
        f" (schedule {p['scheduleStatus']}), at {p['currentTime']}"
    ]
    lines += [
        f"  {r['kind']:<16} {r['words']}"
        + (f"  [until {r['until']}]" if r.get("until") and r["until"] not in r["words"] else "")
        for r in p["reasons"]
    ]
    return "\n".join(lines)


def show_ticket(t: dict[str, Any]) -> str:
    lines = [
        f"ticket     {t['changeId']}  {t['approvalStatus']}|{t['status']}"
        + (f"  closed {t['closureCode']}" if t.get("closureCode") else ""),
        f"schedule   {t['scheduleId']} group {t['groupId']}",
        f"planned    {t['plannedStartDate']} .. {t['plannedEndDate']}",
    ]
    if t.get("actualStartDate"):
        lines.append(f"actual     {t['actualStartDate']} .. {t['actualEndDate']}")
    lines += ["", table([[e["vnfName"], e["status"]] for e in t["elements"]], ["VNF", "STATUS"])]
    lines += [
        "",
        table(
            [
                [
                    o["operation"],
                    o["createDateTime"],
                    o.get("sentDateTime") or f"waiting, next {o.get('nextAttemptDateTime')}",
                    o["attempts"],
                    o.get("lastError"),
                ]
                for o in t["operations"]
            ],
            ["OPERATION", "QUEUED", "SENT", "ATTEMPTS", "LAST ERROR"],
        ),
    ]
    return "\n".join(lines)


def details_table(rows: list[dict[str, Any]], header: bool) -> str:
    return table(
        [
            [
                d["scheduleRequest"]["scheduleId"],
                d.get("groupId"),
                d["vnfName"],
                d["status"],
                d.get("startTime"),
                d.get("finishTime"),
            ]
            for d in rows
        ],
        ["SCHEDULE", "GROUP", "VNF", "STATUS", "START", "FINISH"],
        header,
    )


def list_table(rows: list[dict[str, Any]], header: bool) -> str:
    return table(
        [
            [s["scheduleId"], s["status"], s["userId"], s["createDateTime"], s["elements"]]
            for s in rows
        ],
        ["SCHEDULE", "STATUS", "USER", "CREATED", "ELEMENTS"],
        header,
    )


# What the holder of each named lease (cmsod/store/fleet.py) does for all the daemons.
def daemon_state(d: dict[str, Any]) -> str:
    """Alive (its lease runs), or LAPSED; alive but silent for more than two heartbeats (one
    every lease/3) is probably dead (killed -9, cut off): how long, and when it is taken over."""
    expiry = _ms_time(d["leaseExpiryMs"])
    if not d["alive"]:
        return f"LAPSED, lease to {expiry}"
    interval_ms = (d["leaseExpiryMs"] - d["heartbeatMs"]) / 3  # the lease is renewed whole
    silent_ms = d.get("silentMs", 0)
    if silent_ms > 2 * interval_ms:
        return f"silent {silent_ms / 1000:.1f} s: taken over when its lease ends at {expiry}"
    return f"alive, lease to {expiry}"


LEASE_DUTIES = {"events": "publishes the CM events", "tickets": "sends the ticket operations"}


def human(command: str, p: dict[str, Any], args: argparse.Namespace | None = None) -> str:
    if command == "show":
        return show_schedule(p["schedule"], args.status if args else None)
    if command == "plan":
        return show_plan(p["optimizer"], p.get("planFingerprint"))
    if command == "approve":
        return show_approval(p)
    if command == "why":
        return show_why(p)
    if command == "metrics":
        return str(p["text"]).rstrip("\n")
    if command == "gantt":
        assert args is not None
        if args.svg:
            return f"wrote {args.svg}"
        return gantt.terminal(
            p["schedule"], args.width, args.tz, args.by, colour=sys.stdout.isatty()
        )
    if command == "list":
        out = list_table(p["schedules"], True)
        return out + (f"\n(more: --after {p['next']}, or --all)" if p.get("next") else "")
    if command == "details":
        return details_table(p["details"], True)
    if command == "freeze":
        return freeze_line(p["freeze"])
    if command == "resume":
        return show_resume(p)
    if command == "status":
        lines = [freeze_line(p.get("freeze"))] if p.get("freeze") else []
        lines += [
            "healthy    "
            + ("yes" if p["healthy"] else "NO, degraded: " + ", ".join(p.get("problems", []))),
            f"build      {p['buildInfo']}",
            f"time       {p['currentTime']}",
        ]
        # several daemons (PostgreSQL): one publishes the events, through its own sink
        publisher = next((d["id"] for d in p.get("daemons", []) if "events" in d["leases"]), None)
        for c in p["components"]:
            line = f"component  {c['name']}: {c['status']} ({c['url']})"
            if c["name"] == "Event Sink" and publisher not in (None, p.get("daemon")):
                line += f"; not used here: daemon {publisher} publishes (its status tells)"
            lines.append(line)
        lines += calendar_lines(p.get("calendars") or [])
        if p.get("alarms"):
            lines.append(alarms_line(p["alarms"]))
        counts = p.get("counts", {})
        lines.append(
            "schedules  "
            + (
                ", ".join(f"{k}: {v}" for k, v in sorted(counts.get("schedules", {}).items()))
                or "none"
            )
        )
        lines.append(
            "elements   "
            + (
                ", ".join(f"{k}: {v}" for k, v in sorted(counts.get("elements", {}).items()))
                or "none waiting or running"
            )
        )
        lines.append(f"events     {counts.get('eventsPending', 0)} pending")
        for d in p.get("daemons", []):
            duties = "".join(f"; {LEASE_DUTIES.get(name, 'holds ' + name)}" for name in d["leases"])
            lines.append(
                f"daemon     {d['id']}{' (this one)' if d['id'] == p.get('daemon') else ''}:"
                f" {daemon_state(d)}; {d['dispatching']} dispatching, {d['running']} running,"
                f" {d['planning']} planning{duties}"
            )
        lines.append("")
        lines.append(
            table(
                [
                    [
                        n,
                        a["heartbeatAgeS"],
                        a["done"],
                        a["errors"],
                        a["restarts"],
                        a.get("lastError"),
                    ]
                    for n, a in p["actors"].items()
                ],
                ["ACTOR", "HEARTBEAT AGE S", "DONE", "ERRORS", "RESTARTS", "LAST ERROR"],
            )
        )
        return "\n".join(lines)
    if command == "blackout":
        if "entries" in p:
            return table(
                [
                    [
                        e["id"],
                        e["kind"],
                        e["element"],
                        e["startTime"],
                        e["endTime"],
                        e["reason"],
                        e["createdBy"],
                    ]
                    for e in p["entries"]
                ],
                ["ID", "KIND", "ELEMENT", "FROM", "TO", "REASON", "BY"],
            )
        if "entry" in p:
            e = p["entry"]
            line = f"{e['id']}: {e['element']} unavailable {e['startTime']} .. {e['endTime']} ({e['reason']})"
            if p["touches"]:
                line += "\noverlaps the planned or running work of: " + ", ".join(p["touches"])
            return line
        return f"{p['id']} removed"
    if command == "tickets":
        out = table(
            [
                [
                    t["changeId"],
                    t["scheduleId"],
                    t["groupId"],
                    ",".join(t["vnfs"]),
                    f"{t['approvalStatus']}|{t['status']}",
                    t.get("closureCode"),
                    t["pendingOperations"] or None,
                ]
                for t in p["tickets"]
            ],
            ["TICKET", "SCHEDULE", "GROUP", "VNFS", "APPROVAL|STATUS", "CLOSURE", "PENDING OPS"],
        )
        return out + (f"\n(more: --after {p['next']})" if p.get("next") else "")
    if command == "ticket":
        return show_ticket(p["ticket"])
    if command == "reload":
        return "configuration reloaded" + (
            f": {', '.join(p['changed'])}" if p.get("changed") else " (nothing changed)"
        )
    if command == "abort":
        line = (
            f"{p['scheduleId']}: {p['status']}: {p['cancelled']} element"
            f"{'s' if p['cancelled'] != 1 else ''} cancelled, {p['running']} still running"
            " to their end"
        )
        return line + (f" (cmsoctl show {p['scheduleId']} follows them)" if p["running"] else "")
    return f"{p['scheduleId']}: {p['status']}"


def calendar_lines(periods: list[dict[str, Any]]) -> list[str]:
    """The freeze calendars' periods in force now, then the next one."""
    now = [p for p in periods if p["inForce"]]
    upcoming = [p for p in periods if not p["inForce"]][:1]
    lines = [
        f"CALENDAR   in force until {p['to']}: {p['name']!r} ({p['source']}; {p['period']})"
        for p in now
    ]
    lines += [
        f"calendar   next {p['from']} .. {p['to']}: {p['name']!r} ({p['source']}; {p['period']})"
        for p in upcoming
    ]
    return lines or (["calendar   none in force or coming"] if periods == [] else [])


def alarms_line(a: dict[str, Any]) -> str:
    state = {None: "not asked yet", True: "answering", False: "FAILING"}[a.get("ok")]
    fail = "hold (fail closed)" if a["onError"] == "hold" else "go (fail open)"
    line = f"alarms     {a['url']}: {state}; when it cannot be asked: {fail}"
    if a.get("ok") is False and a.get("lastError"):
        line += f"; {a['lastError']}"
    return line


def _ms_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def freeze_line(f: dict[str, Any] | None) -> str:
    if not f:
        return "freeze     off"
    until = f" until {f['until']}" if f.get("until") else " until turned off"
    return f"FROZEN     since {f['since']}{until}, by {f['by']}: {f.get('reason') or '-'}"


# The flag of a command that carries a method's parameter, to name it in an error.
FLAGS = {
    "blackout": {"startTime": "--from", "endTime": "--to", "element": "ELEMENT"},
    "freeze": {"until": "--until"},
}


# What to do instead, said after a refusal of a command (CMSO's text is kept as it is):
# command, messageId -> the hint, formatted with the command's ID.
HINTS = {
    ("delete", "Scheduler.CANNOT_CANCEL_IN_PROGRESS"): (
        "to stop it, `cmsoctl abort {id}` cancels every element not yet dispatched"
        " and lets the running ones finish"
    ),
}


def describe_error(reply: Reply, command: str = "", schedule_id: str | None = None) -> str:
    """The daemon's refusal as a sentence, naming the flag (or argument) it is about, with
    what to do instead where there is something."""
    p = reply.parameters
    flags = FLAGS.get(command, {})
    if reply.error == "io.cmsod.RequestError":
        e = p.get("requestError", {})
        said = f"{p.get('status')} {e.get('messageId')}: {e.get('text')}"
        hint = HINTS.get((command, e.get("messageId")))
        if hint:
            said += f"\n{hint.format(id=schedule_id)}"
        field = (e.get("variables") or [None])[0]
        return f"{flags[field]}: {said}" if field in flags else said
    detail = p.get("message", "")
    if reply.error == "org.varlink.service.InvalidParameter" and p.get("parameter"):
        return f"{flags.get(p['parameter'], p['parameter'])}: {detail}"
    return f"{reply.error}: {detail}"


def watch(args: argparse.Namespace) -> int:
    """Print CM events as they happen until the daemon closes the stream (or Ctrl-C)."""
    parameters = {k: v for k, v in (("scheduleId", args.id), ("eventType", args.type)) if v}
    sock = connect(args.socket, args.timeout)
    sock.settimeout(None)  # events come when they come
    message = {"method": "io.cmsod.Events.Watch", "parameters": parameters, "more": True}
    buffer = bytearray()
    try:
        with sock:
            sock.sendall(msgspec.json.encode(message) + b"\0")
            while True:
                while b"\0" not in buffer:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        print(
                            "cmsoctl: the daemon ended the event stream (it stopped or restarted)",
                            file=sys.stderr,
                        )
                        return EX_UNAVAILABLE
                    buffer += chunk
                end = buffer.index(b"\0")
                reply = msgspec.json.decode(bytes(buffer[:end]), type=Reply)
                del buffer[: end + 1]
                if reply.error:
                    print(f"cmsoctl: {describe_error(reply)}", file=sys.stderr)
                    return EX_ERROR
                event = reply.parameters["event"]
                if args.json:
                    print(msgspec.json.encode(event).decode(), flush=True)
                else:
                    print(describe_event(event), flush=True)
    except KeyboardInterrupt:
        return EX_OK
    except ConnectionError as exc:
        print(f"cmsoctl: the event stream broke: {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    except msgspec.DecodeError as exc:
        raise CtlError(EX_PROTOCOL, f"malformed event: {exc}") from None


def describe_event(event: dict[str, Any]) -> str:
    patch = event["event"]["push-change-update"]["datastore-changes"]["ietf-yang-patch:yang-patch"]
    lines = []
    for edit in patch["edit"]:
        value: dict[str, Any] = next(iter(edit.get("value", {}).values()), [{}])[0]
        what = edit["target"].rsplit("/", 1)[-1] if "/vnf=" in edit["target"] else "schedule"
        lines.append(
            f"{when(event['eventTime'])}  {patch['patch-id']:<24} {what:<20} {value.get('status', edit['operation'])}"
        )
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------


def read_document(name: str) -> Any:
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise CtlError(EX_USAGE, f"cannot read {name}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise CtlError(EX_USAGE, f"{name} is not JSON: {exc}") from None


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    c = args.command
    if c == "submit":
        return "io.cmsod.Schedules.Create", {"schedule": read_document(args.file)}
    if c in ("show", "gantt"):
        return "io.cmsod.Schedules.Get", {"scheduleId": args.id}
    if c == "plan":
        return "io.cmsod.Schedules.Plan", {"schedule": read_document(args.file)}
    if c == "why":
        return "io.cmsod.Schedules.Why", {"element": args.element} | (
            {"scheduleId": args.schedule} if args.schedule else {}
        )
    if c == "list":
        p: dict[str, Any] = {"limit": args.limit}
        if args.status:
            p["status"] = args.status
        if args.after:
            p["after"] = args.after
        return "io.cmsod.Schedules.List", p
    if c == "details":
        filters: dict[str, list[str]] = {}
        for item in args.filter:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CtlError(EX_USAGE, f"--filter takes key=value, not {item!r}")
            filters.setdefault(key, []).append(value)
        return "io.cmsod.Schedules.Details", {"filters": filters}
    if c in ("approve", "reject"):
        p = {
            "scheduleId": args.id,
            "approval": {
                "approvalUserId": args.user,
                "approvalType": "Tier 2",
                "approvalStatus": "Accepted" if c == "approve" else "Rejected",
            },
        }
        if c == "approve":
            if args.plan:
                p["plan"] = args.plan
            if args.replan:
                p["replan"] = True
        return "io.cmsod.Schedules.Approve", p
    if c == "delete":
        return "io.cmsod.Schedules.Delete", {"scheduleId": args.id}
    if c in ("pause", "resume", "abort"):
        return f"io.cmsod.Schedules.{c.title()}", {
            "scheduleId": args.id,
            "reason": args.reason,
            "by": getpass.getuser(),
        }
    if c == "freeze":
        p = {"on": args.state == "on", "reason": args.reason, "by": getpass.getuser()}
        if args.until:
            if args.state != "on":
                raise CtlError(EX_USAGE, "--until goes with freeze on")
            p["until"] = args.until
        return "io.cmsod.Manager.Freeze", p
    if c == "blackout":
        if args.action == "add":
            return "io.cmsod.Availability.Add", {
                "element": args.element,
                "startTime": args.start,
                "endTime": args.end,
                "reason": args.reason,
                "by": getpass.getuser(),
            }
        if args.action == "list":
            return "io.cmsod.Availability.List", {"element": args.element} if args.element else {}
        return "io.cmsod.Availability.Remove", {"id": args.id}
    if c == "tickets":
        p = {"limit": args.limit}
        for key, value in (("scheduleId", args.schedule), ("after", args.after)):
            if value:
                p[key] = value
        return "io.cmsod.Tickets.List", p
    if c == "ticket":
        return "io.cmsod.Tickets.Get", {"id": args.id}
    if c == "status":
        return "io.cmsod.Manager.Status", {}
    if c == "reload":
        return "io.cmsod.Manager.Reload", {}
    if c == "metrics":
        return "io.cmsod.Manager.Metrics", {}
    raise CtlError(EX_USAGE, f"unknown command {c}")


def between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, refused in a sentence."""

    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return number


columns = between(10, 1000)
# rows a page (the daemon's bound: ListParameters.limit), said before the daemon is asked
page_size = between(1, 1000)


def fingerprint(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{12}", text):
        raise argparse.ArgumentTypeError(f"not a plan fingerprint (12 hex digits): {text!r}")
    return text


def time_zone(text: str) -> ZoneInfo:
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone {text!r}") from None


def add_paging(p: argparse.ArgumentParser, thing: str) -> None:
    """`--limit` and `--after` of a listing of `thing`s (schedules, tickets)."""
    p.add_argument(
        "--limit",
        type=page_size,
        default=100,
        help=f"{thing}s a page, 1 to 1000 (default %(default)s)",
    )
    p.add_argument("--after", help=f"page after this cursor (a page's `next`) or {thing} id")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="cmsoctl",
        description="Drive cmsod through its control socket.",
        epilog="exit codes: 0 ok, 1 the daemon said no, 2 usage, 3 status: not healthy, "
        "69 daemon unreachable, 73 cannot write the --svg file, 75 timeout, 76 protocol error, "
        "77 permission denied, 141 stdout closed",
    )
    top.add_argument(
        "--socket",
        default=os.environ.get("CMSOD_SOCKET") or DEFAULT_SOCKET,  # set but empty: the default
        help="control socket (env CMSOD_SOCKET; default %(default)s)",
    )
    top.add_argument(
        "--json", action="store_true", help="print exactly one JSON document on stdout"
    )
    top.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the daemon (default %(default)s)",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("submit", help="submit a CMSO v1 schedule request (FILE or - for stdin)")
    p.add_argument("file", metavar="FILE|-")
    p = sub.add_parser("show", help="a schedule: its progress and its elements")
    p.add_argument("id")
    p.add_argument(
        "--status",
        action="append",
        metavar="S",
        choices=[e.value for e in E],
        help="only elements in this status (repeatable), e.g. --status Failed",
    )
    sub.add_parser("delete", help="cancel or delete a schedule").add_argument("id")
    for name, text in [
        ("approve", "accept a schedule pending approval"),
        ("reject", "reject a schedule pending approval"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.add_argument("--user", default=getpass.getuser(), help="approving user id (default: you)")
    approve = sub.choices["approve"]
    approve.description = (
        "Accept a schedule pending approval. If slots of its plan passed (start + misfire "
        "grace before now), the approval is refused, with or without --plan, and the error "
        "names them. With --plan, only the plan you saw (its fingerprint, from `show`): if "
        "the plan changed since, it is refused too, naming what moved. With --replan, the "
        "passed slots are re-placed first (by the carry-over's rules, clear of the freeze "
        "calendars) and the answer shows what moved and the new fingerprint; that re-plan "
        "stays if the approval is then refused (the error says so)."
    )
    approve.add_argument(
        "--plan",
        metavar="FINGERPRINT",
        type=fingerprint,
        help="approve only this plan (the fingerprint `show` gives)",
    )
    approve.add_argument(
        "--replan",
        action="store_true",
        help="re-place slots that passed (or take the plan as it now is) instead of refusing",
    )
    for name, text in [
        ("pause", "hold every element of a running schedule not yet dispatched"),
        ("resume", "resume a paused or halted schedule (held elements go to free slots)"),
        ("abort", "cancel every element not yet dispatched; running ones finish"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.add_argument("--reason", default="", help="recorded and shown with who and when")
    p = sub.add_parser("freeze", help="global freeze: on (nothing is dispatched) or off")
    p.add_argument("state", choices=["on", "off"])
    p.add_argument("--reason", default="", help="recorded and shown in status")
    p.add_argument(
        "--until", help="ISO-8601 with a zone (…Z for UTC), in the future: the freeze ends then"
    )
    p = sub.add_parser("list", help="list schedules")
    p.add_argument(
        "--status",
        action="append",
        metavar="S",
        choices=[s.value for s in ScheduleStatus],
        help="only schedules in this status (repeatable), e.g. --status Completed",
    )
    add_paging(p, "schedule")
    p.add_argument("--all", action="store_true", help="every page from there, streamed")
    p = sub.add_parser(
        "details",
        help="search elements (CMSO scheduleDetails filters)",
        epilog="filter keys: " + ", ".join(DETAIL_FILTERS + DETAIL_PAGING) + ". Times take "
        "FROM or FROM,TO (ISO-8601 with a zone); text takes % as a wildcard.",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. vnfName=node%% or groupId=east (repeatable; repeats of a key are OR-ed)",
    )
    p = sub.add_parser(
        "plan", help="plan a CMSO v1 request now, counting scheduled work; stores nothing"
    )
    p.add_argument("file", metavar="FILE|-")
    p = sub.add_parser("why", help="what an element waits for, or why it ended, in plain words")
    p.add_argument("element", help="the element's name (its vnfName)")
    p.add_argument("--schedule", metavar="ID", help="in this schedule (default: its newest)")
    p = sub.add_parser("gantt", help="draw a schedule's plan (terminal, or --svg FILE)")
    p.add_argument("id")
    p.add_argument("--svg", metavar="FILE", help="write an SVG picture instead")
    p.add_argument(
        "--width",
        type=columns,
        default=72,
        help="terminal columns for the time axis, 10 to 1000 (default %(default)s)",
    )
    p.add_argument(
        "--tz", type=time_zone, default=UTC, metavar="ZONE", help="axis in this zone (default UTC)"
    )
    p.add_argument(
        "--by",
        choices=["group", "element"],
        help=f"one row per group or per element (default: per element up to "
        f"{gantt.MAX_ELEMENT_ROWS} elements)",
    )
    p = sub.add_parser("blackout", help="times an element must not be changed (the ticket book)")
    blackout = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = blackout.add_parser("add", help="ELEMENT --from T --to T --reason R")
    q.add_argument("element")
    q.add_argument(
        "--from", dest="start", required=True, help="start, ISO-8601 with a zone (…Z for UTC)"
    )
    q.add_argument("--to", dest="end", required=True, help="end, ISO-8601 with a zone")
    q.add_argument("--reason", default="", help="said to whoever it blocks")
    q = blackout.add_parser("list", help="[ELEMENT]")
    q.add_argument("element", nargs="?")
    blackout.add_parser("rm", help="ID").add_argument("id")
    p = sub.add_parser("tickets", help="the change tickets of all schedules (or --schedule ID)")
    p.add_argument("--schedule", help="only this schedule's")
    add_paging(p, "ticket")
    p = sub.add_parser("ticket", help="one change ticket: its elements and its TM operations")
    p.add_argument("id")
    p = sub.add_parser("watch", help="print CM events as they happen (of one schedule: ID)")
    p.add_argument("id", nargs="?", help="only this schedule's events (default: every schedule's)")
    p.add_argument("--type", choices=EVENT_TYPES, help="only this eventType")
    sub.add_parser("status", help="daemon health, actors and queues")
    sub.add_parser("reload", help="re-read the configuration")
    sub.add_parser("metrics", help="the Prometheus metrics (text exposition format)")
    for command in sub.choices.values():  # `cmsoctl why X --json` as well as `cmsoctl --json why X`
        command.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,  # (not given here: the one before the command counts)
            help="print exactly one JSON document on stdout (as cmsoctl --json)",
        )
    return top


def main(argv: list[str] | None = None) -> int:
    """`run`, quiet when the reader of stdout goes away (`cmsoctl show X | head`): the shell's
    exit status of a command killed by SIGPIPE, no traceback."""
    try:
        return run(argv)
    except BrokenPipeError:
        # stdout is gone; point it at /dev/null so the interpreter's final flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_SIGPIPE


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "watch":
            return watch(args)
        method, parameters = request_for(args)
        if args.command in ("show", "gantt"):
            reply = whole_schedule(replies(args.socket, method, parameters, args.timeout))
        elif args.command == "details" or (args.command == "list" and args.all):
            key, as_table = (
                ("details", details_table)
                if args.command == "details"
                else ("schedules", list_table)
            )
            stream = replies(args.socket, method, parameters, args.timeout)
            ended = print_rows(stream, key, args.json, as_table)
            if ended is None:
                return EX_OK
            reply = ended
        else:
            reply = call(args.socket, method, parameters, args.timeout)
    except CtlError as exc:
        if args.json:
            print(
                msgspec.json.encode(
                    {"error": "cmsoctl", "parameters": {"message": str(exc), "exit": exc.code}}
                ).decode()
            )
        print(f"cmsoctl: {exc}", file=sys.stderr)
        return exc.code
    if reply.error:
        if args.json:
            print(
                msgspec.json.encode({"error": reply.error, "parameters": reply.parameters}).decode()
            )
        described = describe_error(reply, args.command, getattr(args, "id", None))
        print(f"cmsoctl: {described}", file=sys.stderr)
        return EX_NOPERM if reply.error == "io.cmsod.PermissionDenied" else EX_ERROR
    if args.command == "gantt" and args.svg:
        try:
            Path(args.svg).write_text(gantt.svg(reply.parameters["schedule"], by=args.by))
        except OSError as exc:
            print(f"cmsoctl: cannot write {args.svg}: {exc.strerror}", file=sys.stderr)
            return EX_CANTCREAT
    if args.json:
        print(msgspec.json.encode(reply.parameters).decode())
    else:
        print(human(args.command, reply.parameters, args))
    if args.command == "status" and not reply.parameters.get("healthy", True):
        return EX_UNHEALTHY
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
