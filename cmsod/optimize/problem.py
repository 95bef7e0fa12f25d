"""What the optimizer is asked and what it answers.

Slots (`Grid`): CMSO's rule is "slots start at the window start and repeat every D" (D =
normal + additional duration). The change windows of all the schedule's groups, merged where
they overlap or touch, form *clusters*; each cluster has one grid anchored at its earliest
start, and a window offers the slots of its cluster's grid that lie wholly inside it (and
start no earlier than `not_before_ms`). A window that starts its cluster, and every window
that overlaps no other group's, so gets its slots from its own start; a window that starts
inside another group's loses less than D at its start.

Why the concurrency limit then holds at every instant, not only per slot: two slots of one
cluster lie on one grid, so they are the same slot or do not overlap; two slots of different
clusters lie inside disjoint clusters, so they do not overlap either. Elements running at one
instant therefore all run in one slot, and a limit per slot is a limit per instant: the
problem stays the per-slot problem the solver solves exactly. (Slots anchored at every
window's own start would overlap partially across groups; limiting every instant would then
couple slots pairwise, which no longer is a flow.)
"""

from __future__ import annotations

from bisect import bisect_right
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

    def grid(self) -> Grid:
        return Grid(
            [w for g in self.groups for w in g.windows], self.duration_ms, self.not_before_ms
        )


class Grid:
    """The schedule's slots, named by their start (ms): one grid per cluster of overlapping
    windows (see the module's doc). Computed once per plan: the clusters and the origin are a
    pass over every group's windows, which a request with one group per site has thousands of."""

    def __init__(self, windows: list[tuple[int, int]], step_ms: int, not_before_ms: int) -> None:
        self.step = step_ms
        self.not_before_ms = not_before_ms
        self.clusters = merge(windows)
        self.anchors = [start for start, _ in self.clusters]
        self.origin_ms = self.anchors[0] if self.anchors else 0

    def slots(
        self, windows: list[tuple[int, int]], allowed: list[tuple[int, int]] | None = None
    ) -> Iterator[int]:
        """Starts of the slots wholly inside these windows (of one group) and, if given, inside
        one of the `allowed` periods (sorted, disjoint), ascending, lazily: a window of years
        holds millions of slots and a plan usually needs few of them."""
        step = self.step
        for start, end in merge(windows):  # disjoint, so no slot comes twice
            anchor = self.anchors[bisect_right(self.anchors, start) - 1]
            pieces = [(start, end)]
            if allowed is not None:
                i = max(bisect_right(allowed, (start,)) - 1, 0)
                pieces = []
                while i < len(allowed) and allowed[i][0] < end:
                    if allowed[i][1] > start:
                        pieces.append((max(start, allowed[i][0]), min(end, allowed[i][1])))
                    i += 1
            for lo, hi in pieces:
                first = max(lo, self.not_before_ms)
                t = anchor + -(-(first - anchor) // step) * step  # the first grid point >= first
                while t + step <= hi:
                    yield t
                    t += step

    def number(self, start_ms: int) -> int:
        """CMSO's slot number (1-based) of a slot: D-steps since the earliest window start.
        Strictly increasing with the start (a later cluster begins after the last slot of an
        earlier one ends), so minimising their sum is minimising any increasing cost."""
        return (start_ms - self.origin_ms) // self.step + 1


class Plan(msgspec.Struct):
    placed: dict[str, int]  # element -> start_ms
    unplaced: dict[str, tuple[str, str]]  # element -> (reason, message)
    duration_ms: int
    summary: str = ""  # in the operator's words
    detail: str = ""  # the solver's figures, for --json and the debug log
    objective: int = 0  # sum of the placed elements' slot numbers (1-based), CMSO's measure
    solve_ms: float = 0.0
    # what planning cost, in counts rather than time: slots generated from the windows and
    # policies, slots handed to the solver (over all element classes), searches it made
    work: int = 0


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
