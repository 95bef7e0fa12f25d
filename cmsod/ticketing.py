"""Change tickets, pure: which tickets a schedule needs, the bodies CMSO sends the ticket system
(TM) for them (`reference/cmso.md` §6 B, its `data/templates/tm/*.yaml`), and when a ticket is
closed and how. No I/O here: the store writes what these functions build, the tickets actor
sends it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cmsod.model import ELEMENT_FINAL
from cmsod.model import ElementStatus as E

# CMSO's DefaultChangeTicketProperties.yaml; `tickets.template` and then the schedule's domain
# data of the same name override them (`${dd.<name>}` in a value is filled in).
DEFAULT_TEMPLATE: Mapping[str, str] = {
    "category": "Virtual Network Change",
    "type": "Maintenance",
    "summary": "",
    "reason": "",
    "description": "Execute workflow ${dd.WorkflowName} for VNF(s)",
}
REQUESTER_MAX = 50  # CMSO's Variables.requesterId max length
ASSET_LIST_MAX = 168  # CMSO's Variables.vnfList max length

# The `approvalStatus|status` pairs that let an element be dispatched. CMSO's default is only
# `Approved|Scheduled`; a ticket holding several elements is WorkInProgress once its first one
# is dispatched (we move it there), so its later elements must be allowed to follow.
DEFAULT_DISPATCH_ALLOWED = ("Approved|Scheduled", "Approved|WorkInProgress")

# What a ticket record says about itself in our store (TM's own status words).
OPEN = "Scheduled"
WORK_IN_PROGRESS = "WorkInProgress"
CLOSED = "Closed"
APPROVED = "Approved"


class Closure(StrEnum):
    SUCCESSFUL = "Successful As Scheduled"
    UNSUCCESSFUL = "Unsuccessful"
    CANCELLED = "Cancelled"


CLOSING_COMMENTS = {
    Closure.SUCCESSFUL: "Successful As Scheduled",
    Closure.UNSUCCESSFUL: "Change management request failed for one or more VNFs",
    Closure.CANCELLED: "Cancel requested by user",
}


class Op(StrEnum):
    """A ticket operation in the outbox; each goes to its own TM path."""

    UPDATE = "update"
    CLOSE = "close"
    CANCEL = "cancel"  # CMSO posts it to the close path
    RESCHEDULE = "reschedule"  # new planned dates (an element carried over), to the update path


@dataclass(frozen=True)
class NewTicket:
    """One change ticket to open: a chunk of `vnfs_per_ticket` elements of one group."""

    group_id: str
    vnfs: tuple[str, ...]
    planned_start_ms: int
    planned_end_ms: int
    body: dict[str, Any]  # CMSO's create keys, ready to send


Opened = list[tuple[str, NewTicket]]  # (changeId, ticket) of tickets the ticket system opened


@dataclass(frozen=True)
class TicketGroup:
    group_id: str
    vnfs: list[str]
    start_ms: int
    end_ms: int


_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def fill(text: str, variables: Mapping[str, Any]) -> str:
    """CMSO's `${name}` substitution (commons-text StringSubstitutor): unknown names stay."""
    return _VARIABLE.sub(lambda m: str(variables.get(m.group(1), m.group(0))), text)


def requester(user_id: str) -> str:
    return user_id[:REQUESTER_MAX]


def plan_tickets(
    user_id: str,
    groups: Iterable[TicketGroup],
    per_ticket: int,
    template: Mapping[str, str],
    domain_data: Mapping[str, str],
) -> list[NewTicket]:
    """The tickets CMSO opens when a schedule is accepted: one per group per `per_ticket`
    elements, planned over the group's start and finish (as CMSO does)."""
    variables: dict[str, str] = {f"dd.{k}": v for k, v in {**DEFAULT_TEMPLATE, **template}.items()}
    variables.update({f"dd.{k}": v for k, v in domain_data.items()})
    fields = {k: fill(variables[f"dd.{k}"], variables) for k in DEFAULT_TEMPLATE}
    tickets = []
    for group in groups:
        for i in range(0, len(group.vnfs), per_ticket):
            vnfs = tuple(group.vnfs[i : i + per_ticket])
            body = {
                "category": fields["category"],
                "type": fields["type"],
                "VNF": vnfs[0],
                "summary": fields["summary"],
                "description": fields["description"],
                "requesterId": requester(user_id),
                "plannedStartDate": group.start_ms // 1000,
                "plannedEndDate": group.end_ms // 1000,
                "reason": fields["reason"],
                "assetList": ("[" + ", ".join(vnfs) + "]")[:ASSET_LIST_MAX],  # Java's List text
            }
            tickets.append(NewTicket(group.group_id, vnfs, group.start_ms, group.end_ms, body))
    return tickets


