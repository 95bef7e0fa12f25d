"""A schedule's plan and progress as a chart: in the terminal (a time axis with ticks, one row
per element or per group, colours by status on a terminal, the concurrency profile under it)
or as an SVG picture (axis and grid, legend, planned and actual bars coloured by status, the
concurrency profile against the limit, groups rolled up for large schedules). Pure: it reads
a schedule view (`io.cmsod.Schedules.Get`) and returns text."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from html import escape
from typing import Any

# Status -> (SVG colour, ANSI colour code, terminal mark). Marks differ so that the chart
# reads without colour too; ended-badly statuses share red hues but not the pending grey.
STATUS_STYLE: dict[str, tuple[str, str, str]] = {
    "Pending Schedule": ("#9e9e9e", "37", "░"),
    "Pending Approval": ("#9e9e9e", "37", "░"),
    "Scheduled": ("#1565c0", "34", "▒"),
    "Scheduled Immediate": ("#1565c0", "34", "▒"),
    "Triggered": ("#f9a825", "33", "▓"),
    "Completed": ("#2e7d32", "32", "█"),
    "Failed": ("#c62828", "31", "X"),
    "Scheduling Failed": ("#e65100", "31", "S"),
    "Past due": ("#6a1b9a", "35", "P"),
    "Error": ("#ad1457", "35", "E"),
    "Not scheduled by optimizer": ("#bdbdbd", "90", "-"),
    "Approval Rejected": ("#616161", "90", "-"),
    "Expired": ("#616161", "90", "-"),
    "Cancelled": ("#616161", "90", "-"),
    "Deleted": ("#616161", "90", "-"),
}
UNKNOWN_STYLE = ("#000000", "0", "?")
EMPTY = "·"
MAX_ELEMENT_ROWS = 40  # terminal: more elements than this are rolled up by group
MAX_SVG_ELEMENT_ROWS = 100
NICE_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600]
NICE_STEPS_S += [43200, 86400]
TICK_STEPS_S = [
    5,
    10,
    15,
    30,
    60,
    300,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    172800,
    604800,
]


def style(status: str) -> tuple[str, str, str]:
    return STATUS_STYLE.get(status, UNKNOWN_STYLE)


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@dataclass
class Bar:
    group: str
    name: str
    status: str
    planned: tuple[int, int] | None  # [start, finish) planned
    actual: tuple[int, int | None] | None  # dispatched .. completed (None: still running)

    @property
    def span(self) -> tuple[int, int]:
        """What the chart shows: planned, else actual (an immediate element has no plan)."""
        if self.planned is not None:
            return self.planned
        assert self.actual is not None
        start, end = self.actual
        return start, end if end is not None else start


def bars(view: dict[str, Any]) -> list[Bar]:
    """Every element with a planned or an actual time, in start order."""
    found = []
    for g in view.get("groups", []):
        for e in g.get("changeManagementSchedules", []):
            planned = (
                (_ms(e["startTime"]), _ms(e["finishTime"]))
                if e.get("startTime") and e.get("finishTime")
                else None
            )
            actual = None
            if e.get("dispatchTime"):
                done = e.get("executionCompletedTime")
                actual = (_ms(e["dispatchTime"]), _ms(done) if done else None)
            if planned or actual:
                found.append(Bar(g["groupId"], e["vnfName"], e["status"], planned, actual))
    return sorted(found, key=lambda b: (b.span[0], b.name))


def _range(items: list[Bar]) -> tuple[int, int]:
    begin = min(b.span[0] for b in items)
    ends = [b.span[1] for b in items] + [
        b.actual[1] for b in items if b.actual and b.actual[1] is not None
    ]
    end = max(ends)
    return begin, max(end, begin + 60_000)


def limit_of(view: dict[str, Any]) -> int | None:
    limits = [g["concurrencyLimit"] for g in view.get("groups", []) if g.get("concurrencyLimit")]
    return max(limits) if limits else None


def ticks(begin: int, end: int, most: int) -> tuple[list[int], int]:
    """Round moments (in UTC: whole seconds, minutes, hours, days) between begin and end, at
    most `most` of them, as few steps apart as allows; and the step."""
    span_s = (end - begin) / 1000
    step_s = next((s for s in TICK_STEPS_S if span_s / s <= most), TICK_STEPS_S[-1])
    step = step_s * 1000
    first = -(-begin // step) * step
    return list(range(first, end + 1, step)), step


def _tick_label(ms: int, zone: tzinfo, with_day: bool, step: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, zone)
    clock = "%H:%M:%S" if step < 60_000 else "%H:%M"
    return moment.strftime(f"%m-%d {clock}" if with_day else clock)


def _full(ms: int, zone: tzinfo) -> str:
    """The one time format of human output (the zone is said beside it)."""
    moment = datetime.fromtimestamp(ms / 1000, zone).isoformat(timespec="seconds")
    return moment.replace("+00:00", "Z")


def profile(spans: list[tuple[int, int]], begin: int, step: int, columns: int) -> list[int]:
    """Per column, the most elements running at any one instant in it. Spans are [start, stop):
    one element ending as another starts do not run together."""
    changes: dict[int, int] = {}
    for start, stop in spans:
        changes[start] = changes.get(start, 0) + 1
        changes[stop] = changes.get(stop, 0) - 1
    moments = sorted(changes)
    level, i, peaks = 0, 0, []
    for column in range(columns):
        left = begin + column * step
        while i < len(moments) and moments[i] <= left:  # the level just at the column's start
            level += changes[moments[i]]
            i += 1
        peak = level
        while i < len(moments) and moments[i] < left + step:
            level += changes[moments[i]]
            i += 1
            peak = max(peak, level)
        peaks.append(peak)
    return peaks


def _levels(items: list[Bar], begin: int, step: int, columns: int) -> list[dict[str, float]]:
    """Per column, how many of these elements run at once (the peak instant), split by status
    in proportion to each status's own peak there."""
    total = profile([b.span for b in items], begin, step, columns)
    by_status: dict[str, list[tuple[int, int]]] = {}
    for b in items:
        by_status.setdefault(b.status, []).append(b.span)
    peaks = {s: profile(spans, begin, step, columns) for s, spans in by_status.items()}
    levels: list[dict[str, float]] = []
    for column, n in enumerate(total):
        shares = {s: p[column] for s, p in peaks.items() if p[column]}
        whole = sum(shares.values())
        split = {s: n * share / whole for s, share in shares.items()} if n else {}
        levels.append(split)
    return levels


