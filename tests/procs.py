"""Helpers to run the real `cmsod` process and the real `cmsoctl` in tests and benchmarks.
Waits read the daemon's own log (stderr), never a sleep."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {  # short intervals so the end-to-end tests run in seconds
    "CMSOD_POLLER__INTERVAL_S": "0.2",
    "CMSOD_SO__SIMULATED_DURATION_S": "0.5",
    "CMSOD_DISPATCHER__LEAD_TIME_S": "0",
    "CMSOD_OPTIMIZER__INTERVAL_S": "0.5",
}


class Daemon:
    def __init__(
        self, state_dir: Path, config: Path | None = None, extra_env: dict | None = None
    ) -> None:
        self.state_dir = state_dir
        self.lines: list[str] = []
        where = ["--config", str(config)] if config else ["--state-dir", str(state_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmsod", *where],
            stderr=subprocess.PIPE,
            env={**os.environ, **ENV, **(extra_env or {})},
        )
        self._partial = b""
        self.wait_log(r"event=daemon\.ready")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 60.0) -> list[str]:
        """Read the daemon's log until `count` lines match `pattern` (from its start)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        while len(found := [line for line in self.lines if regex.search(line)]) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"no {count}x {pattern!r} in log:\n" + "\n".join(self.lines[-30:])
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                assert chunk, "daemon exited:\n" + "\n".join(self.lines[-30:])
                *complete, self._partial = (self._partial + chunk).split(b"\n")
                self.lines.extend(c.decode() for c in complete)
        return found

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.wait_log(r"event=daemon\.stopped", timeout=20)
        finally:
            code = self.proc.wait(20)
        return code


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
    state_dir: Path, so_url: str, elements: int, kills: int, seed: int
) -> dict:
    """Run a schedule of `elements` work flows against the orchestrator at `so_url`, killing
    the daemon with SIGKILL `kills` times at random points of the flow and restarting it.
    Returns the final element views and how often each was killed."""
    import json
    import random
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
        daemon.kill()
        daemon = Daemon(state_dir, extra_env=env)
        seen = 0  # a new process: its log starts empty
    daemon.wait_log(r"event=schedule\.finished schedule_id=crash", timeout=180)
    code, out = cmsoctl(state_dir, "--json", "show", "crash")
    assert code == 0, out
    assert daemon.stop() == 0
    view = json.loads(out)["schedule"]
    return {"view": view, "items": view["groups"][0]["changeManagementSchedules"]}
