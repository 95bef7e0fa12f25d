"""The control socket's messages (varlink-shaped): the call envelope and each method's parameters."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from cmsod.wire.cmso import Approval, Name, ScheduleRequest

MethodName = Annotated[str, msgspec.Meta(max_length=256)]


class Call(msgspec.Struct, forbid_unknown_fields=True):
    method: MethodName
    parameters: msgspec.Raw = msgspec.Raw(b"{}")
    more: bool = False
    oneway: bool = False


class NoParameters(msgspec.Struct, forbid_unknown_fields=True):
    pass


class CreateParameters(msgspec.Struct, forbid_unknown_fields=True):
    schedule: ScheduleRequest


class PlanParameters(msgspec.Struct, forbid_unknown_fields=True):
    schedule: ScheduleRequest


class ScheduleIdParameters(msgspec.Struct, forbid_unknown_fields=True):
    scheduleId: Name


class ListParameters(msgspec.Struct, forbid_unknown_fields=True):
    status: Annotated[list[Name], msgspec.Meta(max_length=32)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    after: Name | None = None


# The scheduleDetails filters (CMSO's names, and groupId), then the paging keys.
DETAIL_FILTERS = (
    "request.scheduleId",
    "request.scheduleName",
    "request.userId",
    "request.status",
    "request.optimizerStatus",
    "request.createDateTime",
    "request.concurrencyLimit",
    "request.approvalUserId",
    "request.approvalStatus",
    "request.approvalType",
    "WorkflowName",
    "groupId",
    "vnfName",
    "vnfId",
    "vnfStatus",
    "tmChangeId",
    "startTime",
    "finishTime",
    "lastInstanceTime",
)
DETAIL_PAGING = ("maxSchedules", "lastScheduleId")


class DetailsParameters(msgspec.Struct, forbid_unknown_fields=True):
    filters: Annotated[
        dict[Name, Annotated[list[Name], msgspec.Meta(max_length=1000)]],
        msgspec.Meta(max_length=64),
    ] = {}


class WhyParameters(msgspec.Struct, forbid_unknown_fields=True):
    element: Name
    scheduleId: Name | None = None


class IdParameters(msgspec.Struct, forbid_unknown_fields=True):
    id: Name


class WatchParameters(msgspec.Struct, forbid_unknown_fields=True):
    scheduleId: Name | None = None
    eventType: Name | None = None  # one of wire.events.EVENT_TYPES


class AvailabilityAddParameters(msgspec.Struct, forbid_unknown_fields=True):
    element: Name
    startTime: Name
    endTime: Name
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    kind: Literal["blackout", "ticket"] = "blackout"
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,100}$")] | None = None
    by: Name = ""


class AvailabilityListParameters(msgspec.Struct, forbid_unknown_fields=True):
    element: Name | None = None


class TicketsListParameters(msgspec.Struct, forbid_unknown_fields=True):
    scheduleId: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    after: Name | None = None


Reason = Annotated[str, msgspec.Meta(max_length=1000)]


class StopParameters(msgspec.Struct, forbid_unknown_fields=True):
    """Pause, resume or abort a schedule; `by` is the caller's name as cmsoctl knows it (the
    daemon records it with the uid the socket vouches for)."""

    scheduleId: Name
    reason: Reason = ""
    by: Name = ""


class FreezeParameters(msgspec.Struct, forbid_unknown_fields=True):
    on: bool
    reason: Reason = ""
    until: Name | None = None  # ISO-8601; the freeze ends by itself then
    by: Name = ""


# A plan's fingerprint (cmsod.plans): 12 lowercase hex digits.
Fingerprint = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{12}$")]


class ApproveParameters(msgspec.Struct, forbid_unknown_fields=True):
    """`plan`: the fingerprint of the plan the approver saw (`show`); `replan`: re-place the
    slots that passed (or approve the plan as it now is) instead of refusing."""

    scheduleId: Name
    approval: Approval
    plan: Fingerprint | None = None
    replan: bool = False
