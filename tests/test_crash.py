"""The real daemon against an HTTP orchestrator on loopback, killed with SIGKILL at random
points and restarted: no element dispatched twice, none lost, the database intact. (A longer
run, 200+ elements and 20+ kills, is `python bench/crash.py`.)"""

from __future__ import annotations

import collections
import os
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import store_rows
from tests.fake_http import FakeSO
from tests.procs import kill_and_restart_run


def check(state_dir: Path, so: FakeSO, items: list[dict], kills: int) -> str:
    started = collections.Counter(vnf for _, vnf in so.started)
    duplicated = sum(n - 1 for n in started.values() if n > 1)
    ended = {"Completed", "Error", "Scheduling Failed"}
    lost = [i["vnfName"] for i in items if i["status"] not in ended]
    unexplained = [
        i["vnfName"] for i in items if i["status"] != "Completed" and not i.get("statusMessage")
    ]
    if not os.environ.get("CMSOD_STORE__URL"):
        with sqlite3.connect(state_dir / "cmsod.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert store_rows(state_dir, "SELECT max(dispatch_attempts) FROM elements") == [(1,)]
    assert duplicated == 0, started
    assert not lost and not unexplained, (lost, unexplained)
    # an element SO never started was never Completed; one it started was, or is reconciled
    for item in items:
        if item["vnfName"] not in started:
            assert item["status"] != "Completed", item
    reconciled = sum(i["status"] != "Completed" for i in items)
    return f"{kills} kills, {len(started)} dispatched, {duplicated} duplicated, {len(lost)} lost ({reconciled} reconciled with a message)"


@pytest.mark.usefixtures("backend")
def test_kill_9_at_random_points_against_an_http_orchestrator(tmp_path: Path) -> None:
    so = FakeSO(["IN_PROGRESS", "COMPLETE"])
    stop = so.in_thread()
    try:
        result = kill_and_restart_run(tmp_path, so.url, elements=40, kills=3, seed=11)
    finally:
        stop()
    print(check(tmp_path, so, result["items"], kills=3))
