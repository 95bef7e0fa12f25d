"""From a schedule's problem to a plan: which slots each element may use, then the exact
solver, then start times and, for each element left out, the reason and what blocked it.

A slot is usable by an element when it lies wholly inside the element's group's change
windows, starts no earlier than `not_before_ms`, lies wholly inside one allowed period of the
schedule's policy read in the element's time zone, and overlaps none of the element's busy
times (tickets, blackouts, other schedules' work; intervals are half-open, so back-to-back
work does not conflict).

Only the first `n` usable slots of an element can matter, n being the number of elements: an
optimal plan never puts an element later, because among its first n usable slots one always
has room (fewer than n other elements exist to fill them). That bound keeps long windows with
short slots cheap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cmsod.optimize.policies import TIME_ZONE_KEYS, Policy, allowed_windows, contains, zone
from cmsod.optimize.problem import Busy, Plan, Problem, ProblemGroup
from cmsod.optimize.solver import Instance, solve

MAX_SCAN = 2_000_000  # grid slots looked at per group and time zone, at most


@dataclass
class Options:
    attribute: str | None = None  # e.g. "site": at most attribute_limit per value at once
    attribute_limit: int | None = None


@dataclass
class Planning:
    """What planning needs besides the problem: policies, the inventory and the options."""

    policies: dict[str, Policy]
    inventory: dict[str, dict[str, str]]
    options: Options

    def plan(self, problem: Problem) -> Plan:
        """Plan with the inventory's element data under the request's own."""
        if self.inventory:
            names = [n for g in problem.groups for n in g.elements]
            problem.element_data = {
                n: {**self.inventory.get(n, {}), **problem.element_data.get(n, {})} for n in names
            }
        return plan(problem, self.policies, self.options)


@dataclass
class _Class:
    group: ProblemGroup
    names: list[str]
    slots: list[int]  # grid indices (emptied once handed to the solver)
    why_none: str  # when it has no usable slot: what left it without any
    attribute: str | None
    usable: int = 0  # how many slots it could use


def _overlaps(busy: list[Busy], start: int, end: int) -> Busy | None:
    for b in busy:
        if b.start_ms < end and start < b.end_ms:
            return b
    return None


def plan(problem: Problem, policies: dict[str, Policy], options: Options | None = None) -> Plan:
    began = time.perf_counter()
    options = options or Options()
    names = [n for g in problem.groups for n in g.elements]
    policy: Policy | None = None
    if problem.policy_id:
        policy = policies.get(problem.policy_id)
        if policy is None:
            known = ", ".join(sorted(policies))
            why = f"unknown policy {problem.policy_id!r} (known: {known})"
            return _failed(problem, names, "AvailabilityConstraint", why)
    try:
        classes = _classes(problem, policy, options, len(names))
    except ValueError as exc:  # an unknown time zone in the element data
        return _failed(problem, names, "AvailabilityConstraint", str(exc))

    grid = sorted({s for c in classes for s in c.slots})
    index = {s: i for i, s in enumerate(grid)}
    values = sorted({c.attribute or "" for c in classes})
    value_index = {v: i for i, v in enumerate(values)}
    instance = Instance(
        slots=len(grid),
        limit=problem.concurrency,
        available=[[index[s] for s in c.slots] for c in classes],
        counts=[len(c.names) for c in classes],
        attributes=[value_index[c.attribute or ""] for c in classes],
        attribute_limit=options.attribute_limit if options.attribute else None,
    )
    for cls in classes:
        cls.usable, cls.slots = len(cls.slots), []  # the instance holds them now
    solution = solve(instance)

    placed: dict[str, int] = {}
    unplaced: dict[str, tuple[str, str]] = {}
    for cls, slots in zip(classes, solution.placed, strict=True):
        starts = [grid[s] for s, n in sorted(slots.items()) for _ in range(n)]
        for name, slot in zip(cls.names, starts, strict=False):
            placed[name] = problem.slot_start(slot)
        for name in cls.names[len(starts) :]:
            unplaced[name] = _reason(problem, cls, options)
    objective = sum((s - problem.origin_ms) // problem.duration_ms + 1 for s in placed.values())
    solve_ms = (time.perf_counter() - began) * 1000
    # the operator's words; the solver's own figures go to `detail` (--json, the debug log)
    summary = f"{len(placed)} scheduled, {len(unplaced)} not scheduled"
    detail = (
        f"optimal: objective {objective} (sum of slot numbers), {len(grid)} slots, "
        f"{len(classes)} element classes, {solution.augmentations} re-plans, {solve_ms:.0f} ms"
    )
    return Plan(
        placed,
        unplaced,
        problem.duration_ms,
        summary,
        objective=objective,
        solve_ms=solve_ms,
        detail=detail,
    )


def _failed(problem: Problem, names: list[str], reason: str, why: str) -> Plan:
    return Plan({}, {n: (reason, why) for n in names}, problem.duration_ms, why)


def _classes(problem: Problem, policy: Policy | None, options: Options, n: int) -> list[_Class]:
    """Elements with the same usable slots and attribute value form one class."""
    classes: list[_Class] = []
    for group in problem.groups:
        shared: dict[tuple[str, str | None], _Class] = {}
        windows_cache: dict[str, list[tuple[int, int]] | None] = {}
        for name in group.elements:
            data = problem.element_data.get(name, {})
            tz_name = next((data[k] for k in TIME_ZONE_KEYS if data.get(k)), "UTC")
            attribute = data.get(options.attribute) if options.attribute else None
            if tz_name not in windows_cache:
                windows_cache[tz_name] = _policy_windows(problem, group, policy, tz_name)
            allowed = windows_cache[tz_name]
            busy = problem.busy.get(name, [])
            if not busy and (tz_name, attribute) in shared:
                shared[(tz_name, attribute)].names.append(name)
                continue
            slots, why = _usable(problem, group, allowed, busy, n, policy, tz_name)
            cls = _Class(group, [name], slots, why, attribute)
            classes.append(cls)
            if not busy:
                shared[(tz_name, attribute)] = cls
    return classes


def _policy_windows(
    problem: Problem, group: ProblemGroup, policy: Policy | None, tz_name: str
) -> list[tuple[int, int]] | None:
    if policy is None or not group.windows:
        return None
    start = min(s for s, _ in group.windows)
    end = max(e for _, e in group.windows)
    return allowed_windows(policy, zone(tz_name), start, end)


def _usable(
    problem: Problem,
    group: ProblemGroup,
    allowed: list[tuple[int, int]] | None,
    busy: list[Busy],
    n: int,
    policy: Policy | None,
    tz_name: str,
) -> tuple[list[int], str]:
    slots: list[int] = []
    scanned = in_policy = 0
    blockers: dict[str, None] = {}
    grid: Iterator[int] = problem.slots(group.windows)
    step = problem.duration_ms
    for k in grid:
        scanned += 1
        if scanned > MAX_SCAN or len(slots) >= n:
            break
        start = problem.slot_start(k)
        if allowed is not None and not contains(allowed, start, start + step):
            continue
        in_policy += 1
        blocker = _overlaps(busy, start, start + step)
        if blocker is not None:
            blockers.setdefault(blocker.what)
            continue
        slots.append(k)
    if slots:
        return slots, ""
    step_s = step / 1000
    if scanned == 0:
        return slots, (
            f"the change windows of group {group.group_id!r} hold no slot of {step_s:g} s"
            " that starts after now"
        )
    if in_policy == 0:
        assert policy is not None
        return slots, (
            f"none of the {scanned} slots of {step_s:g} s in the change windows of group "
            f"{group.group_id!r} lies inside policy {policy.name!r} ({policy.description}) "
            f"in time zone {tz_name}"
        )
    listed = ", ".join(list(blockers)[:5]) + (
        f" and {len(blockers) - 5} more" if len(blockers) > 5 else ""
    )
    return slots, f"all {in_policy} slots it could use are taken by {listed}"


def _reason(problem: Problem, cls: _Class, options: Options) -> tuple[str, str]:
    if not cls.usable:
        return "AvailabilityConstraint", cls.why_none
    limit = f"at most {problem.concurrency} at once"
    if options.attribute and options.attribute_limit and cls.attribute is not None:
        limit += f", {options.attribute_limit} with {options.attribute} {cls.attribute}"
    return (
        "ConcurrencyConstraint",
        f"all {cls.usable} slots it could use in group {cls.group.group_id!r} are full ({limit})",
    )


def _iso_ms(ms: int) -> str:
    """CMSO's optimizer time format: 2019-04-05T12:00:00.000+0000."""
    return (
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{ms % 1000:03d}+0000"
    )


