"""Whether an element may be dispatched now: an ordered list of gates, pure (no I/O, no trio).

The store loads a `Snapshot` of a due element, `decide` runs it through the gates and the
store applies the first answer that is not `Go`: `Hold(until, why)` keeps the element waiting
(it is looked at again at `until`), `End(status, why)` ends it without a dispatch. `evaluate`
gives every gate's answer, for `cmsoctl why`.

A gate is any object with a `name` and `__call__(snapshot) -> Answer`; the dispatcher builds
the list from the configuration and what it asked the peers just before (the ticket system's
answers), so a gate never calls out itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from cmsod import lifecycle, ticketing
from cmsod.model import ElementStatus as E


class Go(msgspec.Struct, frozen=True, tag=True):
    """Nothing against: the next gate is asked."""


class Hold(msgspec.Struct, frozen=True, tag=True):
    """Not now: wait until `until_ms` (None: until something changes, e.g. a resume)."""

    until_ms: int | None
    why: str


class End(msgspec.Struct, frozen=True, tag=True):
    """Never: the element ends with `status`, `why` as its status message."""

    status: E
    why: str


Answer = Go | Hold | End
GO = Go()


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What the decision sees of one element waiting to be dispatched."""

    now_ms: int
    schedule_id: str
    name: str
    status: E
    start_ms: int | None  # None: immediate
    created_ms: int  # the schedule's: an immediate element's misfire grace counts from it
    change_id: str | None = None
    ticket_state: str = "|"  # our record of its ticket, `approvalStatus|status`

    @property
    def due_ms(self) -> int:
        return self.start_ms if self.start_ms is not None else self.created_ms


class Gate(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, s: Snapshot, /) -> Answer: ...


def evaluate(snapshot: Snapshot, gates: Iterable[Gate]) -> list[tuple[str, Answer]]:
    """Every gate's answer, in order (for `why`; `decide` stops at the first refusal)."""
    return [(gate.name, gate(snapshot)) for gate in gates]


def decide(snapshot: Snapshot, gates: Sequence[Gate]) -> tuple[str, Answer]:
    """The first gate that does not answer `Go`, with its answer; ("", GO) when none."""
    for gate in gates:
        answer = gate(snapshot)
        if not isinstance(answer, Go):
            return gate.name, answer
    return "", GO


# -- the gates ------------------------------------------------------------------------------


class TicketGate(msgspec.Struct, frozen=True):
    """The change ticket allows the dispatch. `allowed`: the `approvalStatus|status` pairs that
    pass (None: no check, loopback mode). `remote`: what TM answered per changeId (http mode),
    `unknown` why TM could not give one, `unreachable` why TM did not answer at all (hold and
    ask again after `hold_ms`, within the misfire grace); without `remote` our own record of
    the ticket is checked (builtin mode)."""

    allowed: tuple[str, ...] | None = None
    remote: dict[str, str] | None = None
    unknown: dict[str, str] = {}
    unreachable: dict[str, str] = {}
    hold_ms: int = 5000
    misfire_grace_ms: int = 0
    name: str = "ticket"

    def __call__(self, s: Snapshot) -> Answer:
        if self.allowed is None or s.change_id is None:
            return GO
        silence = self.unreachable.get(s.change_id)
        if silence is not None:
            if s.now_ms <= s.due_ms + self.misfire_grace_ms:
                return Hold(
                    s.now_ms + self.hold_ms,
                    f"the ticket system did not answer for change ticket {s.change_id}: {silence}",
                )
            return End(
                E.SCHEDULING_FAILED,
                f"UNABLE_TO_LOCATE_CHANGE_RECORD: change ticket {s.change_id}: the ticket "
                f"system did not answer within the misfire grace: {silence}",
            )
        if s.change_id in self.unknown:
            return End(
                E.SCHEDULING_FAILED,
                f"UNABLE_TO_LOCATE_CHANGE_RECORD: change ticket {s.change_id}: "
                f"{self.unknown[s.change_id]}",
            )
        state = s.ticket_state if self.remote is None else self.remote.get(s.change_id, "|")
        if state in self.allowed:
            return GO
        return End(E.SCHEDULING_FAILED, ticketing.refusal(s.change_id, state, self.allowed))


class ImmediateGate(msgspec.Struct, frozen=True):
    """`dispatcher.dispatch_immediate = false` refuses elements with no start time."""

    allowed: bool
    name: str = "immediate"

    def __call__(self, s: Snapshot) -> Answer:
        if s.status is E.SCHEDULED_IMMEDIATE and not self.allowed:
            return End(
                E.SCHEDULING_FAILED,
                "immediate dispatch is disabled (dispatcher.dispatch_immediate = false)",
            )
        return GO


class MisfireGate(msgspec.Struct, frozen=True):
    """Too late: past its start time by more than the misfire grace, the element is `Past due`."""

    grace_ms: int
    name: str = "misfire"

    def __call__(self, s: Snapshot) -> Answer:
        if s.start_ms is None or s.now_ms <= s.start_ms + self.grace_ms:
            return GO
        return End(
            E.PAST_DUE,
            f"not dispatched: {(s.now_ms - s.start_ms) / 1000:.0f} s after its start time "
            f"{lifecycle.format_time(s.start_ms)}, beyond the misfire grace of "
            f"{self.grace_ms / 1000:.0f} s",
        )


def standard(ticket: TicketGate, misfire_grace_ms: int, dispatch_immediate: bool) -> list[Gate]:
    """The gates in the order they are asked."""
    return [
        msgspec.structs.replace(ticket, misfire_grace_ms=misfire_grace_ms),
        ImmediateGate(dispatch_immediate),
        MisfireGate(misfire_grace_ms),
    ]
