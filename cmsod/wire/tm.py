"""The ticket system's (TM's) answers and the active-tickets exchange, as CMSO reads and
writes them (reference/cmso.md §4.2 step 2, §6). Extra keys are ignored; sizes are bounded."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from cmsod.wire.cmso import DEFAULT_MAX_ELEMENTS, ChangeWindow, ElementInfo, TicketData

Text = Annotated[str, msgspec.Meta(max_length=4096)]


class Created(msgspec.Struct):
    """200 to a create: `{"changeId": "..."}`."""

    changeId: Text | None = None


class TicketInfo(msgspec.Struct):
    """200 to a get (TmChangeInfo); only what the dispatch check reads is decoded."""

    changeId: Text | None = None
    approvalStatus: Text | None = None
    status: Text | None = None


class ServiceException(msgspec.Struct):
    messageId: Text | None = None
    text: Annotated[str, msgspec.Meta(max_length=65536)] | None = None


class ServiceErrors(msgspec.Struct):
    serviceException: Annotated[list[ServiceException], msgspec.Meta(max_length=1000)] = []


ALREADY_CLOSED_ID = "SVC40006"
ALREADY_CLOSED_TEXT = "is in Closed status"


def already_closed(body: bytes) -> bool:
    """CMSO's TmClient.isAlreadyClosed: a 400 whose serviceException says the ticket is closed."""
    try:
        errors = msgspec.json.decode(body, type=ServiceErrors)
    except msgspec.DecodeError:
        return False
    return any(
        e.messageId == ALREADY_CLOSED_ID and ALREADY_CLOSED_TEXT in (e.text or "")
        for e in errors.serviceException
    )


class ActiveTicketsRequest(msgspec.Struct):
    requestId: str
    commonData: dict[str, Any]
    changeWindows: list[ChangeWindow]
    elements: list[ElementInfo]


class ActiveTicketsResponse(msgspec.Struct):
    requestId: Text | None = None
    status: Text | None = None  # IN_PROGRESS | COMPLETED | FAILED
    pollingSeconds: int | None = None
    errorMessage: Annotated[str, msgspec.Meta(max_length=65536)] | None = None
    elements: Annotated[list[TicketData], msgspec.Meta(max_length=10 * DEFAULT_MAX_ELEMENTS)] = []