def _worst(statuses: dict[str, float]) -> str:
    """The status a rolled-up cell is coloured by: the one an operator must see first."""
    order = list(STATUS_STYLE)
    bad = ("Failed", "Error", "Scheduling Failed", "Past due")
    for status in bad:
        if statuses.get(status):
            return status
    return max(statuses, key=lambda s: (statuses[s], -order.index(s) if s in order else 0))


# -- terminal ---------------------------------------------------------------------------------


def terminal(
    view: dict[str, Any],
    width: int = 72,
    zone: tzinfo = UTC,
    by: str | None = None,
    colour: bool = False,
) -> str:
    """`by`: "element" or "group" (default: by element up to MAX_ELEMENT_ROWS elements)."""
    items = bars(view)
    if not items:
        return f"{view['scheduleId']}: nothing planned or run yet ({view['status']})"
    begin, end = _range(items)
    by = by or ("element" if len(items) <= MAX_ELEMENT_ROWS else "group")
    spans = [b.span for b in items]
    # counts must show as numbers: a column is as wide as the largest count needs
    probe = profile(spans, begin, max(1, -(-(end - begin) // width)), width)
    cell = 1 if max(probe) < 10 and by == "element" else len(str(max(probe))) + 1
    if by == "group":
        cell = max(cell, 2)
    # a round column width (1 min, 5 min, 1 h ...) and columns that start on it
    room = max(1, width // cell)
    step = next((n * 1000 for n in NICE_STEPS_S if n * 1000 * room >= end - begin), 0)
    step = step or -(-(end - begin) // room)
    begin -= begin % step
    columns = max(1, -(-(end - begin) // step))

    def paint(text: str, status: str) -> str:
        return f"\x1b[{style(status)[1]}m{text}\x1b[0m" if colour else text

    def covered(start: int, stop: int) -> range:
        first = (start - begin) // step
        return range(first, max(first + 1, min(columns, -(-(stop - begin) // step))))

    rows: list[tuple[str, list[str]]] = []
    if by == "element":
        for b in items:
            cells = [EMPTY * cell] * columns
            for c in covered(*b.span):
                cells[c] = paint(style(b.status)[2] * cell, b.status)
            rows.append((f"{b.group}/{b.name}", cells))
    else:
        for group in dict.fromkeys(b.group for b in items):
            per_column = _levels([b for b in items if b.group == group], begin, step, columns)
            cells = [
                paint(str(round(sum(n.values()))).rjust(cell), _worst(n))
                if n
                else EMPTY.rjust(cell)
                for n in per_column
            ]
            rows.append((group, cells))
    running = profile(spans, begin, step, columns)
    label_width = max(len(r[0]) for r in rows + [("running", [])])
    zone_name = getattr(zone, "key", None) or str(zone)
    counts = Counter(b.status for b in items)
    lines = [
        f"{view['scheduleId']}  {view['status']}  {len(items)} elements  "
        f"{_full(begin, zone)} .. {_full(end, zone)}"
        + ("" if zone_name == "UTC" else f" ({zone_name})")
        + ", "
        f"one column = {_duration(step)}"
    ]
    lines += _axis(begin, end, step, columns, cell, zone, label_width)
    lines += [f"{name.ljust(label_width)} {''.join(cells)}" for name, cells in rows]
    lines.append(
        f"{'running'.ljust(label_width)} "
        + "".join((str(n) if n else EMPTY).rjust(cell) for n in running)
    )
    limit = limit_of(view)
    lines.append(
        f"{'':{label_width}} peak {max(running)} at once"
        + (f", limit {limit}" if limit is not None else "")
    )
    lines.append(
        "legend  "
        + "  ".join(
            f"{paint(style(s)[2], s)} {s} ({n})" for s, n in sorted(counts.items(), key=_order)
        )
    )
    return "\n".join(lines)


def _order(item: tuple[str, float]) -> int:
    order = list(STATUS_STYLE)
    return order.index(item[0]) if item[0] in order else len(order)


def _duration(ms: int) -> str:
    seconds = ms / 1000
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _axis(
    begin: int, end: int, step: int, columns: int, cell: int, zone: tzinfo, indent: int
) -> list[str]:
    """Two lines: the tick labels, then a ruler with `|` at each tick."""
    chars = columns * cell
    labels = [" "] * (chars + 20)
    ruler = ["-"] * chars
    spread = (end - begin) > 86_400_000
    last_end = -1
    moments, tick = ticks(begin, end, max(2, chars // 10))
    for moment in moments:
        at = min(chars - 1, int((moment - begin) / step * cell))
        ruler[at] = "|"
        text = _tick_label(moment, zone, spread or moment == begin, tick)
        if at > last_end:
            labels[at : at + len(text)] = list(text)
            last_end = at + len(text)
    return [
        f"{'':{indent}} {''.join(labels).rstrip()}",
        f"{'':{indent}} {''.join(ruler)}",
    ]


# -- SVG --------------------------------------------------------------------------------------

SVG_NS = "http://www.w3.org/2000/svg"


def svg(view: dict[str, Any], width: int = 1200, by: str | None = None) -> str:
    """The picture. Rows: one per element up to MAX_SVG_ELEMENT_ROWS elements (or `by`), else
    one per group, each group's row a stacked histogram of its elements by status."""
    items = bars(view)
    title = f"{view['scheduleId']}: {view['status']}"
    if not items:
        return (
            f'<svg xmlns="{SVG_NS}" width="{width}" height="60" font-family="sans-serif"'
            f' font-size="13"><rect width="100%" height="100%" fill="#ffffff"/>'
            f'<text x="10" y="35">{escape(title)}: nothing planned or run yet</text></svg>\n'
        )
    by = by or ("element" if len(items) <= MAX_SVG_ELEMENT_ROWS else "group")
    begin, end = _range(items)
    left, right, top = 230, 50, 64
    plot = width - left - right
    scale = plot / (end - begin)

    def x(ms: int) -> float:
        return left + (ms - begin) * scale

    row_h = 16 if by == "element" else 28
    groups = list(dict.fromkeys(b.group for b in items))
    rows = len(items) if by == "element" else len(groups)
    rows_bottom = top + rows * row_h
    profile_h = 90
    profile_top = rows_bottom + 40
    legend_top = profile_top + profile_h + 46
    statuses = sorted(Counter(b.status for b in items).items(), key=_order)
    height = legend_top + 20 * (-(-len(statuses) // 4)) + 16
    parts = [
        f'<svg xmlns="{SVG_NS}" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        ' font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="10" y="38">{len(items)} elements, '
        f"{_full(begin, UTC)} .. {_full(end, UTC)}; "
        f"{'planned bars light, actual run dark' if by == 'element' else 'elements per group'}"
        "</text>",
    ]
    # axis and grid
    spread = (end - begin) > 86_400_000
    axis = ['<g id="axis" stroke="#e0e0e0">']
    moments, tick = ticks(begin, end, max(2, plot // 90))
    for moment in moments:
        px = x(moment)
        axis.append(
            f'<line x1="{px:.1f}" y1="{top - 6}" x2="{px:.1f}" y2="{profile_top + profile_h}"/>'
        )
        axis.append(
            f'<text x="{px:.1f}" y="{top - 10}" text-anchor="middle" stroke="none"'
            f' fill="#424242">{_tick_label(moment, UTC, spread, tick)}</text>'
        )
    axis.append(
        f'<line x1="{left}" y1="{top - 6}" x2="{left + plot}" y2="{top - 6}" stroke="#424242"/>'
    )
    axis.append("</g>")
    parts += axis
    if by == "element":
        parts += _element_rows(items, x, top, row_h, left)
    else:
        parts += _group_rows(items, groups, begin, end, x, top, row_h, plot)
    parts += _profile_panel(view, items, begin, end, x, left, plot, profile_top, profile_h)
    parts.append(f'<g id="legend" transform="translate({left},{legend_top})">')
    for i, (status, n) in enumerate(statuses):
        lx, ly = (i % 4) * (plot // 4), (i // 4) * 20
        parts.append(
            f'<rect x="{lx}" y="{ly}" width="14" height="12" fill="{style(status)[0]}"'
            f' data-status="{escape(status)}"/>'
            f'<text x="{lx + 20}" y="{ly + 10}">{escape(status)} ({n})</text>'
        )
    parts.append("</g></svg>")
    return "\n".join(parts) + "\n"


def _element_rows(items: list[Bar], x: Any, top: int, row_h: int, left: int) -> list[str]:
    parts = []
    for row, b in enumerate(items):
        y = top + row * row_h
        fill = style(b.status)[0]
        label = f"{b.group}/{b.name}"
        parts.append(f'<g class="row" data-status="{escape(b.status)}">')
        if row % 2:
            parts.append(f'<rect x="0" y="{y}" width="100%" height="{row_h}" fill="#f5f5f5"/>')
        parts.append(f'<text x="6" y="{y + row_h - 4}">{escape(label[:36])}</text>')
        start, stop = b.span
        parts.append(
            f'<rect class="planned" x="{x(start):.1f}" y="{y + 2}"'
            f' width="{max(1.5, x(stop) - x(start)):.1f}" height="{row_h - 4}" fill="{fill}"'
            f' fill-opacity="0.35" stroke="{fill}"><title>{escape(label)}: {escape(b.status)}'
            "</title></rect>"
        )
        if b.actual is not None:
            a_start, a_end = b.actual
            a_stop = a_end if a_end is not None else max(a_start, stop)
            parts.append(
                f'<rect class="actual" x="{x(a_start):.1f}" y="{y + 5}"'
                f' width="{max(1.5, x(a_stop) - x(a_start)):.1f}" height="{row_h - 10}"'
                f' fill="{fill}"/>'
            )
        parts.append("</g>")
    return parts


def _group_rows(
    items: list[Bar],
    groups: list[str],
    begin: int,
    end: int,
    x: Any,
    top: int,
    row_h: int,
    plot: int,
) -> list[str]:
    """Each group: a stacked histogram over time of its elements running, by status."""
    buckets = max(1, plot // 4)
    step = max(1, -(-(end - begin) // buckets))
    parts = []
    for row, group in enumerate(groups):
        y = top + row * row_h
        mine = [b for b in items if b.group == group]
        counts = _levels(mine, begin, step, buckets)
        peak = max((sum(c.values()) for c in counts), default=1) or 1
        summary = ", ".join(
            f"{n} {s}" for s, n in sorted(Counter(b.status for b in mine).items(), key=_order)
        )
        parts.append(f'<g class="row" data-group="{escape(group)}">')
        parts.append(
            f'<text x="6" y="{y + row_h / 2 + 4:.0f}">{escape(group[:24])} ({len(mine)})'
            f"<title>{escape(summary)}</title></text>"
        )
        g_start = min(b.span[0] for b in mine)
        g_end = max(b.span[1] for b in mine)
        parts.append(
            f'<rect class="planned" x="{x(g_start):.1f}" y="{y + 1}"'
            f' width="{max(1.5, x(g_end) - x(g_start)):.1f}" height="{row_h - 2}"'
            f' fill="#eceff1"><title>{escape(group)}: {escape(summary)}</title></rect>'
        )
        # stacked by status; equal neighbours merged into one rect (no seams, a small file)
        runs: list[list[Any]] = []  # [first column, last column, top, height, status]
        for c, statuses in enumerate(counts):
            base: float = y + row_h - 1
            for status, n in sorted(statuses.items(), key=_order):
                h = round((row_h - 3) * n / peak, 1)
                base -= h
                top_y = round(base, 1)
                same = [r for r in runs if r[1] == c - 1 and r[2:] == [top_y, h, status]]
                if same:
                    same[0][1] = c
                else:
                    runs.append([c, c, top_y, h, status])
        for first, last, top_y, h, status in runs:
            left_x = x(begin + first * step)
            parts.append(
                f'<rect x="{left_x:.1f}" y="{top_y}" width="{x(begin + (last + 1) * step) - left_x:.1f}"'
                f' height="{h}" fill="{style(status)[0]}"/>'
            )
        parts.append("</g>")
    return parts


def _profile_panel(
    view: dict[str, Any],
    items: list[Bar],
    begin: int,
    end: int,
    x: Any,
    left: int,
    plot: int,
    top: int,
    height: int,
) -> list[str]:
    """How many elements run at once over time, against the schedule's limit."""
    buckets = max(1, plot // 2)
    step = max(1, -(-(end - begin) // buckets))
    running = profile([b.span for b in items], begin, step, buckets)
    # what really ran: dispatched until it ended (or, still running, until its planned end)
    ran = [(b.actual[0], b.actual[1] or b.span[1]) for b in items if b.actual is not None]
    # drawn up to the last moment anything was seen to start or end, not into the future
    seen = max(
        (m for b in items if b.actual is not None for m in b.actual if m is not None),
        default=begin,
    )
    actual = profile(ran, begin, step, buckets)[: -(-(seen - begin) // step)] if ran else []
    limit = limit_of(view)
    ceiling = max(max(running), max(actual, default=0), limit or 0, 1)

    def y(n: float) -> float:
        return top + height - height * n / ceiling

    def steps(levels: list[int]) -> list[str]:
        points = []
        for c, n in enumerate(levels):
            points.append(f"{x(begin + c * step):.1f},{y(n):.1f}")
            points.append(f"{x(min(end, begin + (c + 1) * step)):.1f},{y(n):.1f}")
        return points

    planned = [f"{left},{top + height}", *steps(running), f"{left + plot},{top + height}"]
    parts = [
        '<g id="concurrency">',
        f'<text x="6" y="{top + 12}">running at once</text>',
        f'<text x="6" y="{top + 28}" fill="#1565c0">planned: peak {max(running)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot}" height="{height}" fill="none"'
        ' stroke="#bdbdbd"/>',
        f'<polygon points="{" ".join(planned)}" fill="#90caf9" stroke="#1565c0"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{ceiling}</text>',
        f'<text x="{left - 4}" y="{top + height}" text-anchor="end">0</text>',
    ]
    if actual:
        parts.append(
            f'<polyline class="actual" points="{" ".join(steps(actual))}" fill="none"'
            ' stroke="#212121" stroke-width="1.5"/>'
            f'<text x="6" y="{top + 44}" fill="#212121">actual: peak {max(actual)}</text>'
        )
    if limit:
        parts.append(
            f'<line class="limit" x1="{left}" y1="{y(limit):.1f}" x2="{left + plot}"'
            f' y2="{y(limit):.1f}" stroke="#c62828" stroke-dasharray="6 4"/>'
            f'<text x="{left + plot - 4}" y="{y(limit) - 4:.1f}" text-anchor="end"'
            f' fill="#c62828">limit {limit}</text>'
        )
    parts.append("</g>")
    return parts
