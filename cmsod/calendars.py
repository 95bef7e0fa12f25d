"""Freeze calendars: periods in which no change may run (holidays, network freezes), from
configuration files. Pure: reading the files is `config.load_calendars`; this decodes their
content, and answers which periods deny which element over a span of time.

A calendar file (TOML; also inline under `[[calendars.deny]]` in cmsod.toml):

    timezone = "Europe/Paris"        # its periods' zone, unless one gives its own; default UTC

    [[deny]]
    name = "Christmas"
    from = "12-24"                   # yearly: month-day (or "12-24T18:00"), every year
    to = "12-26"                     # a date or month-day `to` is inclusive: to 12-27 00:00
    yearly = true

    [[deny]]
    name = "Core network freeze"
    from = "2026-11-27T18:00"        # a local date and time (or a date: from its midnight)
    to = "2026-11-30"
    scope = { region = "eu" }        # only elements whose attributes say so (all must match)

    [[deny]]
    name = "PAR1 power works"
    date = "2026-12-15"              # one whole day
    scope = { site = "PAR1" }
    timezone = "UTC"

Times are local times of the period's zone, so a period follows daylight saving. The scope
matches the element's attributes: its data in the request over the inventory's, and
`vnfName` (its name). No scope: every element.
"""

from __future__ import annotations

import calendar
import functools
import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

import msgspec

from cmsod.optimize.policies import zone

MAX_PERIODS = 10_000  # per file, and inline
MAX_FILES = 100
MAX_YEARS = 200  # a yearly period is expanded over at most this many years of a plan

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Value = Annotated[str, msgspec.Meta(max_length=1024)]
When = Annotated[str, msgspec.Meta(max_length=40)]

DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2}))?$")
MONTH_DAY = re.compile(r"^(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2}))?$")


