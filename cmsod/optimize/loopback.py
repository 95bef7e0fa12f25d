"""Loop-back placement: each element at the earliest slot of its group's windows that still
has room under the concurrency limit (CMSO's loop-back optimizer, every window honoured)."""

from __future__ import annotations

from cmsod.optimize.problem import Plan, Problem


def place_earliest(problem: Problem) -> Plan:
    load: dict[int, int] = {}
    placed: dict[str, int] = {}
    unplaced: dict[str, tuple[str, str]] = {}
    step_s = problem.duration_ms / 1000
    for group in problem.groups:
        slots = problem.slots(group.windows)
        slot = next(slots, None)  # loads only grow: the first slot with room only moves forward
        seen_slots = 0 if slot is None else 1
        for name in group.elements:
            while slot is not None and load.get(slot, 0) >= problem.concurrency:
                slot = next(slots, None)
                seen_slots += slot is not None
            if slot is not None:
                load[slot] = load.get(slot, 0) + 1
                placed[name] = problem.slot_start(slot)
            elif not seen_slots:
                unplaced[name] = (
                    "AvailabilityConstraint",
                    f"the change windows of group {group.group_id!r} hold no slot of {step_s:g} s"
                    " that starts after now",
                )
            else:
                unplaced[name] = (
                    "ConcurrencyConstraint",
                    f"all {seen_slots} slots of {step_s:g} s in the change windows of group "
                    f"{group.group_id!r} are full (concurrencyLimit {problem.concurrency})",
                )
    summary = (
        f"loopback: {len(placed)} scheduled, {len(unplaced)} not scheduled, {len(load)} slots used"
    )
    return Plan(placed, unplaced, problem.duration_ms, summary)
