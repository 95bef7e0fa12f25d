"""Why an element is where it is, in the operator's words (`cmsoctl why`). Pure: it reads a
snapshot of one element (`Facts`, loaded by `store.views.why_facts`) and what the dispatcher
would do with it (`Rules`), and answers a list of `Reason`s, each one thing that holds the
element, will happen to it, or ended it. The gates of a held rollout (pause, freeze,
calendar, alarm, failure threshold) are more entries of the same list.

The optimizer's own codes (`AvailabilityConstraint`, `ConcurrencyConstraint`) stay in the
`code` field for scripts; the words never use them.
"""

from __future__ import annotations

import msgspec

from cmsod.lifecycle import format_time
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S


class Block(msgspec.Struct, frozen=True):
    """An entry of the ticket book (blackout or outside ticket) on the element or one it
    requires, or another schedule's work on it."""

    what: str  # "blackout BO000001", "ticket CHG7", "schedule other-1"
    start_ms: int
    end_ms: int
    reason: str = ""


class Facts(msgspec.Struct, kw_only=True):
    element: str
    schedule_id: str
    schedule_status: str
    status: str
    immediate: bool
    concurrency: int | None = None
    start_ms: int | None = None
    finish_ms: int | None = None
    hold_ms: int | None = None
    hold_gate: str | None = None  # the dispatch gate holding it (cmsod.gates), and why
    hold_why: str | None = None
    dispatch_started_ms: int | None = None
    dispatch_ms: int | None = None
    completed_ms: int | None = None
    status_message: str | None = None
    so_request_id: str | None = None
    so_status: str | None = None
    so_message: str | None = None
    so_ms: int | None = None
    change_id: str | None = None
    ticket_state: str | None = None  # our record: "approvalStatus|status"
    approvals: list[tuple[str, str, int]] = []  # (user, Accepted|Rejected, at)
    approvals_needed: int = 1
    optimizer_message: str | None = None
    delete_ms: int | None = None
    running: int = 0  # elements of its schedule running now
    blocks: list[Block] = []  # book entries overlapping its slot, or from now on if none
    other_work: list[Block] = []
    other_schedules: list[str] = []  # other schedules this element is in
    # The gates asked again now (`REASKED`: those that need no peer), each that would hold it:
    # (gate, why, until or None); None when they were not asked.
    gates_now: list[tuple[str, str, int | None]] | None = None


# Gates `why` asks again itself; a hold recorded by another (alarm, ticket: their peers are
# asked only at dispatch) is shown as recorded at the dispatcher's last look.
REASKED = frozenset({"stop", "freeze", "failures", "calendar"})


class Rules(msgspec.Struct, kw_only=True):
    now_ms: int
    lead_ms: int
    misfire_grace_ms: int
    dispatch_immediate: bool
    ticket_check: str  # "builtin": our record; "http": asked of TM at dispatch; "loopback": none
    dispatch_allowed: tuple[str, ...]


class Reason(msgspec.Struct, omit_defaults=True):
    kind: str  # schedule, optimizer, approval, slot, ticket, blackout, concurrency, ...
    words: str
    until: str | None = None  # when this stops holding it (UTC), where known
    code: str | None = None  # a machine code where one exists (optimizer, ticket system)


HELD_UNTIL_RELEASED_MS = 1 << 53  # cmsod.store.dispatch.INDEFINITE_MS (no store import here)


def _at(ms: int) -> str:
    return format_time(ms) or ""


def _span(ms: int, now_ms: int) -> str:
    """'in 2 h 5 min' / '3 min ago'."""
    seconds = abs(ms - now_ms) // 1000
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days} d"] * bool(days) + [f"{hours} h"] * bool(hours)
    parts += [f"{minutes} min"] * bool(minutes and not days)
    parts += [f"{seconds} s"] * bool(not (days or hours or minutes))
    text = " ".join(parts)
    return f"in {text}" if ms >= now_ms else f"{text} ago"


OPTIMIZER_CODES = {
    "AvailabilityConstraint": "no slot it could use was free",
    "ConcurrencyConstraint": "every slot it could use was already full",
    "TICKETS_FAILED": "the ticket system could not list the element's tickets",
}


def optimizer_words(message: str) -> tuple[str, str | None]:
    """A stored `Not scheduled by optimizer` message ('CODE: detail') in plain words."""
    code, sep, detail = message.partition(": ")
    if not sep or code not in OPTIMIZER_CODES:
        return f"the optimizer could not place it: {message}", None
    return f"the optimizer could not place it: {OPTIMIZER_CODES[code]} ({detail})", code