class Deny(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One deny period as written."""

    name: Name
    date: When | None = None
    from_: When | None = msgspec.field(default=None, name="from")
    to: When | None = None
    yearly: bool = False
    timezone: Annotated[str, msgspec.Meta(max_length=100)] | None = None
    scope: Annotated[dict[Key, Value], msgspec.Meta(max_length=16)] = {}
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class CalendarFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    deny: Annotated[list[Deny], msgspec.Meta(max_length=MAX_PERIODS)] = []
    timezone: Annotated[str, msgspec.Meta(max_length=100)] = "UTC"


class Period(msgspec.Struct, frozen=True):
    """A deny period, checked: a span of local time, once or every year, in one zone."""

    name: str
    source: str  # the file it came from ("cmsod.toml" for inline ones)
    tz: str
    start: tuple[int, int, int, int, int]  # (year or 0 when yearly, month, day, hour, minute)
    end: tuple[int, int, int, int, int]  # exclusive
    scope: tuple[tuple[str, str], ...] = ()
    reason: str = ""

    @property
    def yearly(self) -> bool:
        return self.start[0] == 0

    @property
    def what(self) -> str:
        """How a hold or an unplaced element names it."""
        return f"calendar {self.name!r} ({self.source})"

    def applies(self, attributes: dict[str, str]) -> bool:
        return all(attributes.get(k) == v for k, v in self.scope)

    def spans(self, from_ms: int, to_ms: int) -> list[tuple[int, int]]:
        """Its occurrences that overlap [from_ms, to_ms), as UTC ms [start, end). Each year's
        occurrence is computed once (a due batch asks the same periods for every element)."""
        if not self.yearly:
            span = _occurrence(self, 0)
            return [span] if span is not None and span[0] < to_ms and span[1] > from_ms else []
        # the years around the span (approximately: occurrences outside it are dropped below)
        first = 1970 + from_ms // YEAR_MS - 2
        last = min(1970 + min(to_ms, MAX_MS) // YEAR_MS + 1, first + MAX_YEARS, 9998)
        out = []
        for year in range(max(first, 1), last + 1):
            span = _occurrence(self, year)
            if span is not None and span[0] < to_ms and span[1] > from_ms:
                out.append(span)
        return out

    def describe(self) -> str:
        def text(t: tuple[int, int, int, int, int]) -> str:
            y, m, d, hh, mm = t
            return (f"{y:04d}-" if y else "") + f"{m:02d}-{d:02d}T{hh:02d}:{mm:02d}"

        every = "every year " if self.yearly else ""
        scope = ", ".join(f"{k}={v}" for k, v in self.scope) or "every element"
        return f"{every}{text(self.start)} to {text(self.end)} {self.tz}, {scope}"


MAX_MS = 253402300799000  # 9999-12-31T23:59:59Z
YEAR_MS = 31_556_952_000  # a Gregorian year on average


@functools.lru_cache(maxsize=65536)
def _occurrence(period: Period, year: int) -> tuple[int, int] | None:
    """The period's occurrence in `year` (0: a period that is not yearly), UTC ms; None when
    it has none that year. In a common year Feb 29 (any time of it) is Mar 1 00:00: a period
    from or to it covers the days around it, and one within it (`date = "02-29"`) is absent."""
    tz = ZoneInfo(period.tz)
    if not period.yearly:
        return _ms(period.start, tz, end=False), _ms(period.end, tz, end=True)
    wraps = period.end[1:] <= period.start[1:]  # Dec 31 to Jan 2: ends the next year
    start = _ms(_in_year(period.start, year), tz, end=False)
    end = _ms(_in_year(period.end, year + wraps), tz, end=True)
    return (start, end) if end > start else None


def _in_year(t: tuple[int, int, int, int, int], year: int) -> tuple[int, int, int, int, int]:
    _, m, d, hh, mm = t
    if (m, d) == (2, 29) and not calendar.isleap(year):
        return (year, 3, 1, 0, 0)
    return (year, m, d, hh, mm)


def _ms(t: tuple[int, int, int, int, int], tz: ZoneInfo, *, end: bool) -> int:
    """A local time as UTC ms. A time the clocks pass twice (autumn) or skip (spring) has two
    readings, one per UTC offset around the change: a start takes the earlier, an end the
    later, so a period never shrinks (to nothing, for one within the skipped hour)."""
    y, m, d, hh, mm = t
    if hh == 24:  # an inclusive end day: the next midnight
        day = date(y, m, d) + timedelta(days=1)
        y, m, d, hh = day.year, day.month, day.day, 0
    readings = [
        int(datetime(y, m, d, hh, mm, tzinfo=tz, fold=fold).astimezone(UTC).timestamp() * 1000)
        for fold in (0, 1)
    ]
    return max(readings) if end else min(readings)


def compile_file(content: CalendarFile, source: str) -> list[Period]:
    """Check every period of a decoded file; ValueError naming the period (its index, from 0,
    and its name) and the field."""
    return [compile_deny(d, content.timezone, source, i) for i, d in enumerate(content.deny)]


def compile_deny(d: Deny, default_tz: str, source: str, index: int) -> Period:
    where = f"deny[{index}] ({d.name!r})"
    tz = d.timezone or default_tz
    try:
        zone(tz)
    except ValueError as exc:
        raise ValueError(f"{where}.timezone: {exc}") from None
    if d.date is not None and (d.from_ is not None or d.to is not None):
        raise ValueError(f"{where}: `date` or `from` and `to`, not both")
    if d.date is None and (d.from_ is None or d.to is None):
        raise ValueError(f"{where}: needs `date`, or `from` and `to`")
    first = _point(d.date or d.from_ or "", d.yearly, f"{where}.{'date' if d.date else 'from'}")
    last = _point(d.date or d.to or "", d.yearly, f"{where}.{'date' if d.date else 'to'}")
    if last[3:] == (0, 0) and (d.date is not None or len(d.to or "") in (5, 10)):
        last = (*last[:3], 24, 0)  # a day given as the end: the whole day
    if not d.yearly and _ms(last, ZoneInfo(tz), end=True) <= _ms(first, ZoneInfo(tz), end=False):
        raise ValueError(f"{where}.to: the period must end after it starts")
    if d.yearly and last[1:] == first[1:]:
        raise ValueError(f"{where}.to: the period must end after it starts")
    return Period(d.name, source, tz, first, last, tuple(sorted(d.scope.items())), d.reason)


def _point(text: str, yearly: bool, where: str) -> tuple[int, int, int, int, int]:
    m = (MONTH_DAY if yearly else DATE).match(text)
    if m is None:
        shape = "MM-DD or MM-DDTHH:MM (yearly)" if yearly else "YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        raise ValueError(f"{where}: {text!r} is not {shape}")
    parts = [int(p) if p is not None else 0 for p in m.groups()]
    if yearly:
        parts = [0, *parts]
    y, mo, d, hh, mm = parts
    try:
        datetime.combine(date(y or 2000, mo, d), time(hh, mm))  # 2000: Feb 29 is a day
    except ValueError as exc:
        raise ValueError(f"{where}: {text!r}: {exc}") from None
    return (y, mo, d, hh, mm)


class Calendars:
    """Every period in force (files and inline), and what each element's attributes make of
    them. Immutable once built; it remembers the periods' occurrences over the spans it was
    asked about (a due batch asks about one slot for many elements)."""

    __slots__ = ("_memo", "periods")

    def __init__(self, periods: tuple[Period, ...] = ()) -> None:
        self.periods = tuple(periods)
        self._memo: dict[tuple[int, int], list[tuple[Period, list[tuple[int, int]]]]] = {}

    def __bool__(self) -> bool:
        return bool(self.periods)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calendars) and other.periods == self.periods

    def __hash__(self) -> int:
        return hash(self.periods)

    def __repr__(self) -> str:
        return f"Calendars({self.periods!r})"

    def occurring(self, from_ms: int, to_ms: int) -> list[tuple[Period, list[tuple[int, int]]]]:
        """The periods with an occurrence over [from_ms, to_ms), with those occurrences."""
        key = (from_ms, to_ms)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= 4096:
                self._memo.clear()
            found = [(p, spans) for p in self.periods if (spans := p.spans(from_ms, to_ms))]
            self._memo[key] = found
        return found

    def denied(
        self, name: str, attributes: dict[str, str], from_ms: int, to_ms: int
    ) -> list[tuple[int, int, str]]:
        """The periods denying this element over [from_ms, to_ms): (start, end, what)."""
        if not self.periods:
            return []
        occurring = self.occurring(from_ms, to_ms)
        if not occurring:
            return []
        attrs: dict[str, str] | None = None
        out = []
        for period, spans in occurring:
            if period.scope:
                attrs = attrs if attrs is not None else {"vnfName": name, **attributes}
                if not period.applies(attrs):
                    continue
            out += [(a, b, period.what) for a, b in spans]
        out.sort()
        return out

    def next_periods(self, now_ms: int, count: int = 5) -> list[tuple[int, int, Period]]:
        """The periods in force now or next (for `status`), soonest first."""
        horizon = now_ms + 2 * 366 * 86400_000
        found = sorted(
            ((a, b, p) for p in self.periods for a, b in p.spans(now_ms, horizon)),
            key=lambda x: (x[0], x[2].name),
        )
        return found[:count]


def merged_attributes(
    name: str, data: dict[str, str] | None, inventory: dict[str, dict[str, str]]
) -> dict[str, str]:
    """An element's attributes: the inventory's, under the request's own data."""
    return {**inventory.get(name, {}), **(data or {})}
