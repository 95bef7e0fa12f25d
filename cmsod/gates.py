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

from cmsod import alarms, lifecycle, ticketing
from cmsod.calendars import Calendars, merged_attributes
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.problem import merge


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


class Freeze(msgspec.Struct, frozen=True):
    """The global freeze while it is on: nothing is dispatched anywhere."""

    since_ms: int
    by: str
    why: str
    until_ms: int | None = None  # None: until turned off


class Failures(msgspec.Struct, frozen=True):
    """The schedule's failure count (less those a resume acknowledged) and its threshold."""

    failed: int = 0
    total: int = 0
    max_failures: int | None = None
    max_ratio: float | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What the decision sees of one element waiting to be dispatched."""

    now_ms: int
    schedule_id: str
    name: str
    status: E
    start_ms: int | None  # None: immediate
    created_ms: int  # the schedule's: an immediate element's misfire grace counts from it
    duration_ms: int = 0
    change_id: str | None = None
    ticket_state: str = "|"  # our record of its ticket, `approvalStatus|status`
    schedule_status: S = S.NOTIFICATIONS_INITIATED
    stopped_by: str | None = None  # who paused or halted the schedule, and why
    stopped_why: str | None = None
    freeze: Freeze | None = None
    failures: Failures = Failures()
    # the availability book's entries on this element (or one it requires) over its slot:
    # (start, end, what), e.g. a blackout added after approval
    unavailable: tuple[tuple[int, int, str], ...] = ()
    held_why: str | None = None  # what held it last, if anything did
    data: dict[str, str] = {}  # its data in the request (attributes such as its site)

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


class StopGate(msgspec.Struct, frozen=True):
    """A paused or halted schedule dispatches nothing until it is resumed (or aborted)."""

    name: str = "stop"

    def __call__(self, s: Snapshot) -> Answer:
        if s.schedule_status not in (S.PAUSED, S.HALTED):
            return GO
        return Hold(None, f"{s.schedule_status.value} by {s.stopped_by}: {s.stopped_why}")


class FreezeGate(msgspec.Struct, frozen=True):
    """The global freeze: nothing is dispatched anywhere while it is on."""

    name: str = "freeze"

    def __call__(self, s: Snapshot) -> Answer:
        f = s.freeze
        if f is None or (f.until_ms is not None and s.now_ms >= f.until_ms):
            return GO
        until = f" until {lifecycle.format_time(f.until_ms)}" if f.until_ms is not None else ""
        return Hold(f.until_ms, f"freeze{until} by {f.by}: {f.why}")


class FailureGate(msgspec.Struct, frozen=True):
    """The schedule's failure threshold: once crossed, nothing more of it is dispatched (the
    store halts the schedule in the transaction that crosses it; this holds the rest even
    before that is seen)."""

    name: str = "failures"

    def __call__(self, s: Snapshot) -> Answer:
        f = s.failures
        why = lifecycle.threshold_crossed(f.failed, f.total, f.max_failures, f.max_ratio)
        return GO if why is None else Hold(None, f"failure threshold crossed: {why}")


class BookGate(msgspec.Struct, frozen=True):
    """Blackouts and outside tickets, enforced at dispatch too: an entry of the availability
    book that overlaps the element's run (added after approval, say) holds it past the entry."""

    name: str = "blackout"

    def __call__(self, s: Snapshot) -> Answer:
        begin = max(s.now_ms, s.start_ms or s.now_ms)
        end = begin + s.duration_ms
        hits = [(a, b, what) for a, b, what in s.unavailable if a < end and b > begin]
        if not hits:
            return GO
        until = max(b for _, b, _ in hits)
        whats = ", ".join(what for _, _, what in hits)
        return Hold(until, f"{whats} until {lifecycle.format_time(until)}")