def explain(facts: Facts, rules: Rules) -> list[Reason]:
    """Every reason that applies now, the most decisive first."""
    f, now = facts, rules.now_ms
    status = E(f.status)
    reasons: list[Reason] = []
    if status in (E.PENDING_SCHEDULE, E.NOT_SCHEDULED, E.PENDING_APPROVAL):
        reasons += _before_approval(f, status, now)
    elif status in (E.SCHEDULED, E.SCHEDULED_IMMEDIATE):
        reasons += _waiting_to_run(f, status, rules)
    elif status is E.TRIGGERED:
        reasons.append(_running(f, now))
    else:
        reasons.append(_ended(f, status))
    if status in (E.PENDING_APPROVAL, E.SCHEDULED, E.SCHEDULED_IMMEDIATE, E.NOT_SCHEDULED):
        for block in f.blocks:
            kind = "blackout" if block.what.startswith("blackout") else "outside ticket"
            where = "its slot" if f.start_ms is not None else "the time ahead"
            reasons.append(
                Reason(
                    kind.replace(" ", "-"),
                    f"{block.what} makes it unavailable {_at(block.start_ms)} .. "
                    f"{_at(block.end_ms)}, overlapping {where}"
                    + (f": {block.reason}" if block.reason else ""),
                    until=_at(block.end_ms),
                )
            )
        for work in f.other_work:
            reasons.append(
                Reason(
                    "other-work",
                    f"{work.what} also has work on it {_at(work.start_ms)} .. {_at(work.end_ms)}",
                    until=_at(work.end_ms),
                )
            )
    if f.other_schedules:
        reasons.append(
            Reason(
                "other-schedules",
                f"it is also in schedule(s) {', '.join(f.other_schedules)}"
                " (cmsoctl why --schedule ID)",
            )
        )
    return reasons


def _before_approval(f: Facts, status: E, now: int) -> list[Reason]:
    sched = S(f.schedule_status)
    if status is E.PENDING_SCHEDULE:
        if sched is S.OPTIMIZATION_FAILED:  # it never got a slot of its own
            return [Reason("schedule", f"optimization failed: {f.optimizer_message or ''}")]
        return [
            Reason(
                "optimizer",
                f"waiting for the optimizer to plan schedule {f.schedule_id} ({sched.value})",
            )
        ]
    if status is E.NOT_SCHEDULED:
        words, code = optimizer_words(f.status_message or "")
        reasons = [Reason("optimizer", words, code=code)]
        if sched is S.OPTIMIZATION_FAILED:
            reasons.append(
                Reason("schedule", f"the whole schedule failed: {f.optimizer_message or ''}")
            )
        else:
            reasons.append(Reason("schedule", "it will not run as part of this schedule"))
        return reasons
    accepted = sum(1 for _, verdict, _ in f.approvals if verdict == "Accepted")
    reasons = [
        Reason(
            "approval",
            f"schedule {f.schedule_id} waits for approval ({accepted} of {f.approvals_needed}"
            f" given): cmsoctl approve {f.schedule_id}",
        )
    ]
    if f.start_ms is not None:
        reasons.append(
            Reason(
                "slot",
                f"planned {_at(f.start_ms)} .. {_at(f.finish_ms or f.start_ms)}"
                f" ({_span(f.start_ms, now)}), if approved in time",
                until=_at(f.start_ms),
            )
        )
    return reasons


