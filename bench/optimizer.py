"""Optimizer benchmark: seeded instances, solved by the exact planner.

realistic: N elements, 5 time zones, 5% of elements with 1-3 tickets, a 7-day window,
           D = 1 h, concurrency 50, policy Weekday_00_06.
adversarial: N elements, each with its own random availability (3-8 random busy spans of
           2-24 h in the same 7-day window), policy AllDayEveryDay, D = 1 h, concurrency 50.

Each case runs in a fresh process so its peak memory (max RSS, the Python interpreter
included) is its own. Usage: python bench/optimizer.py [--cases realistic:1000,...] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from cmsod.optimize.planner import plan  # noqa: E402
from cmsod.optimize.policies import BUILTIN  # noqa: E402
from cmsod.optimize.problem import Busy, Problem, ProblemGroup  # noqa: E402

H = 3_600_000
START = 1796342400000  # Monday 2026-12-07T00:00:00Z
ZONES = ["UTC", "America/New_York", "Europe/Stockholm", "Asia/Kolkata", "Australia/Sydney"]
DEFAULT_CASES = "realistic:1000,realistic:10000,realistic:100000,adversarial:1000,adversarial:10000"


def instance(kind: str, n: int, seed: int) -> Problem:
    rng = random.Random(seed)
    names = [f"vnf{i:06d}" for i in range(n)]
    data: dict[str, dict[str, str]] = {}
    busy: dict[str, list[Busy]] = {}
    for name in names:
        if kind == "realistic":
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
    return Problem(
        key=1,
        schedule_id=f"{kind}-{n}",
        duration_ms=H,
        concurrency=50,
        policy_id="Weekday_00_06" if kind == "realistic" else "AllDayEveryDay",
        not_before_ms=START,
        groups=[ProblemGroup("g", [(START, START + 7 * 24 * H)], names)],
        element_data=data,
        busy=busy,
    )


def run_one(kind: str, n: int, seed: int) -> dict:
    problem = instance(kind, n, seed)
    began = time.perf_counter()
    result = plan(problem, BUILTIN)
    seconds = time.perf_counter() - began
    return {
        "case": f"{kind} {n}",
        "seconds": round(seconds, 3),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "scheduled": len(result.placed),
        "not_scheduled": len(result.unplaced),
        "objective": result.objective,
        "summary": result.summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, n = args.one.split(":")
        print(json.dumps(run_one(kind, int(n), args.seed)))
        return
    print(describe())
    print(
        f"{'case':<20} {'time s':>8} {'peak MB':>8} {'scheduled':>10} {'not':>8} {'objective':>12}"
    )
    for case in args.cases.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", case, "--seed", str(args.seed)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        print(
            f"{r['case']:<20} {r['seconds']:>8.3f} {r['peak_mb']:>8.1f} {r['scheduled']:>10} {r['not_scheduled']:>8} {r['objective']:>12}"
        )
        print(f"    {r['summary']}")


if __name__ == "__main__":
    main()
