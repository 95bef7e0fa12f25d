"""From a schedule's problem to a plan: which slots each element may use, then the exact
solver, then start times and, for each element left out, the reason and the limit or the
unavailability that kept it out.

A slot (see `problem.Grid`) is usable by an element when it lies wholly inside the element's
group's change windows, starts no earlier than `not_before_ms`, lies wholly inside one allowed
period of the schedule's policy read in the element's time zone, and overlaps none of the
element's busy times (tickets, blackouts, other schedules' work; intervals are half-open, so
back-to-back work does not conflict).

The slots a group offers in one time zone (windows and policy) are computed once, lazily, as
the grid points inside the intersection of the two; an element's busy times then cut index
ranges out of that list (two bisections per busy time), and elements with the same busy times,
time zone and attribute are one class. Only the first `n` usable slots of an element can
matter, n being the number of elements: an optimal plan never puts an element later, because
among its first n usable slots one always has room (fewer than n other elements exist to fill
them). That bound keeps long windows with short slots cheap.

An element without the limited attribute (`[optimizer] attribute`) is not limited by it: the
limit is on elements sharing a value, and an element without one shares none. (Refusing the
request instead would make every request with one such element unplannable.)
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

from cmsod.calendars import Calendars
from cmsod.optimize.policies import TIME_ZONE_KEYS, Policy, allowed_windows, zone
from cmsod.optimize.problem import Busy, Grid, Plan, Problem, merge
from cmsod.optimize.solver import FREE, Instance, solve

MAX_SCAN = 2_000_000  # slots offered per group and time zone, at most


@dataclass
class Options:
    attribute: str | None = None  # e.g. "site": at most attribute_limit per value at once
    attribute_limit: int | None = None


@dataclass
class Planning:
    """What planning needs besides the problem: policies, the inventory, the options and the
    freeze calendars."""

    policies: dict[str, Policy]
    inventory: dict[str, dict[str, str]]
    options: Options
    calendars: Calendars = field(default_factory=Calendars)

    def plan(self, problem: Problem) -> Plan:
        """Plan with the inventory's element data under the request's own; the freeze
        calendars' periods are busy times (deny beats allow: no slot overlaps one)."""
        if self.inventory:
            names = [n for g in problem.groups for n in g.elements]
            problem.element_data = {
                n: {**self.inventory.get(n, {}), **problem.element_data.get(n, {})} for n in names
            }
        if self.calendars:
            problem.busy = calendar_busy(problem, self.calendars)
        return plan(problem, self.policies, self.options)


def calendar_busy(problem: Problem, calendars: Calendars) -> dict[str, list[Busy]]:
    """The problem's busy times with the calendars' periods over its windows added: each
    period is expanded once, then given to the elements its scope matches."""
    windows = [w for g in problem.groups for w in g.windows]
    if not windows:
        return problem.busy
    lo, hi = min(a for a, _ in windows), max(b for _, b in windows)
    expanded = [(p, [Busy(a, b, p.what) for a, b in p.spans(lo, hi)]) for p in calendars.periods]
    expanded = [(p, spans) for p, spans in expanded if spans]
    if not expanded:
        return problem.busy
    busy = {name: list(spans) for name, spans in problem.busy.items()}
    for group in problem.groups:
        for name in group.elements:
            attrs = {"vnfName": name, **problem.element_data.get(name, {})}
            for period, spans in expanded:
                if period.applies(attrs):
                    busy.setdefault(name, []).extend(spans)
    return busy


class _Offer:
    """The slots one group offers in one time zone (inside its windows and the policy's
    allowed periods), ascending, extended on demand up to MAX_SCAN."""

    def __init__(self, source: Iterator[int]) -> None:
        self.starts: list[int] = []
        self._source = source
        self.complete = False

    def upto(self, count: int, after: int | None = None) -> None:
        """Extend until it holds `count` slots or, with `after`, one starting after it."""
        starts = self.starts
        while not self.complete and len(starts) < min(count, MAX_SCAN):
            if after is not None and starts and starts[-1] > after:
                return
            nxt = next(self._source, None)
            if nxt is None:
                self.complete = True
            else:
                starts.append(nxt)
        self.complete = self.complete or len(starts) >= MAX_SCAN