def _waiting_to_run(f: Facts, status: E, rules: Rules) -> list[Reason]:
    now = rules.now_ms
    reasons: list[Reason] = []
    if f.dispatch_started_ms is not None:
        return [
            Reason(
                "dispatch",
                f"being sent to the orchestrator since {_at(f.dispatch_started_ms)}",
            )
        ]
    reasked = f.gates_now is not None and f.hold_gate in REASKED  # the answer now supersedes
    recorded = f.hold_ms is not None and f.hold_ms > now and not reasked  # a hold in force
    held = bool(f.gates_now) or recorded
    if status is E.SCHEDULED_IMMEDIATE:
        reasons.append(
            Reason("slot", "immediate: sent to the orchestrator as soon as the dispatcher runs")
            if rules.dispatch_immediate
            else Reason(
                "dispatch",
                "immediate dispatch is disabled (dispatcher.dispatch_immediate = false):"
                " it will end Scheduling Failed",
            )
        )
    elif f.start_ms is not None:
        send_ms = f.start_ms - rules.lead_ms
        late_ms = f.start_ms + rules.misfire_grace_ms
        if now < send_ms:
            reasons.append(
                Reason(
                    "slot",
                    f"waits for its slot {_at(f.start_ms)} .. {_at(f.finish_ms or f.start_ms)}"
                    f" ({_span(f.start_ms, now)})",
                    until=_at(send_ms),
                )
            )
        elif now <= late_ms and held:  # the hold below says what it waits for
            reasons.append(
                Reason(
                    "slot",
                    f"due since {_at(f.start_ms)}, held: sent once released by"
                    f" {_at(late_ms)} (the misfire grace), else carried over to its next"
                    " free slot",
                )
            )
        elif now <= late_ms:
            reasons.append(
                Reason("slot", f"due since {_at(f.start_ms)}: the dispatcher sends it now")
            )
        else:
            grace = (
                f"its start {_at(f.start_ms)} is more than the misfire grace of"
                f" {rules.misfire_grace_ms // 1000} s past"
            )
            # one that was held is carried over instead (dispatch.begin_dispatch)
            then = (
                "it was held, so it is carried over to its next free slot"
                if held or f.hold_why is not None
                else "it will end Past due"
            )
            reasons.append(Reason("slot", f"{grace}: {then}"))
    for gate, why, until_ms in f.gates_now or []:
        reasons.append(
            Reason(
                gate, f"held by {gate}: {why}", until=None if until_ms is None else _at(until_ms)
            )
        )
    if recorded and f.hold_ms is not None:
        # a gate holds it: until a time, or (pause, halt, freeze) until released
        until = None if f.hold_ms >= HELD_UNTIL_RELEASED_MS else _at(f.hold_ms)
        reasons.append(Reason(f.hold_gate or "ticket", f.hold_why or "held", until=until))
    elif f.change_id is not None and rules.ticket_check == "builtin":
        state = f.ticket_state or "|"
        if state in rules.dispatch_allowed:
            reasons.append(
                Reason("ticket", f"change ticket {f.change_id} is {state}: dispatch allowed")
            )
        else:
            reasons.append(
                Reason(
                    "ticket",
                    f"change ticket {f.change_id} is {state}; dispatch needs one of"
                    f" {', '.join(rules.dispatch_allowed)}: as it is, it will end"
                    " Scheduling Failed when due",
                    code="CM_TICKET_NOT_APPROVED",
                )
            )
    elif f.change_id is not None and rules.ticket_check == "http":
        reasons.append(
            Reason(
                "ticket",
                f"change ticket {f.change_id} is checked with the ticket system when due"
                f" (needs one of {', '.join(rules.dispatch_allowed)})",
            )
        )
    if f.concurrency is not None:
        reasons.append(
            Reason(
                "concurrency",
                f"{f.running} of its schedule's elements run now; its slot keeps the schedule"
                f" within {f.concurrency} at once",
            )
        )
    return reasons


def _running(f: Facts, now: int) -> Reason:
    since = f.dispatch_ms or f.dispatch_started_ms
    words = f"running in the orchestrator as request {f.so_request_id}" + (
        f" since {_at(since)} ({_span(since, now)})" if since else ""
    )
    if f.so_status:
        words += f"; last status {f.so_status}" + (f": {f.so_message}" if f.so_message else "")
        if f.so_ms:
            words += f" at {_at(f.so_ms)}"
    if f.finish_ms is not None:
        words += f"; its slot ends {_at(f.finish_ms)}"
    return Reason("orchestrator", words, until=_at(f.finish_ms) if f.finish_ms else None)


def _ended(f: Facts, status: E) -> Reason:
    at = f" at {_at(f.completed_ms)}" if f.completed_ms else ""
    if status is E.COMPLETED:
        return Reason("done", f"completed{at} (orchestrator request {f.so_request_id})")
    if status is E.APPROVAL_REJECTED:
        who = ", ".join(u for u, verdict, _ in f.approvals if verdict == "Rejected")
        return Reason("approval", f"schedule {f.schedule_id} was rejected by {who or 'someone'}")
    if status is E.EXPIRED:
        return Reason("approval", f.status_message or f"schedule {f.schedule_id} expired")
    if status in (E.CANCELLED, E.DELETED):
        when = f" at {_at(f.delete_ms)}" if f.delete_ms else ""
        return Reason("schedule", f"schedule {f.schedule_id} was deleted{when}: {status.value}")
    why = f.status_message or f.so_message or "no reason was recorded"
    if status is E.FAILED:
        words = f"the orchestrator reported {f.so_status or 'FAILED'}{at}: {why}"
    elif status is E.PAST_DUE:
        words = why
    elif status is E.SCHEDULING_FAILED:
        words = f"never sent to the orchestrator: {why}"
    else:  # Error
        words = f"ended in error{at}: {why}"
    code, sep, _ = why.partition(": ")
    return Reason("failed", words, code=code if sep and code.isupper() else None)
