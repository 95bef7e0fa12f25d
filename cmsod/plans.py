"""The plan an approval is bound to, as pure functions (no I/O): its fingerprint, the
difference between two plans, when an approval must be refused, the re-plan of slots that
have passed, and when a schedule left pending approval expires (README "Approving the plan
you saw").

A plan is each placed element's slot: {name: (start_ms, finish_ms)}. Its fingerprint is the
first 12 hex digits of SHA-256 over a canonical JSON encoding of the format tag, the schedule
id and the slots sorted by element name: the same plan of the same schedule always has the
same fingerprint (on any host, after any restart, and for `cmsoctl plan` of the same request
planned the same way); moving any slot by a millisecond changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import msgspec

from cmsod.errors import RequestError
from cmsod.gates import next_free_slot  # the carry-over's own rule: one copy of it
from cmsod.lifecycle import format_time

FORMAT = "cmsod-plan-1"
FINGERPRINT_HEX = 12
MAX_LISTED = 20  # slot changes named in a refusal; the rest are counted

Slot = tuple[int, int]  # start_ms, finish_ms
Slots = Mapping[str, Slot]


def fingerprint(schedule_id: str, slots: Slots) -> str | None:
    """The plan's fingerprint; None for a schedule with no slot (not planned yet, immediate)."""
    if not slots:
        return None
    body = msgspec.json.encode([FORMAT, schedule_id, _rows(slots)])
    return hashlib.sha256(body).hexdigest()[:FINGERPRINT_HEX]


def _rows(slots: Slots) -> list[tuple[str, int, int]]:
    """[name, start, finish] sorted by name (names are unique within a schedule)."""
    return [(name, start, finish) for name, (start, finish) in sorted(slots.items())]


def of_placement(schedule_id: str, placed: Mapping[str, int], duration_ms: int) -> str | None:
    """The fingerprint an optimizer result will have once stored (each placed element's slot
    is start .. start + duration): what `cmsoctl plan` and `cmsod plan` show."""
    return fingerprint(schedule_id, {n: (s, s + duration_ms) for n, s in placed.items()})


def encode(slots: Slots) -> bytes:
    """The slots as stored beside their fingerprint (to name the difference later)."""
    return msgspec.json.encode(_rows(slots))


def decode(data: bytes | str) -> dict[str, Slot]:
    return {
        name: (start, finish)
        for name, start, finish in msgspec.json.decode(data, type=list[tuple[str, int, int]])
    }


class Change(msgspec.Struct, frozen=True):
    """One element whose slot differs: `old` or `new` None when it had or has no slot."""

    vnfName: str
    old: Slot | None
    new: Slot | None

    def words(self) -> str:
        return f"{self.vnfName} {_slot(self.old)} -> {_slot(self.new)}"

    def to_view(self) -> dict[str, str | None]:
        return {
            "vnfName": self.vnfName,
            "oldStartTime": format_time(self.old[0]) if self.old else None,
            "oldFinishTime": format_time(self.old[1]) if self.old else None,
            "startTime": format_time(self.new[0]) if self.new else None,
            "finishTime": format_time(self.new[1]) if self.new else None,
        }


def _slot(slot: Slot | None) -> str:
    if slot is None:
        return "no slot"
    return f"{format_time(slot[0])}..{format_time(slot[1])}"


def difference(old: Slots, new: Slots) -> list[Change]:
    """The elements whose slot moved, appeared or went, by element name."""
    return [
        Change(name, old.get(name), new.get(name))
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    ]


def passed(slots: Slots, now_ms: int, grace_ms: int = 0) -> list[str]:
    """The elements whose slot has passed: its start plus the misfire grace is before now, so
    the dispatcher would no longer send it (it would end `Past due`), earliest first. One a
    little late, within the grace, is still sent as approved, as the dispatcher does for
    any element (the same rule as the carry-over at a resume)."""
    limit = now_ms - grace_ms
    return sorted((n for n, (start, _) in slots.items() if start < limit), key=lambda n: slots[n])


