"""CMSO's v1 northbound formats: the schedule request and the approval body.

Every field is optional at this level on purpose: CMSO reports a missing field with its own
`MISSING_REQUIRED_ATTRIBUTE` error in a fixed order, which `lifecycle.validate_request` does.
This layer only enforces JSON types and size limits, so a hostile body can never allocate
without bound. Unknown keys are ignored, as CMSO's clients (VID) send keys we do not use.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Name = Annotated[str, msgspec.Meta(max_length=1024)]
Text = Annotated[str, msgspec.Meta(max_length=64 * 1024 * 1024)]
Count = Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]
# The decoder's ceiling on elements per request, so that a hostile body can never allocate
# without bound; the cap in force is the setting `[optimizer] max_elements` (default 100,000),
# which `lifecycle.validate_request` checks, naming the field.
MAX_ELEMENTS = 10_000_000
DEFAULT_MAX_ELEMENTS = 100_000
MAX_WINDOWS = 1_000


class ChangeWindow(msgspec.Struct, omit_defaults=True):
    startTime: Name | None = None
    endTime: Name | None = None


class VnfDetails(msgspec.Struct, omit_defaults=True):
    groupId: Name | None = None
    node: Annotated[list[Name], msgspec.Meta(max_length=MAX_ELEMENTS)] | None = None
    changeWindow: Annotated[list[ChangeWindow], msgspec.Meta(max_length=MAX_WINDOWS)] | None = None


class NameValue(msgspec.Struct):
    name: Name
    value: Name


class ElementInfo(msgspec.Struct, omit_defaults=True):
    """Data about one element (CMSO v2's `elements[]`): `timezone` and attributes like `site`."""

    elementId: Name
    elementData: Annotated[list[NameValue], msgspec.Meta(max_length=64)] = []


class SchedulingInfo(msgspec.Struct, omit_defaults=True):
    normalDurationInSeconds: Count | None = None
    additionalDurationInSeconds: Count | None = None
    concurrencyLimit: Count | None = None
    policyId: Name | None = None
    # cmsod's: the rollout halts once more elements fail than this, or a larger share
    maxFailures: Count | None = None
    maxFailureRatio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    vnfDetails: Annotated[list[VnfDetails], msgspec.Meta(max_length=MAX_ELEMENTS)] | None = None
    elements: Annotated[list[ElementInfo], msgspec.Meta(max_length=MAX_ELEMENTS)] | None = None


class ScheduleRequest(msgspec.Struct, omit_defaults=True):
    domain: Name | None = None
    scheduleId: Name | None = None
    scheduleName: Name | None = None
    userId: Name | None = None
    domainData: Annotated[list[dict[Name, Text]], msgspec.Meta(max_length=1024)] | None = None
    schedulingInfo: SchedulingInfo | None = None


class CallbackData(msgspec.Struct):
    """The JSON string in `domainData[].CallbackData`: one SO request per element."""

    requestDetails: Annotated[
        list[dict[str, msgspec.Raw]], msgspec.Meta(max_length=MAX_ELEMENTS)
    ] = []
    requestType: Name | None = None


class TicketData(msgspec.Struct, omit_defaults=True):
    """CMSO's ActiveTicketsResponse entry: a time the listed elements are unavailable."""

    id: Name
    startTime: Name
    endTime: Name
    elementIds: Annotated[list[Name], msgspec.Meta(max_length=MAX_ELEMENTS)]
    availability: Name | None = None
    changeDetails: Text | None = None


class ActiveTickets(msgspec.Struct, omit_defaults=True):
    elements: Annotated[list[TicketData], msgspec.Meta(max_length=1_000_000)] = []


class Approval(msgspec.Struct, omit_defaults=True):
    approvalUserId: Name | None = None
    approvalType: Name | None = None
    approvalStatus: Name | None = None
    approvalDateTime: Name | None = None  # accepted and ignored, as in CMSO: server time is used