@dataclass
class _Class:
    windows: list[tuple[int, int]]  # of its elements' groups (merged)
    names: list[str]
    slots: list[int]  # the starts of the slots it may use (the solver's list, shared)
    offer: _Offer
    busy: list[Busy]
    tz_name: str
    attribute: str | None


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
        grid, classes, instance = instance_for(problem, policy, options)
    except ValueError as exc:  # an unknown time zone in the element data
        return _failed(problem, names, "AvailabilityConstraint", str(exc))
    solution = solve(instance)
    load: dict[int, int] = {}
    for slots in solution.placed:
        for slot, n in slots.items():
            load[slot] = load.get(slot, 0) + n

    placed: dict[str, int] = {}
    unplaced: dict[str, tuple[str, str]] = {}
    group_of: dict[str, str] = {}
    for cls, slots in zip(classes, solution.placed, strict=True):
        starts = [s for s, n in sorted(slots.items()) for _ in range(n)]
        placed.update(zip(cls.names, starts, strict=False))
        if len(starts) < len(cls.names):
            group_of = group_of or {n: g.group_id for g in problem.groups for n in g.elements}
            reasons: dict[str, tuple[str, str]] = {}
            for name in cls.names[len(starts) :]:
                group_id = group_of[name]
                if group_id not in reasons:
                    reasons[group_id] = _reason(problem, cls, group_id, options, grid, policy, load)
                unplaced[name] = reasons[group_id]
    objective = sum(map(grid.number, placed.values()))
    offers = {id(c.offer): len(c.offer.starts) for c in classes}
    work = sum(offers.values()) + sum(map(len, instance.available)) + solution.searches
    solve_ms = (time.perf_counter() - began) * 1000
    # the operator's words; the solver's own figures go to `detail` (--json, the debug log)
    summary = f"{len(placed)} scheduled, {len(unplaced)} not scheduled"
    detail = (
        f"optimal: objective {objective} (sum of slot numbers), "
        f"{len(set().union(*instance.available))} slots, "
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
        work=work,
    )


def instance_for(
    problem: Problem, policy: Policy | None, options: Options
) -> tuple[Grid, list[_Class], Instance]:
    """The solver's instance: the slots, the element classes and their usable slots (the
    benchmark hands the same instance to an independent flow solver)."""
    grid = problem.grid()
    n = sum(len(g.elements) for g in problem.groups)
    classes = _classes(problem, grid, policy, options, n)
    limited = bool(options.attribute and options.attribute_limit)
    values = {v: i for i, v in enumerate(sorted({c.attribute for c in classes if c.attribute}))}
    instance = Instance(
        limit=problem.concurrency,
        available=[c.slots for c in classes],
        counts=[len(c.names) for c in classes],
        attributes=[values[c.attribute] if c.attribute else FREE for c in classes],
        attribute_limit=options.attribute_limit if limited else None,
    )
    return grid, classes, instance


def _failed(problem: Problem, names: list[str], reason: str, why: str) -> Plan:
    return Plan({}, {n: (reason, why) for n in names}, problem.duration_ms, why)


def _classes(
    problem: Problem, grid: Grid, policy: Policy | None, options: Options, n: int
) -> list[_Class]:
    """Elements with the same change windows, time zone, busy times and attribute value form
    one class, whichever group they are in (a request with one group per site and the same
    windows costs what one group costs; a site-wide blackout gives every element of the site
    the same busy times)."""
    classes: list[_Class] = []
    shared: dict[tuple, _Class] = {}
    offers: dict[tuple, _Offer] = {}
    for group in problem.groups:
        windows = merge(group.windows)
        for name in group.elements:
            data = problem.element_data.get(name, {})
            tz_name = next((data[k] for k in TIME_ZONE_KEYS if data.get(k)), "UTC")
            attribute = (data.get(options.attribute) or None) if options.attribute else None
            busy = problem.busy.get(name, [])
            key = (*windows, tz_name, attribute, *busy)
            cls = shared.get(key)
            if cls is not None:
                cls.names.append(name)
                continue
            offer = offers.get((*windows, tz_name))
            if offer is None:
                offer = _Offer(_offered(grid, windows, policy, tz_name))
                offers[(*windows, tz_name)] = offer
            slots = _usable(offer, busy, grid.step, n)
            cls = _Class(windows, [name], slots, offer, busy, tz_name, attribute)
            shared[key] = cls
            classes.append(cls)
    return classes