def _listed(lines: list[str]) -> str:
    shown = lines[:MAX_LISTED]
    more = len(lines) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def refusal(
    schedule_id: str,
    given: str | None,
    slots: Slots,
    given_slots: Slots | None,
    now_ms: int,
    grace_ms: int = 0,
) -> RequestError | None:
    """Why an approval of `given` (the fingerprint the approver saw; None: whatever the plan
    is) must be refused now, or None. The plan changed: 409 PLAN_CHANGED naming each slot
    that moved (old -> new) when the old plan is known. Slots have passed (`passed`): 409
    PLAN_PASSED naming them. Either is lifted by re-planning first (`approve --replan`)."""
    current = fingerprint(schedule_id, slots)
    if given is not None and given != current:
        if given_slots is None:
            detail = f"{given} is not a plan cmsod made for this schedule"
        else:
            detail = "moved: " + _listed([c.words() for c in difference(given_slots, slots)])
        return RequestError(
            409, "PLAN_CHANGED", schedule_id, given, current or "none", detail=detail
        )
    late = passed(slots, now_ms, grace_ms)
    if late:
        words = [f"{n} {format_time(slots[n][0])}" for n in late]
        return RequestError(
            409,
            "PLAN_PASSED",
            schedule_id,
            current or "none",
            format_time(now_ms),
            detail=f"{len(late)} slot(s) passed: " + _listed(words),
        )
    return None


class Element(msgspec.Struct, frozen=True):
    """What re-placing one element needs: its slot, its group's windows, the spans it must
    keep clear of (the availability book, other schedules' work on it and what it requires)."""

    name: str
    slot: Slot
    windows: tuple[tuple[int, int], ...]
    blocked: tuple[tuple[int, int], ...] = ()


def replan(
    elements: Iterable[Element],
    origin_ms: int,
    duration_ms: int,
    concurrency: int,
    now_ms: int,
    grace_ms: int = 0,
) -> tuple[dict[str, Slot], list[str]]:
    """Re-place the elements whose slot has passed (`passed`) into the next free slot of their
    windows from now, by the carry-over's rules (`gates.next_free_slot`: the schedule's slot grid,
    its concurrency limit, clear of blocked spans); the others keep theirs. Earliest first.
    Returns the new plan and the elements that have no free slot left."""
    items = list(elements)
    plan = {e.name: e.slot for e in items}
    late = set(passed(plan, now_ms, grace_ms))
    taken: dict[int, int] = {}
    for e in items:
        if e.name not in late:
            taken[e.slot[0]] = taken.get(e.slot[0], 0) + 1
    stuck = []
    for e in sorted((e for e in items if e.name in late), key=lambda e: (e.slot, e.name)):
        slot = next_free_slot(
            list(e.windows), origin_ms, duration_ms, now_ms, list(e.blocked), taken, concurrency
        )
        if slot is None:
            stuck.append(e.name)
            continue
        taken[slot] = taken.get(slot, 0) + 1
        plan[e.name] = (slot, slot + duration_ms)
    return plan, stuck


def expires_at(
    first_start_ms: int | None, planned_ms: int | None, timeout_ms: int, grace_ms: int = 0
) -> int | None:
    """When a schedule left `Pending Approval` expires: `timeout_ms` after it was planned when
    one is configured (`[optimizer] approval_timeout_s`), else once its first slot has passed
    (`passed`: its start plus the misfire grace `grace_ms`, `[dispatcher] misfire_grace_s`, is
    before now; the millisecond after), so an approval a little late, within the grace, is
    still taken."""
    if timeout_ms > 0 and planned_ms is not None:
        return planned_ms + timeout_ms
    return None if first_start_ms is None else first_start_ms + grace_ms + 1


def expiry_reason(
    first_start_ms: int | None, planned_ms: int | None, timeout_ms: int, grace_ms: int = 0
) -> str:
    if timeout_ms > 0 and planned_ms is not None:
        return (
            f"not approved within {timeout_ms / 1000:g} s of its plan"
            f" ({format_time(planned_ms)}; [optimizer] approval_timeout_s)"
        )
    return (
        f"not approved before its first slot passed ({format_time(first_start_ms)}"
        f" + {grace_ms / 1000:g} s; [dispatcher] misfire_grace_s)"
    )
