"""Optimizer benchmark: seeded instances, solved by the exact planner and, on the same instance,
by an exact min-cost-flow solver (OR-Tools' C++ SimpleMinCostFlow, the `bench` extra).

Families (D = 1 h, 7 days from a Monday, unless said):
realistic  5 time zones, 5% of elements with 1-3 tickets, concurrency 50, Weekday_00_06.
groups     realistic, its elements in 1,000 groups (one per site, as CMSO requests often are).
own        every element its own availability: 3-8 random busy spans of 2-24 h,
           AllDayEveryDay, concurrency 50.
stayout    own, with the concurrency set so that about 5% of the elements must stay out
           (floor(0.95 n / 168)): every slot is contested.
sparse     9 time zones with DST changes inside the 31 days from 2027-03-08 (US on 03-14,
           Europe on 03-28, Sydney and Auckland on 04-04), EveryDay_00_06, D = 90 min (496
           slots), 7 windows on 5 weekends (two weekends split in two, the second part off the
           grid); sites of 5-25 elements in one zone each, at most 2 per site per slot
           (attribute "site"); site-wide blackouts over whole weekends (30% of sites) and runs
           of 2-4 nights (30%), a freeze night per zone, 60% of the elements with 1-2 tickets
           of their own; the concurrency limit the least that still places everyone who can be
           placed at all (Hall-tight; found by bisection with OR-Tools' max flow when the
           instance is built, not timed).

Each case runs twice, each in a fresh process so its peak memory (max RSS, interpreter and
the instance included) is its own: `cmsod` = planner.plan (availability, solver, reasons);
`flow` = the same availability step (planner.instance_for), then the class-compressed network
(source -> class -> (slot, site) bin -> slot -> sink, a unit's cost = its slot's number) built and solved
by SimpleMinCostFlow.solve_max_flow_with_min_cost. Both must place the same number of elements
with the same sum of slot numbers, or the benchmark fails.

Usage: python bench/optimizer.py [--cases realistic:1000,...] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from cmsod.optimize.planner import Options, instance_for, plan  # noqa: E402
from cmsod.optimize.policies import BUILTIN  # noqa: E402
from cmsod.optimize.problem import Busy, Problem, ProblemGroup  # noqa: E402
from cmsod.optimize.solver import FREE, Instance  # noqa: E402

H = 3_600_000
M = 60_000
START = 1796342400000  # Monday 2026-12-07T00:00:00Z
ZONES = ["UTC", "America/New_York", "Europe/Stockholm", "Asia/Kolkata", "Australia/Sydney"]
SPARSE_START = int(datetime(2027, 3, 8, tzinfo=UTC).timestamp() * 1000)  # a Monday
SPARSE_ZONES = [
    "America/New_York",
    "America/Chicago",
    "America/Denver",
    "America/Los_Angeles",
    "Europe/London",
    "Europe/Paris",
    "Europe/Helsinki",
    "Australia/Sydney",
    "Pacific/Auckland",
]
DEFAULT_CASES = ",".join(
    [f"{f}:{n}" for f in ("realistic", "own", "stayout", "sparse") for n in (1000, 10000, 100000)]
    + ["groups:10000", "realistic:300000"]
)


def instance(kind: str, n: int, seed: int) -> tuple[Problem, Options]:
    if kind == "sparse":
        return sparse(n, seed)
    rng = random.Random(seed)
    names = [f"vnf{i:06d}" for i in range(n)]
    data: dict[str, dict[str, str]] = {}
    busy: dict[str, list[Busy]] = {}
    for name in names:
        if kind in ("realistic", "groups"):
            data[name] = {"timezone": rng.choice(ZONES)}
            if rng.random() < 0.05:
                busy[name] = [
                    Busy(s, s + rng.randint(1, 12) * H, f"ticket {name}-{j}")
                    for j in range(rng.randint(1, 3))
                    for s in [START + rng.randrange(7 * 24) * H]
                ]
        else:
            busy[name] = [
                Busy(s, s + rng.randint(2, 24) * H, f"blackout {name}-{j}")
                for j in range(rng.randint(3, 8))
                for s in [START + rng.randrange(7 * 24) * H]
            ]
    window = [(START, START + 7 * 24 * H)]
    parts = 1000 if kind == "groups" else 1
    groups = [ProblemGroup(f"g{p}", list(window), names[p::parts]) for p in range(parts)]
    return Problem(
        key=1,
        schedule_id=f"{kind}-{n}",
        duration_ms=H,
        concurrency=max(1, 95 * n // (100 * 168)) if kind == "stayout" else 50,
        policy_id="Weekday_00_06" if kind in ("realistic", "groups") else "AllDayEveryDay",
        not_before_ms=START,
        groups=[g for g in groups if g.elements],
        element_data=data,
        busy=busy,
    ), Options()


def _local_night(zone: str, day: datetime) -> tuple[int, int]:
    """00:00-06:00 local on this date, in UTC ms."""
    tz = ZoneInfo(zone)
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    return int(start.timestamp() * 1000), int((start + timedelta(hours=6)).timestamp() * 1000)


def sparse(n: int, seed: int, concurrency: int | None = None) -> tuple[Problem, Options]:
    """The sparse family; its concurrency limit the Hall-tight one unless given."""
    rng = random.Random(seed)
    first = datetime.fromtimestamp(SPARSE_START / 1000, UTC)
    windows: list[tuple[int, int]] = []
    weekends: list[tuple[int, int]] = []
    for w in range(5):
        friday = SPARSE_START + (7 * w + 4) * 24 * H
        begin, end = friday + 12 * H, friday + 3 * 24 * H + 12 * H  # Fri 12:00Z - Mon 12:00Z
        weekends.append((begin, end))
        if w in (1, 3):  # split, the second part starting off the 90-minute grid
            windows += [(begin, begin + 30 * H), (begin + 32 * H + 20 * M, end)]
        else:
            windows.append((begin, end))
    days = [first + timedelta(days=d) for d in range(31)]
    freeze = {z: _local_night(z, rng.choice(days)) for z in SPARSE_ZONES}
    names: list[str] = []
    data: dict[str, dict[str, str]] = {}
    busy: dict[str, list[Busy]] = {}
    site = 0
    while len(names) < n:
        zone = rng.choice(SPARSE_ZONES)
        site_name = f"site{site:05d}"
        site += 1
        blackouts: list[Busy] = [Busy(*freeze[zone], f"freeze of {zone}")]
        if rng.random() < 0.3:
            blackouts.append(Busy(*rng.choice(weekends), f"blackout of {site_name}"))
        if rng.random() < 0.3:
            d = rng.randrange(31)
            for k in range(rng.randint(2, 4)):
                night = _local_night(zone, first + timedelta(days=d + k))
                blackouts.append(Busy(*night, f"blackout of {site_name}"))
        for _ in range(min(rng.randint(5, 25), n - len(names))):
            name = f"vnf{len(names):06d}"
            names.append(name)
            data[name] = {"timezone": zone, "site": site_name}
            own = list(blackouts)
            if rng.random() < 0.6:
                for j in range(rng.randint(1, 2)):
                    s = rng.choice(weekends)[0] + rng.randrange(66) * H
                    own.append(Busy(s, s + rng.randint(3, 12) * H, f"ticket {name}-{j}"))
            busy[name] = own
    problem = Problem(
        key=1,
        schedule_id=f"sparse-{n}",
        duration_ms=90 * M,
        concurrency=n,
        policy_id="EveryDay_00_06",
        not_before_ms=SPARSE_START,
        groups=[ProblemGroup("g", windows, names)],
        element_data=data,
        busy=busy,
    )
    options = Options("site", 2)
    problem.concurrency = concurrency or _hall_tight(problem, options)
    return problem, options


def _hall_tight(problem: Problem, options: Options) -> int:
    """The least concurrency limit that places as many elements as no limit does."""
    from ortools.graph.python import max_flow

    _, _, inst = instance_for(problem, BUILTIN[problem.policy_id or ""], options)

    def placed(limit: int) -> int:
        inst.limit = limit
        tails, heads, caps, _, source, _ = _network(inst, lambda s: 0)
        flow = max_flow.SimpleMaxFlow()
        flow.add_arcs_with_capacity(tails, heads, caps)
        flow.solve(source, source + 1)
        return flow.optimal_flow()

    everyone = placed(sum(inst.counts))
    lo, hi = 1, sum(inst.counts)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if placed(mid) == everyone else (mid + 1, hi)
    return lo


def _network(inst: Instance, cost: Callable[[int], int]):  # type: ignore[no-untyped-def]
    """Arrays of the class-compressed network: source, sink, classes, bins, slots; a unit
    through slot s costs cost(s) (CMSO's slot number, as in the plan's objective)."""
    import numpy as np

    slots = sorted({s for a in inst.available for s in a})
    rank = {s: i for i, s in enumerate(slots)}
    source, sink = 0, 1
    n_classes = len(inst.counts)
    slot_node = 2 + n_classes
    bins: dict[tuple[int, int], int] = {}
    first_bin = slot_node + len(slots)
    tails, heads, caps, costs = [], [], [], []
    for c, available in enumerate(inst.available):
        tails.append(source)
        heads.append(2 + c)
        caps.append(inst.counts[c])
        costs.append(0)
        a = inst.attributes[c]
        for s in available:
            if a == FREE:
                head = slot_node + rank[s]
            else:
                head = bins.setdefault((s, a), first_bin + len(bins))
            tails.append(2 + c)
            heads.append(head)
            caps.append(inst.counts[c])
            costs.append(0)
    for (s, _), node in bins.items():
        tails.append(node)
        heads.append(slot_node + rank[s])
        caps.append(inst.attribute_limit or inst.limit)
        costs.append(0)
    for i in range(len(slots)):
        tails.append(slot_node + i)
        heads.append(sink)
        caps.append(inst.limit)
        costs.append(cost(slots[i]))
    as_array = np.array
    return (
        as_array(tails, dtype=np.int32),
        as_array(heads, dtype=np.int32),
        as_array(caps, dtype=np.int64),
        as_array(costs, dtype=np.int64),
        source,
        sum(inst.counts),
    )


def run_flow(problem: Problem, options: Options) -> dict:
    from ortools.graph.python import min_cost_flow

    began = time.perf_counter()
    grid, _, inst = instance_for(problem, BUILTIN[problem.policy_id or ""], options)
    tails, heads, caps, costs, source, total = _network(inst, grid.number)
    flow = min_cost_flow.SimpleMinCostFlow()
    flow.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
    flow.set_node_supply(source, total)
    flow.set_node_supply(1, -total)
    status = flow.solve_max_flow_with_min_cost()
    assert status == flow.OPTIMAL, status
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "scheduled": flow.maximum_flow(), "objective": flow.optimal_cost()}


def run_cmsod(problem: Problem, options: Options) -> dict:
    began = time.perf_counter()
    result = plan(problem, BUILTIN, options)
    seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "scheduled": len(result.placed),
        "objective": result.objective,
        "summary": result.summary,
    }


def run_one(side: str, kind: str, n: int, seed: int) -> dict:
    problem, options = instance(kind, n, seed)
    out = (run_cmsod if side == "cmsod" else run_flow)(problem, options)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["concurrency"] = problem.concurrency
    return out


def alignment() -> None:
    """What slots on the cluster's grid leave of each zone's policy periods, against slots that
    would start at every period's own start: the realistic request (Weekday_00_06, 7 days
    from Monday 00:00Z) at D = 60 min and CMSO's D = 70 min."""
    from cmsod.optimize.policies import allowed_windows, zone
    from cmsod.optimize.problem import merge

    policy = BUILTIN["Weekday_00_06"]
    window = [(START, START + 7 * 24 * H)]
    print("policy periods on the grid: slots per zone (grid / from each period's start)")
    for minutes in (60, 70, 90):
        step = minutes * M
        grid = Problem(1, "a", step, 1, None, START, [ProblemGroup("g", window, [])]).grid()
        cells = []
        total = [0, 0]
        for name in ZONES:
            allowed = allowed_windows(policy, zone(name), *window[0])
            pieces = [(max(s, START), min(e, window[0][1])) for s, e in merge(allowed)]
            on_grid = sum(1 for _ in grid.slots(window, allowed))
            aligned = sum(max(0, (e - s) // step) for s, e in pieces)
            total[0] += on_grid
            total[1] += aligned
            cells.append(f"{name.split('/')[-1]} {on_grid}/{aligned}")
        lost = 100 * (1 - total[0] / total[1])
        print(
            f"  D = {minutes} min: {', '.join(cells)}; all {total[0]}/{total[1]} ({lost:.0f}% lost)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sides", default="cmsod,flow")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--alignment", action="store_true", help="only the policy alignment")
    args = parser.parse_args()
    if args.alignment:
        alignment()
        return
    if args.one:
        side, kind, n = args.one.split(":")
        print(json.dumps(run_one(side, kind, int(n), args.seed)))
        return
    print(describe())
    print(
        f"{'case':<18} {'cmsod s':>8} {'MB':>6} {'flow s':>8} {'MB':>6} {'ratio':>6} "
        f"{'limit':>6} {'scheduled':>9} {'objective':>12}"
    )
    for case in args.cases.split(","):
        kind, n = case.split(":")
        r: dict[str, dict] = {}
        for side in args.sides.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--one", f"{side}:{case}", "--seed", str(args.seed)],
                capture_output=True,
                text=True,
                check=True,
            )
            r[side] = json.loads(out.stdout)
        c, f = r.get("cmsod"), r.get("flow")
        if c and f and (c["scheduled"], c["objective"]) != (f["scheduled"], f["objective"]):
            raise SystemExit(f"{case}: cmsod {c} differs from the flow solver {f}")
        first = c or f
        assert first is not None
        print(
            f"{kind + ' ' + n:<18} "
            + (f"{c['seconds']:>8.2f} {c['peak_mb']:>6.0f} " if c else f"{'-':>8} {'-':>6} ")
            + (f"{f['seconds']:>8.2f} {f['peak_mb']:>6.0f} " if f else f"{'-':>8} {'-':>6} ")
            + (f"{c['seconds'] / f['seconds']:>6.2f} " if c and f else f"{'-':>6} ")
            + f"{first['concurrency']:>6} {first['scheduled']:>9} "
            + f"{first['objective']:>12}"
        )
        if c:
            print(f"    {c['summary']}", flush=True)


if __name__ == "__main__":
    main()
