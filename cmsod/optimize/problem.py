"""What the optimizer is asked and what it answers.

Slots: one grid per schedule, origin = the earliest change-window start, step D = normal +
additional duration. A window offers the grid slots that lie wholly inside it (and start no
earlier than `not_before_ms`). With windows that start on the grid, as CMSO's do, these are
exactly CMSO's slots ("start at the window start, repeat every D"); one shared grid is what
lets the concurrency limit hold across groups whose windows overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import msgspec

from cmsod.model import NewSchedule


class ProblemGroup(msgspec.Struct):
    group_id: str
    windows: list[tuple[int, int]]  # [start_ms, end_ms)
    elements: list[str]


class Busy(msgspec.Struct, frozen=True):
    """A time an element is unavailable: a ticket, a blackout, another schedule's work."""

    start_ms: int
    end_ms: int
    what: str  # said in the reason when it blocks the element, e.g. "ticket CHG123"


def requirements(
    names: Iterable[str], element_data: dict[str, dict[str, str]]
) -> dict[str, list[str]]:
    """Whose unavailability blocks whom: an element's own, and that of every element it
    requires (its data's `requires`, comma-separated), which CMSO keyed wrongly (bug 7)."""
    wanted: dict[str, list[str]] = {}
    for name in names:
        required = element_data.get(name, {}).get("requires", "")
        for target in [name, *(r.strip() for r in required.split(",") if r.strip())]:
            wanted.setdefault(target, []).append(name)
    return wanted


def blocking(
    entries: Iterable[tuple[str, int, int, str, str]], wanted: dict[str, list[str]]
) -> dict[str, list[Busy]]:
    """Unavailability entries (element, start, end, what, why) as the Busy times of the
    elements they block."""
    busy: dict[str, list[Busy]] = {}
    for element, start, end, what, why in entries:
        for name in wanted.get(element, ()):
            via = "" if element == name else f" on {element}, which it requires"
            note = f" ({why})" if why else ""
            busy.setdefault(name, []).append(Busy(start, end, f"{what}{via}{note}"))
    return busy


class Problem(msgspec.Struct):
    key: int
    schedule_id: str
    duration_ms: int
    concurrency: int
    policy_id: str | None
    not_before_ms: int
    groups: list[ProblemGroup]
    # per element: its data (time zone, attributes) and when it is unavailable
    element_data: dict[str, dict[str, str]] = {}
    busy: dict[str, list[Busy]] = {}

    @property
    def origin_ms(self) -> int:
        return min(start for g in self.groups for start, _ in g.windows)

    def slots(self, windows: list[tuple[int, int]]) -> Iterator[int]:
        """Grid indices of the slots wholly inside these windows, ascending, lazily: a window
        of years holds millions of slots and a plan usually needs few of them."""
        origin, step = self.origin_ms, self.duration_ms
        last = -1
        for start, end in merge(windows):
            first = max(start, self.not_before_ms)
            k = max(last + 1, -(-(first - origin) // step))  # ceil division
            while origin + (k + 1) * step <= end:
                yield k
                last = k
                k += 1

    def slot_start(self, index: int) -> int:
        return self.origin_ms + index * self.duration_ms


class Plan(msgspec.Struct):
    placed: dict[str, int]  # element -> start_ms
    unplaced: dict[str, tuple[str, str]]  # element -> (reason, message)
    duration_ms: int
    summary: str = ""  # in the operator's words
    detail: str = ""  # the solver's figures, for --json and the debug log
    objective: int = 0  # sum of the placed elements' slot numbers (1-based), CMSO's measure
    solve_ms: float = 0.0


def merge(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching windows as one, in order."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def problem_for(
    new: NewSchedule, not_before_ms: int, busy: dict[str, list[Busy]], key: int = 0
) -> Problem:
    """The problem of a validated request that is not stored (plan only)."""
    return Problem(
        key=key,
        schedule_id=new.schedule_id,
        duration_ms=new.duration_s * 1000,
        concurrency=new.concurrency_limit or 1,
        policy_id=new.policy_id,
        not_before_ms=not_before_ms,
        groups=[
            ProblemGroup(
                g.group_id,
                [(w.start_ms, w.end_ms) for w in g.windows],
                [e.name for e in g.elements],
            )
            for g in new.groups
        ],
        element_data={e.name: e.data for g in new.groups for e in g.elements if e.data},
        busy=busy,
    )
