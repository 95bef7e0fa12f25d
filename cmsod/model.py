"""Statuses (CMSO's display texts, exactly as they go on the wire) and their groupings.

The texts are CMSO's `CmsoStatusEnum` display strings; clients of CMSO match on them, so they
are API. `reference/cmso.md` section 3 is the source.
"""

from __future__ import annotations

from enum import StrEnum


class ScheduleStatus(StrEnum):
    PENDING_SCHEDULE = "Pending Schedule"
    OPTIMIZATION_IN_PROGRESS = "Optimization In Progress"
    OPTIMIZATION_FAILED = "Optimization Failed"
    SCHEDULE_FAILED = "Schedule Failed"
    PENDING_APPROVAL = "Pending Approval"
    ACCEPTED = "Accepted"
    REJECTED = "Rejected"
    SCHEDULED = "Scheduled"
    NOTIFICATIONS_INITIATED = "Notifications Initiated"
    COMPLETED = "Completed"
    COMPLETED_WITH_ERRORS = "Completed with error(s)"
    CANCELLED = "Cancelled"
    DELETED = "Deleted"
    # cmsod's own, in CMSO's style: a rollout stopped by an operator, or by its failure
    # threshold; either is resumed or aborted (README "Stopping and holding a rollout").
    PAUSED = "Paused"
    HALTED = "Halted"
    # cmsod's own: left `Pending Approval` past its approval timeout (README "Approving the
    # plan you saw"); nothing of it runs.
    EXPIRED = "Expired"


class ElementStatus(StrEnum):
    PENDING_SCHEDULE = "Pending Schedule"
    PENDING_APPROVAL = "Pending Approval"
    NOT_SCHEDULED = "Not scheduled by optimizer"
    APPROVAL_REJECTED = "Approval Rejected"
    SCHEDULED = "Scheduled"
    SCHEDULED_IMMEDIATE = "Scheduled Immediate"
    TRIGGERED = "Triggered"
    COMPLETED = "Completed"
    FAILED = "Failed"
    PAST_DUE = "Past due"
    SCHEDULING_FAILED = "Scheduling Failed"
    ERROR = "Error"
    CANCELLED = "Cancelled"
    DELETED = "Deleted"
    EXPIRED = "Expired"  # cmsod's own: its schedule expired pending approval


S = ScheduleStatus
E = ElementStatus

# Schedule states after which nothing more happens to the schedule.
SCHEDULE_FINAL = frozenset(
    {
        S.OPTIMIZATION_FAILED,
        S.SCHEDULE_FAILED,
        S.REJECTED,
        S.COMPLETED,
        S.COMPLETED_WITH_ERRORS,
        S.CANCELLED,
        S.DELETED,
        S.EXPIRED,
    }
)

# A rollout under way, and the ones of them stopped until resumed or aborted.
SCHEDULE_RUNNING = frozenset({S.SCHEDULED, S.NOTIFICATIONS_INITIATED, S.PAUSED, S.HALTED})
SCHEDULE_STOPPED = frozenset({S.PAUSED, S.HALTED})

# Element states waiting for dispatch.
ELEMENT_DISPATCHABLE = frozenset({E.SCHEDULED, E.SCHEDULED_IMMEDIATE})

# Element states that end an element's part in an executing schedule.
ELEMENT_DONE_OK = frozenset({E.COMPLETED})
ELEMENT_DONE_FAILED = frozenset(
    {E.FAILED, E.PAST_DUE, E.ERROR, E.SCHEDULING_FAILED, E.CANCELLED, E.DELETED}
)
# Elements that take no part in execution: `Not scheduled by optimizer` ones are never
# dispatched (CMSO bug 5 fixed). They neither block nor spoil a schedule's verdict.
ELEMENT_NOT_PART = frozenset({E.NOT_SCHEDULED, E.APPROVAL_REJECTED, E.EXPIRED})
ELEMENT_FINAL = ELEMENT_DONE_OK | ELEMENT_DONE_FAILED | ELEMENT_NOT_PART
# What counts against a schedule's failure threshold (a cancelled element did not fail), and
# the elements it is counted over.
ELEMENT_FAILED_RUN = frozenset({E.FAILED, E.ERROR, E.SCHEDULING_FAILED, E.PAST_DUE})
ELEMENT_NOT_COUNTED = ELEMENT_NOT_PART | {E.DELETED}

APPROVAL_DOMAIN = "ChangeManagement"
APPROVAL_TYPE = "Tier 2"
APPROVALS_REQUIRED = 1


# -- Domain records handed from the pure core to the store ------------------------------------

import msgspec  # noqa: E402


class Window(msgspec.Struct, frozen=True):
    start_ms: int
    end_ms: int


class NewElement(msgspec.Struct):
    name: str
    request: bytes  # the SO request JSON, exactly as the client sent it
    data: dict[str, str] = {}  # time zone, attributes (site, region, ...)


class NewGroup(msgspec.Struct):
    group_id: str
    windows: list[Window]
    elements: list[NewElement]


class NewSchedule(msgspec.Struct):
    schedule_id: str
    user_id: str
    domain: str
    normal_duration_s: int
    additional_duration_s: int
    concurrency_limit: int | None
    policy_id: str | None
    domain_data: list[tuple[str, str]]
    groups: list[NewGroup]
    schedule_info: bytes  # the request's schedulingInfo, kept for `scheduleInfo` in views
    max_failures: int | None = None  # the failure threshold (README "Stopping and holding")
    max_failure_ratio: float | None = None

    @property
    def immediate(self) -> bool:
        return not any(g.windows for g in self.groups)

    @property
    def duration_s(self) -> int:
        return self.normal_duration_s + self.additional_duration_s


class PollOutcome(msgspec.Struct):
    """What one status poll of the orchestrator means for an element."""

    so_status: str
    so_message: str | None = None
    status: ElementStatus | None = None  # None: still running, nothing to change
    completed_ms: int | None = None
    connection_error: bool = False
