"""Policies: when an element may be changed, as periods of local time on days of the week.

Our own TOML format (etc/cmsod/policies/<name>.toml; the file name is the policy's name;
`config.load_policies` reads them):

    description = "00:00-06:00 local time, Monday to Friday"
    [[allowed]]
    days = ["mon", "tue", "wed", "thu", "fri"]
    start = "00:00"
    end = "06:00"          # "24:00" is the next midnight

A period is read in the element's time zone, so daylight-saving changes move it in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from cmsod.optimize.problem import merge

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: list[str] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Clock = Annotated[str, msgspec.Meta(pattern=r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")]


class Period(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    days: Annotated[list[Day], msgspec.Meta(min_length=1, max_length=7)]
    start: Clock
    end: Clock

    def minutes(self) -> tuple[int, int]:
        (sh, sm), (eh, em) = (map(int, self.start.split(":")), map(int, self.end.split(":")))
        return sh * 60 + sm, eh * 60 + em


class Policy(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    allowed: Annotated[list[Period], msgspec.Meta(min_length=1, max_length=100)]
    description: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        for period in self.allowed:
            start, end = period.minutes()
            if end <= start:
                raise ValueError(f"period end {period.end} must be after its start {period.start}")


def _every_day(start: str, end: str, days: list[str] = DAYS) -> list[Period]:
    return [Period(days=days, start=start, end=end)]  # type: ignore[arg-type]


# CMSO's four policies, built in so the embedded defaults need no files; etc/cmsod/policies/
# ships the same four (a test keeps them equal) for operators to copy and extend.
BUILTIN: dict[str, Policy] = {
    "AllDayEveryDay": Policy(_every_day("00:00", "24:00"), "Any time, every day", "AllDayEveryDay"),
    "EveryDay_00_06": Policy(
        _every_day("00:00", "06:00"), "00:00-06:00 local time, every day", "EveryDay_00_06"
    ),
    "Weekday_00_06": Policy(
        _every_day("00:00", "06:00", DAYS[:5]),
        "00:00-06:00 local time, Monday to Friday",
        "Weekday_00_06",
    ),
    "Weekend_00_06": Policy(
        _every_day("00:00", "06:00", DAYS[5:]),
        "00:00-06:00 local time, Saturday and Sunday",
        "Weekend_00_06",
    ),
}


TIME_ZONE_KEYS = ("timezone", "timeZone")  # the element data naming its zone, first wins


def zone(name: str | None) -> ZoneInfo:
    """The element's time zone; UTC when it has none. Raises ValueError naming an unknown one."""
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def allowed_windows(
    policy: Policy, tz: ZoneInfo, start_ms: int, end_ms: int
) -> list[tuple[int, int]]:
    """The policy's allowed periods as UTC [start, end) intervals, merged (touching ones join),
    for every local day from the day before `start_ms` to the day after `end_ms`; those that
    start after `end_ms` or end before `start_ms` are left out."""
    first = datetime.fromtimestamp(start_ms / 1000, UTC).astimezone(tz).date() - timedelta(days=1)
    last = datetime.fromtimestamp(end_ms / 1000, UTC).astimezone(tz).date() + timedelta(days=1)
    intervals = []
    day = first
    while day <= last:
        weekday = DAYS[day.weekday()]
        midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
        for period in policy.allowed:
            if weekday in period.days:
                begin, finish = period.minutes()
                # wall-clock arithmetic in the zone, then to UTC (DST-aware)
                local_start = midnight + timedelta(minutes=begin)
                local_end = midnight + timedelta(minutes=finish)
                s = int(local_start.astimezone(UTC).timestamp() * 1000)
                e = int(local_end.astimezone(UTC).timestamp() * 1000)
                if e >= start_ms and s <= end_ms:
                    intervals.append((s, e))
        day += timedelta(days=1)
    return merge(intervals)


def contains(windows: list[tuple[int, int]], start_ms: int, end_ms: int) -> bool:
    """Whether [start, end) lies wholly inside one of the (merged, sorted) windows."""
    lo, hi = 0, len(windows)
    while lo < hi:  # the last window starting at or before start_ms
        mid = (lo + hi) // 2
        if windows[mid][0] <= start_ms:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and windows[lo - 1][1] >= end_ms
