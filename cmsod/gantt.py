"""A schedule's plan drawn as a chart: in the terminal (one row per element, or per group when
there are many) with the concurrency profile under it, or as an SVG picture. Pure: it reads a
schedule view (`io.cmsod.Schedules.Get`) and returns text."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

BAR, EMPTY = "█", "·"
MAX_ELEMENT_ROWS = 40


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def bars(view: dict[str, Any]) -> list[tuple[str, str, int, int, str]]:
    """(group, element, start_ms, end_ms, status) of every element with a planned time."""
    return [
        (g["groupId"], e["vnfName"], _ms(e["startTime"]), _ms(e["finishTime"]), e["status"])
        for g in view.get("groups", [])
        for e in g.get("changeManagementSchedules", [])
        if e.get("startTime") and e.get("finishTime")
    ]


def _label(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%m-%d %H:%M")


def terminal(view: dict[str, Any], width: int = 72) -> str:
    items = bars(view)
    if not items:
        return f"{view['scheduleId']}: nothing planned ({view['status']})"
    begin, end = min(i[2] for i in items), max(i[3] for i in items)
    step = max(1, -(-(end - begin) // width))
    columns = -(-(end - begin) // step)

    def covered(start: int, stop: int) -> range:
        return range(
            (start - begin) // step, max((start - begin) // step + 1, -(-(stop - begin) // step))
        )

    running = profile([(i[2], i[3]) for i in items], begin, step, columns)
    rows: list[tuple[str, list[str]]] = []
    if len(items) <= MAX_ELEMENT_ROWS:
        for group, name, start, stop, _ in sorted(items, key=lambda i: (i[2], i[1])):
            cells = [EMPTY] * columns
            for c in covered(start, stop):
                cells[c] = BAR
            rows.append((f"{group}/{name}", cells))
    else:  # one row per group: how many of its elements run in each column
        for group in dict.fromkeys(i[0] for i in items):
            counts = [0] * columns
            for g, _, start, stop, _ in items:
                if g == group:
                    for c in covered(start, stop):
                        counts[c] += 1
            rows.append((group, [_digit(n) for n in counts]))
    label_width = max(len(r[0]) for r in rows + [("running", [])])
    lines = [
        f"{view['scheduleId']}  {view['status']}  {len(items)} elements  "
        f"{_label(begin)} .. {_label(end)} UTC, one column = {step / 1000:g} s"
    ]
    lines += [f"{name.ljust(label_width)} {''.join(cells)}" for name, cells in rows]
    lines.append(f"{'running'.ljust(label_width)} {''.join(_digit(n) for n in running)}")
    lines.append(f"{'':{label_width}} peak {max(running)} at once")
    return "\n".join(lines)


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


def _digit(n: int) -> str:
    return EMPTY if n == 0 else str(n) if n < 10 else "+"


def svg(view: dict[str, Any], width: int = 960, row_height: int = 18) -> str:
    items = sorted(bars(view), key=lambda i: (i[2], i[1]))
    begin = min((i[2] for i in items), default=0)
    end = max((i[3] for i in items), default=1)
    label_width, plot = 220, width - 240
    scale = plot / max(1, end - begin)
    height = (len(items) + 3) * row_height
    colours = {"Completed": "#2e7d32", "Failed": "#c62828", "Triggered": "#f9a825"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">',
        f"<title>{escape(view['scheduleId'])}: {escape(view['status'])}</title>",
        f'<text x="4" y="{row_height - 4}">{escape(view["scheduleId"])}  {escape(view["status"])}  '
        f"{_label(begin)} .. {_label(end)} UTC</text>",
    ]
    for row, (group, name, start, stop, status) in enumerate(items, start=1):
        y = row * row_height
        x = label_width + (start - begin) * scale
        w = max(1.0, (stop - start) * scale)
        parts.append(f'<text x="4" y="{y + row_height - 5}">{escape(group)}/{escape(name)}</text>')
        parts.append(
            f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_height - 4}" '
            f'fill="{colours.get(status, "#1565c0")}"><title>{escape(name)}: {escape(status)}</title></rect>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