class CalendarGate(msgspec.Struct, frozen=True):
    """The freeze calendars of the configuration (as reloaded last): a deny period that
    overlaps the element's run, for every element or one its attributes match, holds it past
    the period."""

    calendars: Calendars = Calendars()
    inventory: dict[str, dict[str, str]] = {}
    name: str = "calendar"

    def __call__(self, s: Snapshot) -> Answer:
        if not self.calendars:
            return GO
        begin = max(s.now_ms, s.start_ms or s.now_ms)
        end = begin + max(s.duration_ms, 1)
        if not self.calendars.occurring(begin, end):  # the common case: nothing to match
            return GO
        attributes = merged_attributes(s.name, s.data, self.inventory)
        hits = self.calendars.denied(s.name, attributes, begin, end)
        if not hits:
            return GO
        until = max(b for _, b, _ in hits)
        whats = ", ".join(dict.fromkeys(what for _, _, what in hits))
        return Hold(until, f"{whats} until {lifecycle.format_time(until)}")


class AlarmGate(msgspec.Struct, frozen=True):
    """Alerts firing on the element or its site. The dispatcher asked the alert source, just
    before, every query (`cmsod.alarms`) of the due batch: `firing` says what fires per query,
    `failed` why a query could not be asked. Firing: held, looked at again after
    `recheck_ms`, carried over once the hold outlasts its slot. Not asked: held too, unless
    `fail_open` (alarms.on_error = "go")."""

    queries: tuple[tuple[str, ...], ...] = ()  # the configured templates; () = no alarm gate
    inventory: dict[str, dict[str, str]] = {}
    firing: dict[tuple[str, ...], str] = {}
    failed: dict[tuple[str, ...], str] = {}
    fail_open: bool = False
    recheck_ms: int = 60_000
    name: str = "alarm"

    def __call__(self, s: Snapshot) -> Answer:
        if not self.queries:
            return GO
        attributes = merged_attributes(s.name, s.data, self.inventory)
        failures = []
        for query in alarms.queries(self.queries, s.name, attributes):
            fires = self.firing.get(query)
            if fires is not None:
                return Hold(s.now_ms + self.recheck_ms, f"{fires} ({', '.join(query)})")
            if query in self.failed:
                failures.append(self.failed[query])
        if failures and not self.fail_open:
            return Hold(
                s.now_ms + self.recheck_ms,
                f"the alert source could not be asked (alarms.on_error = hold): {failures[0]}",
            )
        return GO


def standard(
    ticket: TicketGate,
    misfire_grace_ms: int,
    dispatch_immediate: bool,
    calendar: CalendarGate | None = None,
    alarm: AlarmGate | None = None,
) -> list[Gate]:
    """The gates in the order they are asked: stops first (pause, freeze, failures: an
    operator's word), then the configured deny periods, then what the element's own slot
    allows (the book, alerts, its ticket), last the misfire grace."""
    return [
        StopGate(),
        FreezeGate(),
        FailureGate(),
        calendar or CalendarGate(),
        BookGate(),
        alarm or AlarmGate(),
        msgspec.structs.replace(ticket, misfire_grace_ms=misfire_grace_ms),
        ImmediateGate(dispatch_immediate),
        MisfireGate(misfire_grace_ms),
    ]


# -- carry-over ---------------------------------------------------------------------------------


def next_free_slot(
    windows: list[tuple[int, int]],
    origin_ms: int,
    step_ms: int,
    not_before_ms: int,
    blocked: list[tuple[int, int]],
    taken: dict[int, int],
    concurrency: int,
) -> int | None:
    """The first slot of the schedule's grid (origin, step) wholly inside one of `windows`,
    starting no earlier than `not_before_ms`, that overlaps no `blocked` span and has room
    under the concurrency limit (`taken`: slot start -> elements already there); None when
    no window has one left."""
    spans = merge(blocked)
    for start, end in merge(windows):
        first = max(start, not_before_ms)
        k = max(0, -(-(first - origin_ms) // step_ms))
        while origin_ms + (k + 1) * step_ms <= end:
            slot = origin_ms + k * step_ms
            clash = next((b for a, b in spans if a < slot + step_ms and b > slot), None)
            if clash is not None:
                k = max(k + 1, -(-(clash - origin_ms) // step_ms))  # jump past the span
                continue
            if taken.get(slot, 0) < concurrency:
                return slot
            k += 1
    return None