def _offered(
    grid: Grid, windows: list[tuple[int, int]], policy: Policy | None, tz_name: str
) -> Iterator[int]:
    if policy is None or not windows:
        return grid.slots(windows)
    allowed = allowed_windows(policy, zone(tz_name), windows[0][0], windows[-1][1])
    return grid.slots(windows, allowed)


def _usable(offer: _Offer, busy: list[Busy], step: int, n: int) -> list[int]:
    """The first n slots of the offer that overlap none of the busy times. A slot starting at
    t overlaps [b, e) when b - step < t < e: each busy time removes one run of the offer."""
    spans = merge([(b.start_ms - step + 1, b.end_ms) for b in busy])  # t in [lo, hi) blocked
    out: list[int] = []
    pos = 0
    starts = offer.starts
    for lo, hi in spans:
        enough = pos + n - len(out)
        offer.upto(enough, lo)
        cut = bisect_left(starts, lo, pos)
        if cut >= enough:
            break
        out += starts[pos:cut]
        offer.upto(MAX_SCAN, hi)
        pos = bisect_left(starts, hi, cut)
    offer.upto(pos + n - len(out))
    out += starts[pos : pos + n - len(out)]
    return out


def _reason(
    problem: Problem,
    cls: _Class,
    group_id: str,
    options: Options,
    grid: Grid,
    policy: Policy | None,
    load: dict[int, int],
) -> tuple[str, str]:
    """Why elements of this class are left out: what took every slot they could use, or which
    limits filled them (the concurrency limit, the attribute limit, or each in some)."""
    if not cls.slots:
        return "AvailabilityConstraint", _why_none(cls, group_id, grid, policy)
    usable = len(cls.slots)
    full = usable  # slots at the concurrency limit; the others are at the attribute limit
    if cls.attribute is not None and options.attribute_limit:
        full = sum(load.get(slot, 0) >= problem.concurrency for slot in cls.slots)
    limits = []
    if full:
        limits.append(f"at most {problem.concurrency} at once")
    if full < usable:
        limits.append(f"at most {options.attribute_limit} with {options.attribute}={cls.attribute}")
    if full and full < usable:
        limits = [f"{limits[0]} in {full}", f"{limits[1]} in {usable - full}"]
    return (
        "ConcurrencyConstraint",
        f"all {usable} slots it could use in group {group_id!r} are full ({', '.join(limits)})",
    )


def _why_none(cls: _Class, group_id: str, grid: Grid, policy: Policy | None) -> str:
    step_s = grid.step / 1000
    if not cls.offer.starts:
        in_windows = sum(1 for _ in islice(grid.slots(cls.windows), MAX_SCAN))
        if in_windows == 0:
            return (
                f"the change windows of group {group_id!r} hold no slot of {step_s:g} s"
                " that starts after now"
            )
        assert policy is not None
        return (
            f"none of the {in_windows} slots of {step_s:g} s in the change windows of group "
            f"{group_id!r} lies inside policy {policy.name!r} ({policy.description}) "
            f"in time zone {cls.tz_name}"
        )
    blockers: dict[str, None] = {}
    for start in cls.offer.starts:
        for b in cls.busy:
            if b.start_ms < start + grid.step and start < b.end_ms:
                blockers.setdefault(b.what)
                break
    listed = ", ".join(list(blockers)[:5]) + (
        f" and {len(blockers) - 5} more" if len(blockers) > 5 else ""
    )
    return f"all {len(cls.offer.starts)} slots it could use are taken by {listed}"


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
