"""The state machines and CMSO's request rules, as pure functions (no I/O, no trio).

The store calls these inside its transactions; every status change it writes goes through
`check_schedule` / `check_element`, so an illegal transition is a loud bug, not a silent one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import msgspec

from cmsod.errors import RequestError, TransitionError
from cmsod.model import (
    APPROVAL_DOMAIN,
    ELEMENT_DONE_FAILED,
    ELEMENT_DONE_OK,
    ELEMENT_NOT_PART,
    SCHEDULE_RUNNING,
    NewElement,
    NewGroup,
    NewSchedule,
    PollOutcome,
    Window,
)
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.policies import TIME_ZONE_KEYS, zone
from cmsod.wire.cmso import DEFAULT_MAX_ELEMENTS, CallbackData, ScheduleRequest

# -- transition tables (reference/cmso.md 3.2 and 3.3, with the section 9 bugs fixed) ---------

SCHEDULE_TRANSITIONS: dict[S | None, frozenset[S]] = {
    None: frozenset({S.PENDING_SCHEDULE, S.PENDING_APPROVAL}),
    S.PENDING_SCHEDULE: frozenset({S.OPTIMIZATION_IN_PROGRESS, S.OPTIMIZATION_FAILED, S.DELETED}),
    S.OPTIMIZATION_IN_PROGRESS: frozenset(
        {
            S.PENDING_APPROVAL,
            S.OPTIMIZATION_FAILED,
            S.SCHEDULE_FAILED,
            S.PENDING_SCHEDULE,
            S.DELETED,
        }
    ),
    S.PENDING_APPROVAL: frozenset({S.ACCEPTED, S.REJECTED, S.DELETED, S.EXPIRED}),
    S.ACCEPTED: frozenset({S.SCHEDULED, S.CANCELLED}),
    S.SCHEDULED: frozenset({S.NOTIFICATIONS_INITIATED, S.CANCELLED, S.PAUSED}),
    S.NOTIFICATIONS_INITIATED: frozenset(
        {S.COMPLETED, S.COMPLETED_WITH_ERRORS, S.PAUSED, S.HALTED}
    ),
    # stopped: resumed (back to where it was), aborted (Cancelled if nothing ran), or its
    # running work flows end and leave nothing to run (the verdict)
    S.PAUSED: frozenset(
        {
            S.SCHEDULED,
            S.NOTIFICATIONS_INITIATED,
            S.CANCELLED,
            S.COMPLETED,
            S.COMPLETED_WITH_ERRORS,
        }
    ),
    S.HALTED: frozenset(
        {S.NOTIFICATIONS_INITIATED, S.PAUSED, S.CANCELLED, S.COMPLETED, S.COMPLETED_WITH_ERRORS}
    ),
    S.OPTIMIZATION_FAILED: frozenset({S.DELETED}),
    S.SCHEDULE_FAILED: frozenset({S.DELETED}),
    S.REJECTED: frozenset({S.DELETED}),
    S.EXPIRED: frozenset({S.DELETED}),
    S.COMPLETED: frozenset({S.DELETED}),
    S.COMPLETED_WITH_ERRORS: frozenset({S.DELETED}),
    S.CANCELLED: frozenset(),
    S.DELETED: frozenset(),
}

ELEMENT_TRANSITIONS: dict[E | None, frozenset[E]] = {
    None: frozenset({E.PENDING_SCHEDULE, E.PENDING_APPROVAL}),
    E.PENDING_SCHEDULE: frozenset({E.PENDING_APPROVAL, E.NOT_SCHEDULED, E.DELETED}),
    E.PENDING_APPROVAL: frozenset(
        {
            E.SCHEDULED,
            E.SCHEDULED_IMMEDIATE,
            E.APPROVAL_REJECTED,
            E.DELETED,
            E.CANCELLED,
            E.EXPIRED,
        }
    ),
    E.NOT_SCHEDULED: frozenset({E.APPROVAL_REJECTED, E.DELETED}),
    E.SCHEDULED: frozenset({E.TRIGGERED, E.PAST_DUE, E.SCHEDULING_FAILED, E.ERROR, E.CANCELLED}),
    E.SCHEDULED_IMMEDIATE: frozenset({E.TRIGGERED, E.SCHEDULING_FAILED, E.ERROR, E.CANCELLED}),
    E.TRIGGERED: frozenset({E.COMPLETED, E.FAILED, E.ERROR}),
    E.APPROVAL_REJECTED: frozenset({E.DELETED}),
    E.EXPIRED: frozenset({E.DELETED}),
    E.COMPLETED: frozenset(),
    E.FAILED: frozenset(),
    E.PAST_DUE: frozenset(),
    E.SCHEDULING_FAILED: frozenset(),
    E.ERROR: frozenset(),
    E.CANCELLED: frozenset(),
    E.DELETED: frozenset(),
}


def check_schedule(old: S | None, new: S) -> None:
    if new not in SCHEDULE_TRANSITIONS[old]:
        raise TransitionError(f"schedule may not go from {old} to {new}")


def check_element(old: E | None, new: E) -> None:
    if new not in ELEMENT_TRANSITIONS[old]:
        raise TransitionError(f"element may not go from {old} to {new}")


# -- time -------------------------------------------------------------------------------------


def parse_time_ms(text: str) -> int:
    """ISO-8601 to epoch milliseconds; a time without an offset is UTC (CMSO's JVM runs in UTC)."""
    if not text or len(text) > 64:
        raise ValueError(text)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_zoned_time_ms(text: str) -> int:
    """ISO-8601 to epoch milliseconds, refusing a time without a zone (our own inputs, where
    a guess would be silent: blackouts, `cmsoctl` flags)."""
    try:
        moment = datetime.fromisoformat(text) if text and len(text) <= 64 else None
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError("not an ISO-8601 time such as 2026-12-01T08:00:00Z")
    if moment.tzinfo is None:
        raise ValueError("no time zone: add Z for UTC, or an offset such as +01:00")
    return int(moment.timestamp() * 1000)


def format_time(ms: int | None) -> str | None:
    """Epoch ms to CMSO's rendering: ISO-8601 in UTC without millis, e.g. 2019-04-05T12:00:00Z."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- create validation (reference/cmso.md 2.3, in CMSO's order: the first failure wins) -------

SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def _missing(*variables: object, detail: str = "") -> RequestError:
    return RequestError(400, "MISSING_REQUIRED_ATTRIBUTE", *variables, detail=detail)


def _invalid(*variables: object, detail: str = "") -> RequestError:
    return RequestError(400, "INVALID_ATTRIBUTE", *variables, detail=detail)


def validate_request(req: ScheduleRequest, max_elements: int = DEFAULT_MAX_ELEMENTS) -> NewSchedule:
    """Check a CMSO v1 create request the way CMSO does and turn it into a NewSchedule.

    Differences from CMSO, each the evident fix of a section-9 bug or a 500: a missing
    `domainData`, `CallbackData` or `node` is a 400 naming it; every change window is kept per
    group; an empty `groupId` defaults the group (not the element) to `default-<n>`; the same
    node twice in one schedule is refused; `scheduleId` must be a plain identifier.
    """
    info = req.schedulingInfo
    if info is None:
        raise _missing("schedulingInfo")
    if info.vnfDetails is None:
        raise _missing("vnfDetails")
    for field, count in (
        ("schedulingInfo.vnfDetails[].node", sum(len(d.node or ()) for d in info.vnfDetails)),
        ("schedulingInfo.elements", len(info.elements or ())),
    ):
        if count > max_elements:
            raise RequestError(400, "TOO_MANY_ELEMENTS", field, count, max_elements)

    windows_of: list[list[Window]] = []
    for details in info.vnfDetails:
        windows: list[Window] = []
        for window in details.changeWindow or []:
            start_text, end_text = window.startTime or "", window.endTime or ""
            try:
                start = parse_time_ms(start_text)
            except ValueError:
                raise _invalid("startTime", start_text) from None
            try:
                end = parse_time_ms(end_text)
            except ValueError:
                raise _invalid("endTime", end_text) from None
            windows.append(Window(start, end))
        windows_of.append(windows)

    requests = _so_requests(req)
    seen: set[str] = set()
    for details in info.vnfDetails:
        if details.node is None:
            raise _missing("node")
        for node in details.node:
            if node not in requests:
                raise _missing(
                    "CallbackData",
                    node,
                    detail=f"no requestDetails entry has vnfName {node!r}"
                    if node
                    else "a node name is empty",
                )
            if node in seen:
                raise _invalid("node", node)
            seen.add(node)

    if req.domain != APPROVAL_DOMAIN:
        raise _invalid("domain", req.domain or "")
    if not req.scheduleId or not SCHEDULE_ID.fullmatch(req.scheduleId):
        raise _invalid("scheduleId", req.scheduleId or "")

    if info.additionalDurationInSeconds is None:
        raise _missing("additionalDurationInSeconds")
    if info.normalDurationInSeconds is None:
        raise _missing("normalDurationInSeconds")
    if info.additionalDurationInSeconds < 0:
        raise _invalid("additionalDurationInSeconds", info.additionalDurationInSeconds)
    if info.normalDurationInSeconds < 1:
        raise _invalid("normalDurationInSeconds", info.normalDurationInSeconds)

    any_window = any(windows_of)
    for details, windows in zip(info.vnfDetails, windows_of, strict=True):
        for raw, parsed in zip(details.changeWindow or [], windows, strict=True):
            if parsed.end_ms <= parsed.start_ms:
                raise RequestError(
                    400, "INVALID_CHANGE_WINDOW", raw.startTime or "", raw.endTime or ""
                )
    if any_window:
        if info.concurrencyLimit is None:
            raise _missing("concurrencyLimit")
        if info.concurrencyLimit < 1:
            raise _invalid("concurrencyLimit", info.concurrencyLimit)
        for index, (details, windows) in enumerate(zip(info.vnfDetails, windows_of, strict=True)):
            if not windows:  # a future schedule needs a window for every group
                raise _missing("changeWindow", details.groupId or f"default-{index + 1}")

    if not seen:
        raise _missing("elements")
    if not req.userId:
        raise _missing("userId", "")

    element_data: dict[str, dict[str, str]] = {}
    for item in info.elements or []:
        if item.elementId not in seen:
            raise _invalid("elementId", item.elementId)
        element_data[item.elementId] = data = {d.name: d.value for d in item.elementData}
        for key in (k for k in TIME_ZONE_KEYS if k in data):  # not one bad zone failing all
            try:
                zone(data[key])
            except ValueError as exc:
                raise _invalid(key, data[key], detail=f"node {item.elementId}: {exc}") from None

    groups: list[NewGroup] = []
    group_ids: set[str] = set()
    for index, (details, windows) in enumerate(zip(info.vnfDetails, windows_of, strict=True)):
        group_id = details.groupId or f"default-{index + 1}"
        if group_id in group_ids:
            raise _invalid("groupId", group_id)
        group_ids.add(group_id)
        elements = [
            NewElement(name, requests[name], element_data.get(name, {}))
            for name in details.node or []
        ]
        groups.append(NewGroup(group_id, sorted(windows, key=lambda w: w.start_ms), elements))

    domain_data = [
        (key, value)
        for entry in req.domainData or []
        for key, value in entry.items()
        if key != "CallbackData"
    ]
    return NewSchedule(
        schedule_id=req.scheduleId,
        user_id=req.userId,
        domain=req.domain,
        normal_duration_s=info.normalDurationInSeconds,
        additional_duration_s=info.additionalDurationInSeconds,
        concurrency_limit=info.concurrencyLimit,
        policy_id=info.policyId,
        domain_data=domain_data,
        groups=groups,
        schedule_info=msgspec.json.encode(info),
        max_failures=info.maxFailures,
        max_failure_ratio=info.maxFailureRatio,
    )


def _so_requests(req: ScheduleRequest) -> dict[str, bytes]:
    """The per-element SO request bodies from `CallbackData.requestDetails`, keyed by vnfName."""
    if req.domainData is None:
        raise _missing("domainData")
    texts = [entry["CallbackData"] for entry in req.domainData if "CallbackData" in entry]
    if not texts or not texts[0]:
        raise _missing("CallbackData")
    try:
        callback = msgspec.json.decode(texts[0], type=CallbackData)
    except msgspec.DecodeError as exc:
        raise _invalid("CallbackData", str(exc)) from None
    requests: dict[str, bytes] = {}
    for detail in callback.requestDetails:
        raw_name = detail.get("vnfName")
        if raw_name is None:
            continue
        try:
            name = msgspec.json.decode(raw_name, type=str)
        except msgspec.DecodeError:
            continue
        requests.setdefault(name, msgspec.json.encode(detail))
    return requests


# -- approvals, delete, verdicts ------------------------------------------------------------


def delete_plan(schedule: S, elements: Iterable[E]) -> tuple[S, dict[E, E]]:
    """What DELETE does (reference/cmso.md 2.6, bug 15 fixed).

    Returns the schedule's new status and the element status map. Refuses, with no side effect
    at all, a schedule whose events are in progress. Elements that already ran keep the status
    that says how they ended.
    """
    if schedule in (S.NOTIFICATIONS_INITIATED, S.PAUSED, S.HALTED):
        # (a stopped rollout is one under way too: `abort` ends it, as cmsoctl says)
        raise RequestError(406, "CANNOT_CANCEL_IN_PROGRESS")
    new_schedule = S.CANCELLED if schedule in (S.SCHEDULED, S.ACCEPTED) else S.DELETED
    changes: dict[E, E] = {}
    for status in set(elements):
        if status in (E.SCHEDULED, E.SCHEDULED_IMMEDIATE):
            changes[status] = E.CANCELLED
        elif status in (
            E.PENDING_SCHEDULE,
            E.PENDING_APPROVAL,
            E.NOT_SCHEDULED,
            E.APPROVAL_REJECTED,
            E.EXPIRED,
        ):
            changes[status] = E.DELETED
    return new_schedule, changes


def check_stop(schedule_id: str, status: S, action: str) -> None:
    """Pause and abort act on a rollout under way (`Scheduled`, `Notifications Initiated`, or
    already stopped); anything else is CMSO's 412 naming the status."""
    if status not in SCHEDULE_RUNNING:
        raise RequestError(412, "NOT_RUNNING", action, schedule_id, status.value)


def resumed_status(started: bool) -> S:
    """Where a resumed rollout goes back to: `Notifications Initiated` once anything of it was
    dispatched or ended, else `Scheduled`."""
    return S.NOTIFICATIONS_INITIATED if started else S.SCHEDULED


def abort_plan(elements: Iterable[E]) -> tuple[dict[E, E], bool]:
    """Abort: every element not yet dispatched is `Cancelled`; those running are polled to
    their end. Also says whether anything of the schedule ran (else it is `Cancelled`)."""
    changes: dict[E, E] = {}
    ran = False
    for status in set(elements):
        if status in (E.SCHEDULED, E.SCHEDULED_IMMEDIATE):
            changes[status] = E.CANCELLED
        elif status not in ELEMENT_NOT_PART:
            ran = True
    return changes, ran


def threshold_crossed(
    failed: int, total: int, max_failures: int | None, max_ratio: float | None
) -> str | None:
    """Why the failure threshold is crossed (more failures than `max_failures`, or a larger
    share of the elements than `max_ratio`), None while it is not."""
    if max_failures is not None and failed > max_failures:
        return f"{failed} elements failed, more than max_failures = {max_failures}"
    if max_ratio is not None and total and failed > max_ratio * total:
        return (
            f"{failed} of {total} elements failed ({failed / total:.0%}), more than "
            f"max_failure_ratio = {max_ratio:g}"
        )
    return None


def completion_verdict(elements: Iterable[E]) -> S | None:
    """The schedule's verdict once nothing is left to run, else None (bug 14 fixed: one verdict
    over all groups; any failed element makes it `Completed with error(s)`)."""
    failed = False
    ran = False
    for status in elements:
        if status in ELEMENT_NOT_PART:
            continue
        if status in ELEMENT_DONE_OK:
            ran = True
        elif status in ELEMENT_DONE_FAILED:
            failed = True
        else:
            return None
    if failed or not ran:
        return S.COMPLETED_WITH_ERRORS
    return S.COMPLETED


# -- orchestrator answers (reference/cmso.md 3.3, bug 12 fixed: the whole SO state set) ------

SO_SUCCESS = frozenset({"COMPLETE", "COMPLETED"})
SO_FAILURE = frozenset({"FAILED", "ABORTED", "TIMEOUT", "UNLOCKED"})


def poll_outcome(
    http_status: int, state: str | None, message: str | None, finish_time: str | None
) -> PollOutcome:
    if http_status == 404:
        return PollOutcome("Not found", message, E.FAILED)
    if http_status == 400:
        return PollOutcome("Bad Request", message, E.ERROR)
    if http_status != 200:
        return PollOutcome("Failed", message or f"HTTP {http_status}", E.ERROR)
    if state is None:
        return PollOutcome("Bad Response", message, E.ERROR)
    if state in SO_SUCCESS:
        completed = None
        if finish_time:
            try:
                completed = int(parsedate_to_datetime(finish_time).timestamp() * 1000)
            except (TypeError, ValueError):
                completed = None
        return PollOutcome(state, message, E.COMPLETED, completed)
    if state in SO_FAILURE or state.startswith("ROLLED_BACK"):
        return PollOutcome(state, message, E.FAILED)
    return PollOutcome(state, message)