def optimizer_response(problem: Problem, result: Plan) -> dict:
    """The plan as CMSO's OptimizerResponse (reference/cmso.md 4.1), keeping its field names
    (`notScheduledReaons` is CMSO's spelling); `objective` and `solveMs` are ours."""
    group_of = {n: g.group_id for g in problem.groups for n in g.elements}
    duration_s = problem.duration_ms // 1000
    scheduled = [
        {
            "elementId": name,
            "groupId": group_of[name],
            "scheduleType": "INDIVIDUAL",
            "startTime": _iso_ms(start),
            "endTime": _iso_ms(start + problem.duration_ms),
            "durationSeconds": duration_s,
        }
        for name, start in sorted(result.placed.items(), key=lambda item: (item[1], item[0]))
    ]
    unscheduled = [
        {
            "elementId": name,
            "groupId": group_of[name],
            "notScheduledReaons": [reason],
            "notScheduledMessages": [message],
        }
        for name, (reason, message) in result.unplaced.items()
    ]
    return {
        "requestId": problem.schedule_id,
        "status": "COMPLETED" if result.placed else "FAILED",
        "errorMessage": "" if result.placed else result.summary,
        "schedules": [{"scheduledElements": scheduled, "unScheduledElements": unscheduled}],
        "objective": result.objective,
        "solveMs": round(result.solve_ms, 1),
        "summary": result.summary,
        "detail": result.detail,
    }
