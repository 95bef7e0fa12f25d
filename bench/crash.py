"""The long crash run: the real daemon against an HTTP orchestrator on loopback (the tests'
fake SO, in a thread), a schedule of 200 elements due over a short window, killed with
SIGKILL at random points 20 times and restarted each time. At the end, from the fake SO's
record and the store: no element dispatched twice, none lost (each ends terminal, or
reconciled with a message), PRAGMA integrity_check ok.
Usage: python bench/crash.py [--elements 200] [--kills 20] [--seed 1]"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from tests.fake_http import FakeSO  # noqa: E402
from tests.procs import kill_and_restart_run  # noqa: E402
from tests.test_crash import check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=200)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    so = FakeSO(["IN_PROGRESS", "COMPLETE"])
    stop = so.in_thread()
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as state:
            # up to a slot more (1 s) after a progress line: kills land anywhere,
            # including between a dispatch intent and the orchestrator's answer
            result = kill_and_restart_run(
                Path(state),
                so.url,
                args.elements,
                args.kills,
                args.seed,
                before_kill=lambda rng: time.sleep(rng.uniform(0, 1.2)),
            )
            summary = check(Path(state), so, result["items"], args.kills)
    finally:
        stop()
    print(describe())
    print(summary)
    print(f"schedule {result['view']['status']} in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
