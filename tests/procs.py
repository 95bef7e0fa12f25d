"""Helpers to run the real `cmsod` process and the real `cmsoctl` in tests and benchmarks.
Waits read the daemon's own log (stderr), never a sleep."""

from __future__ import annotations

import atexit
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

ENV = {  # short intervals so the end-to-end tests run in seconds
    "CMSOD_POLLER__INTERVAL_S": "0.2",
    "CMSOD_SO__SIMULATED_DURATION_S": "0.5",
    "CMSOD_DISPATCHER__LEAD_TIME_S": "0",
    "CMSOD_OPTIMIZER__INTERVAL_S": "0.5",
    # schedules planned to start a few seconds after they are submitted: on a loaded machine
    # the approval may come after the first slot began, which would expire them by default
    "CMSOD_OPTIMIZER__APPROVAL_TIMEOUT_S": "3600",
    "CMSOD_STORE__LEASE_S": "3",  # PostgreSQL: a frozen daemon's work is taken in seconds
}


class Daemon:
    """The real `cmsod --state-dir DIR` (or `--config FILE`) process, its log read as it goes.
    A daemon a test or benchmark failed to stop is killed when the interpreter exits."""

    alive: ClassVar[set[subprocess.Popen]] = set()

    def __init__(
        self,
        state_dir: Path,
        config: Path | None = None,
        extra_env: dict | None = None,
        ready: bool = True,  # False: do not wait for daemon.ready (a start meant to fail)
    ) -> None:
        self.state_dir = state_dir
        self.lines: list[str] = []
        where = ["--config", str(config)] if config else ["--state-dir", str(state_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmsod", *where],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **ENV, **(extra_env or {})},
        )
        Daemon.alive.add(self.proc)
        self._changed = threading.Condition()
        # read the log all the time: a full pipe would block the daemon in a log write
        threading.Thread(target=self._read, daemon=True).start()
        if ready:
            self.wait_log(r"event=daemon\.ready")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    _ended = False

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 60.0) -> list[str]:
        """The log lines (from this process's start) matching `pattern`, once there are
        `count` of them."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(found := [line for line in self.lines if regex.search(line)]) < count:
                left = deadline - time.monotonic()
                tail = "\n".join(self.lines[-30:])
                assert left > 0, f"no {count}x {pattern!r} in log:\n{tail}"
                assert not self._ended, f"daemon exited:\n{tail}"
                self._changed.wait(left)
        return found

    def exited(self, timeout: float = 30.0) -> int:
        """The exit code, once the process has ended and its log is all read."""
        code = self.proc.wait(timeout)
        Daemon.alive.discard(self.proc)
        with self._changed:
            while not self._ended:
                self._changed.wait(timeout)
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        Daemon.alive.discard(self.proc)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.wait_log(r"event=daemon\.stopped", timeout=20)
        finally:
            code = self.proc.wait(20)
            Daemon.alive.discard(self.proc)
        return code


@atexit.register
def _kill_leftovers() -> None:
    for proc in Daemon.alive:
        proc.kill()


def cmsoctl(state_dir: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "cmsod.ctl", "--socket", str(state_dir / "control.sock"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stdout + result.stderr


def kill_and_restart_run(
    state_dir: Path,
    so_url: str,
    elements: int,
    kills: int,
    seed: int,
    before_kill: Callable[[random.Random], None] = lambda rng: None,
) -> dict:
    """Run a schedule of `elements` work flows against the orchestrator at `so_url`, killing
    the daemon with SIGKILL `kills` times at random points of the flow (after a random number
    of progress lines, then `before_kill`) and restarting it. Returns the final views."""
    import json
    from datetime import UTC, datetime, timedelta

    from tests.cmso_requests import iso, request

    rng = random.Random(seed)
    env = {"CMSOD_SO__MODE": "http", "CMSOD_SO__URL": so_url}
    nodes = [f"n{i}" for i in range(elements)]
    now = datetime.now(UTC)
    body = request(
        "crash", now=now, nodes=nodes, normal=1, additional=0, concurrency=max(5, elements // 20)
    )
    body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"] = iso(
        now + timedelta(seconds=3)
    )
    daemon = Daemon(state_dir, extra_env=env)
    assert cmsoctl(state_dir, "submit", "-", stdin=json.dumps(body))[0] == 0
    daemon.wait_log(r"event=schedule\.optimized schedule_id=crash")
    assert cmsoctl(state_dir, "approve", "crash", "--user", "jf9860")[0] == 0
    progress = r"event=(element\.dispatched|element\.finished|element\.reconciled)"
    seen = 0
    for _ in range(kills):
        # a random point of the flow: a few more dispatches or completions from here
        target = seen + rng.randint(1, max(2, elements // max(1, kills)))
        lines = daemon.wait_log(progress, count=min(target, 2 * elements), timeout=120)
        seen = len(lines)
        before_kill(rng)
        daemon.kill()
        daemon = Daemon(state_dir, extra_env=env)
        seen = 0  # a new process: its log starts empty
    code, out = cmsoctl(state_dir, "--json", "show", "crash")
    if json.loads(out)["schedule"]["status"] not in ("Completed", "Completed with error(s)"):
        # (it may have finished under an earlier process, which logged it)
        daemon.wait_log(r"event=schedule\.finished schedule_id=crash", timeout=180)
        code, out = cmsoctl(state_dir, "--json", "show", "crash")
    assert code == 0, out
    assert daemon.stop() == 0
    view = json.loads(out)["schedule"]
    return {"view": view, "items": view["groups"][0]["changeManagementSchedules"]}