def update_body(change_id: str, user_id: str) -> dict[str, Any]:
    return {"changeId": change_id, "status": WORK_IN_PROGRESS, "requesterId": requester(user_id)}


def reschedule_body(change_id: str, user_id: str, start_ms: int, end_ms: int) -> dict[str, Any]:
    return {
        "changeId": change_id,
        "plannedStartDate": start_ms // 1000,
        "plannedEndDate": end_ms // 1000,
        "requesterId": requester(user_id),
    }


def closure(statuses: Iterable[E]) -> Closure | None:
    """How a ticket closes once all its elements are done; None while one is not.
    All cancelled: cancel. Every element completed (or cancelled before it started):
    successful. Anything else failed: unsuccessful."""
    seen = set(statuses)
    if not seen or not seen <= ELEMENT_FINAL:
        return None
    if seen <= {E.CANCELLED, E.DELETED}:
        return Closure.CANCELLED
    if seen <= {E.COMPLETED, E.CANCELLED, E.DELETED}:
        return Closure.SUCCESSFUL
    return Closure.UNSUCCESSFUL


def close_body(
    change_id: str,
    user_id: str,
    how: Closure,
    first_dispatch_ms: int | None,
    last_completion_ms: int | None,
    now_ms: int,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "changeId": change_id,
        "status": CLOSED,
        "changeClosedBy": requester(user_id),
        "closureCode": how.value,
        "closingComments": CLOSING_COMMENTS[how],
    }
    if how is Closure.CANCELLED:
        return body
    end = last_completion_ms or now_ms  # CMSO: missing dates are now-1s / now
    start = first_dispatch_ms or end - 1000
    body["actualStartDate"] = start // 1000
    body["actualEndDate"] = end // 1000
    return body


@dataclass(frozen=True)
class Move:
    """What happens to a ticket after its elements changed: an operation to queue and, when it
    closes, how (with the actual dates measured)."""

    op: Op
    body: dict[str, Any]
    closure: Closure | None = None
    first_dispatch_ms: int | None = None
    last_completion_ms: int | None = None


def move(
    change_id: str,
    user_id: str,
    elements: Iterable[tuple[E, int | None, int | None]],
    updating: bool,
    now_ms: int,
) -> Move | None:
    """The ticket's next operation given its elements (status, dispatch time, completion time):
    WorkInProgress when its first element is dispatched (`updating`: already queued); close or
    cancel once all of them are done; None when nothing moves."""
    rows = list(elements)
    statuses = [status for status, _, _ in rows]
    how = closure(statuses)
    if how is None:
        if E.TRIGGERED in statuses and not updating:
            return Move(Op.UPDATE, update_body(change_id, user_id))
        return None
    first_ms = min((d for _, d, _ in rows if d is not None), default=None)
    last_ms = max((c for _, _, c in rows if c is not None), default=None)
    body = close_body(change_id, user_id, how, first_ms, last_ms, now_ms)
    op = Op.CANCEL if how is Closure.CANCELLED else Op.CLOSE
    return Move(op, body, how, first_ms, last_ms)


def state_text(approval_status: str | None, status: str | None) -> str:
    return f"{approval_status or ''}|{status or ''}"


def refusal(change_id: str, state: str, allowed: Iterable[str]) -> str:
    return (
        f"CM_TICKET_NOT_APPROVED: change ticket {change_id} is {state}; dispatch needs "
        f"one of {', '.join(allowed)} (tickets.dispatch_allowed)"
    )
