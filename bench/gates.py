"""The CPU one due batch costs in the dispatch transaction (`dispatch.begin_dispatches`: load
each element's snapshot, ask the gates, commit the intent), in-process on a real SQLite file,
rolled back after each run. CPU time (`time.process_time`), best of N runs: a figure that a
busy machine (other processes on the cores) disturbs much less than the burst's lateness.

Three set-ups of the same 1,000 due elements: nothing for the gates to check; every gate
with something to check (a failure threshold, a freeze turned on and off, a blackout on each
element long after its slot, freeze calendars with a yearly period for every element and
one scoped to a site no element has); and the same with the book read per element (before
this was batched per due batch). It also counts the SQL statements each run executes.
Usage: python bench/gates.py [--elements 1000] [--runs 15]"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from cmsod import calendars, gates, ticketing  # noqa: E402
from cmsod.model import ElementStatus as E  # noqa: E402
from cmsod.model import ScheduleStatus as S  # noqa: E402
from cmsod.store import dispatch  # noqa: E402
from cmsod.store.schema import migrate  # noqa: E402
from cmsod.store.store import Tx  # noqa: E402

NOW = 1_796_112_000_000  # 2026-12-01T08:00:00Z
DAY = 86_400_000


def database(path: Path, n: int, all_gates: bool) -> tuple[sqlite3.Connection, list[int]]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn)
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO schedules (id, schedule_id, domain, user_id, status, immediate, normal_s,"
        " additional_s, concurrency, schedule_info, create_ms, updated_ms, max_failure_ratio)"
        " VALUES (1, 'burst', 'ChangeManagement', 'u', ?, 0, 1, 0, ?, x'', ?, ?, ?)",
        (S.SCHEDULED.value, n, NOW - DAY, NOW - DAY, 0.5 if all_gates else None),
    )
    conn.execute("INSERT INTO cm_groups (id, schedule, group_id) VALUES (1, 1, 'g')")
    conn.execute("INSERT INTO windows (grp, start_ms, end_ms) VALUES (1, ?, ?)", (NOW, NOW + DAY))
    conn.executemany(
        "INSERT INTO elements (id, schedule, grp, name, status, request, start_ms, finish_ms)"
        " VALUES (?, 1, 1, ?, ?, x'7b7d', ?, ?)",
        [(i + 1, f"burst-{i}", E.SCHEDULED.value, NOW, NOW + 1000) for i in range(n)],
    )
    if all_gates:
        conn.executemany(
            "INSERT INTO availability (ref, kind, element, start_ms, end_ms, reason, created_ms,"
            " created_by) VALUES (?, 'blackout', ?, ?, ?, '', ?, 'bench')",
            [
                (f"BO{i:06d}", f"burst-{i}", NOW + 300 * DAY, NOW + 300 * DAY + 3600_000, NOW)
                for i in range(n)
            ],
        )
        conn.execute(
            "UPDATE freeze SET active = 0, since_ms = ?, by = 'bench', why = 'on and off'",
            (NOW - 1000,),
        )
    conn.execute("COMMIT")
    return conn, list(range(1, n + 1))


def rules(all_gates: bool) -> list[gates.Gate]:
    ticket = gates.TicketGate(ticketing.DEFAULT_DISPATCH_ALLOWED)
    if not all_gates:
        return gates.standard(ticket, 300_000, True)
    text = calendars.CalendarFile(
        [
            calendars.Deny(name="later", from_="03-10", to="03-11", yearly=True),
            calendars.Deny(
                name="elsewhere", from_="2026-11-30", to="2026-12-02", scope={"site": "NOWHERE"}
            ),
        ]
    )
    cal = calendars.Calendars(tuple(calendars.compile_file(text, "bench.toml")))
    return gates.standard(ticket, 300_000, True, gates.CalendarGate(cal, {}))


def run(
    conn: sqlite3.Connection,
    elements: list[int],
    rules: list[gates.Gate],
    per_element_book: bool,
    count: bool = False,
) -> tuple[float, int, int]:
    """CPU seconds of one begin_dispatches, the jobs it made, the statements it ran (counted
    only when asked: the counting costs time)."""
    statements = 0

    def counted(_: str) -> None:
        nonlocal statements
        statements += 1

    conn.set_trace_callback(counted if count else None)
    conn.execute("BEGIN IMMEDIATE")
    tx = Tx(conn, NOW, "cm-events", "urn:bench")
    original = dispatch.BatchCache.__init__
    if per_element_book:  # the book read per element, as before it was batched

        def unbatched(self: dispatch.BatchCache, tx: Tx, elements: list[int] | None = None) -> None:
            original(self, tx, None)

        dispatch.BatchCache.__init__ = unbatched  # type: ignore[method-assign]
    try:
        began = time.process_time()
        jobs = dispatch.begin_dispatches(tx, elements, rules).jobs
        spent = time.process_time() - began
    finally:
        dispatch.BatchCache.__init__ = original  # type: ignore[method-assign]
        conn.execute("ROLLBACK")
        conn.set_trace_callback(None)
    return spent, len(jobs), statements


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    print(describe())
    setups = [
        ("nothing to check", False, False),
        ("all gates", True, False),
        ("all gates, book read per element", True, True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = []
        for label, all_gates, per_element in setups:
            conn, elements = database(Path(tmp) / f"{label}.sqlite3", args.elements, all_gates)
            prepared.append((label, conn, elements, rules(all_gates), per_element))
        times: dict[str, list[float]] = {label: [] for label, *_ in setups}
        for _ in range(args.runs):  # interleaved: a busy spell of the machine hits all alike
            for label, conn, elements, gate_list, per_element in prepared:
                times[label].append(run(conn, elements, gate_list, per_element)[0])
        for label, conn, elements, gate_list, per_element in prepared:
            _, jobs, statements = run(conn, elements, gate_list, per_element, count=True)
            spent = sorted(times[label])
            print(
                f"{label:<34} {args.elements} due: best {spent[0] * 1000:6.1f} ms CPU"
                f" ({spent[0] * 1e6 / args.elements:5.1f} µs each), median"
                f" {spent[len(spent) // 2] * 1000:6.1f} ms, {statements} SQL statements,"
                f" {jobs} dispatched"
            )
            conn.close()


if __name__ == "__main__":
    main()
