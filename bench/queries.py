"""Large queries against the real daemon: time and daemon memory of a 100,000-row Details, of
a 10,000-element schedule's view, and dispatch lateness while a large Details runs.

The daemon runs as its own process (so.mode = http against the tests' fake SO in a thread of
this process, which records when each POST arrives). It holds 10 schedules of 10,000 elements
(`n<k>-<i>`, planned for tomorrow). Memory is the daemon's VmRSS read from /proc every 5 ms
while a query runs: growth = the highest reading minus the one before.
Usage: python bench/queries.py [--schedules 10] [--elements 10000] [--plain]
(--plain asks without `more: true`, as a client older than streaming does.)"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from tests.cmso_requests import iso, request  # noqa: E402
from tests.fake_http import FakeSO  # noqa: E402
from tests.procs import Daemon, cmsoctl  # noqa: E402

LEAD_S = 1.0


def replies(path: Path, method: str, more: bool, **parameters: Any) -> Iterator[dict]:
    """The daemon's replies to one call, as they come."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        call = {"method": method, "parameters": parameters, "more": more}
        sock.sendall(json.dumps(call).encode() + b"\0")
        buffer = b""
        while True:
            while b"\0" not in buffer:
                data = sock.recv(1 << 22)
                assert data, "daemon closed the connection"
                buffer += data
            raw, _, buffer = buffer.partition(b"\0")
            reply = msgspec.json.decode(raw)
            yield reply
            if "error" in reply or not reply.get("continues"):
                return


def ask(path: Path, method: str, **parameters: Any) -> dict:
    (reply,) = replies(path, method, False, **parameters)
    assert "error" not in reply, reply
    return reply["parameters"]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """The daemon's highest VmRSS while the block runs, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_mb(self.pid)
        self.cpu_before = cpu_s(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))
        self.cpu = cpu_s(self.pid) - self.cpu_before

    @property
    def growth(self) -> float:
        return self.peak - self.before


def timed_rows(path: Path, method: str, key: str, more: bool, **parameters: Any) -> tuple:
    began = time.perf_counter()
    count, replies_n = 0, 0
    for reply in replies(path, method, more, **parameters):
        assert "error" not in reply, reply["error"]
        count += len(reply["parameters"].get(key, []))
        replies_n += 1
    return time.perf_counter() - began, count, replies_n


def submit(path: Path, schedule_id: str, nodes: list[str], start: datetime, per_slot: int) -> None:
    body = request(
        schedule_id, now=start, nodes=nodes, normal=1, additional=0, concurrency=per_slot
    )
    body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"] = iso(start)
    ask(path, "io.cmsod.Schedules.Create", schedule=body)


def wait_status(path: Path, schedule_id: str, status: str) -> None:
    for _ in range(6000):
        page = ask(path, "io.cmsod.Schedules.List", after=schedule_id[:-1], limit=1000)
        if any(s["scheduleId"] == schedule_id and s["status"] == status for s in page["schedules"]):
            return
        time.sleep(0.01)
    raise RuntimeError(f"{schedule_id} never reached {status}")


def lateness_ms(so: FakeSO, due: dict[str, float]) -> list[float]:
    deadline = time.time() + 60
    while time.time() < deadline:
        arrived = {
            r.path.removeprefix("/schedule/"): r.at for r in list(so.requests) if r.method == "POST"
        }
        if all(name in arrived for name in due):
            return sorted((arrived[name] - due[name]) * 1000 for name in due)
        time.sleep(0.1)
    raise RuntimeError("not every element was dispatched")


def burst(path: Path, so: FakeSO, schedule_id: str, n: int, during: Any = None) -> list[float]:
    """n elements due at one instant; `during()` is started 0.2 s before they fall due."""
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)
    submit(path, schedule_id, [f"{schedule_id}-{i}" for i in range(n)], start, n)
    wait_status(path, schedule_id, "Pending Approval")
    ask(
        path,
        "io.cmsod.Schedules.Approve",
        scheduleId=schedule_id,
        approval={
            "approvalUserId": "bench",
            "approvalType": "Tier 2",
            "approvalStatus": "Accepted",
        },
    )
    due_at = start.timestamp() - LEAD_S
    runner = None
    if during is not None:
        time.sleep(max(0.0, due_at - 0.2 - time.time()))
        runner = threading.Thread(target=during)
        runner.start()
    result = lateness_ms(so, {f"{schedule_id}-{i}": due_at for i in range(n)})
    if runner is not None:
        runner.join()
    return result


def percentiles(values: list[float]) -> str:
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"min {values[0]:6.1f} ms  p50 {statistics.median(values):6.1f} ms  p99 {p99:6.1f} ms  max {values[-1]:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=10)
    parser.add_argument("--elements", type=int, default=10_000)
    parser.add_argument("--plain", action="store_true", help="calls without more: true")
    args = parser.parse_args()
    more = not args.plain
    print(describe())
    so = FakeSO(["IN_PROGRESS"])
    stop = so.in_thread()
    env = {
        "CMSOD_SO__MODE": "http",
        "CMSOD_SO__URL": so.url,
        "CMSOD_DISPATCHER__LEAD_TIME_S": str(LEAD_S),
        "CMSOD_DISPATCHER__MAX_CONCURRENT": "100",  # as bench/dispatch.py
        "CMSOD_POLLER__INTERVAL_S": "3600",
        "CMSOD_CONTROL__IDLE_TIMEOUT_S": "600",
        "CMSOD_OPTIMIZER__APPROVAL_TIMEOUT_S": "3600",  # approved seconds before the start
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp)
            path = state / "control.sock"
            daemon = Daemon(state, extra_env=env)
            try:
                tomorrow = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
                for k in range(args.schedules):
                    nodes = [f"n{k}-{i:05}" for i in range(args.elements)]
                    submit(path, f"q{k}", nodes, tomorrow, 1000)
                    wait_status(path, f"q{k}", "Pending Approval")
                total = args.schedules * args.elements
                pid = daemon.proc.pid
                print(
                    f"{args.schedules} schedules x {args.elements:,} elements; daemon RSS "
                    f"{rss_mb(pid):.0f} MB; {'streamed (more: true)' if more else 'plain calls'}"
                )
                filters = {"vnfName": ["n%"]}
                with PeakRss(pid) as rss:
                    took, rows, n = timed_rows(
                        path, "io.cmsod.Schedules.Details", "details", more, filters=filters
                    )
                print(
                    f"  Details vnfName=n% ({rows:,} of {total:,} rows, {n} replies): "
                    f"{took:.2f} s (daemon CPU {rss.cpu:.2f} s), daemon RSS +{rss.growth:.0f} MB"
                )
                with PeakRss(pid) as rss:
                    took, rows, n = timed_rows(
                        path, "io.cmsod.Schedules.Get", "elements", more, scheduleId="q0"
                    )
                print(
                    f"  Get q0 ({args.elements:,} elements, {n} replies): {took:.2f} s "
                    f"(daemon CPU {rss.cpu:.2f} s), daemon RSS +{rss.growth:.0f} MB"
                )
                if more:
                    for command in (["details", "--filter", "vnfName=n%"], ["show", "q0"]):
                        with PeakRss(pid) as rss:
                            began = time.perf_counter()
                            code, out = cmsoctl(state, "--json", *command)
                            took = time.perf_counter() - began
                        assert code == 0, out[-500:]
                        print(
                            f"  cmsoctl --json {' '.join(command)}: {took:.2f} s wall "
                            f"({len(out) / 2**20:.0f} MB of JSON, daemon CPU {rss.cpu:.2f} s), "
                            f"daemon RSS +{rss.growth:.0f} MB"
                        )

                def big_details() -> None:
                    took, rows, _ = timed_rows(
                        path, "io.cmsod.Schedules.Details", "details", more, filters=filters
                    )
                    print(f"  (the Details meanwhile: {rows:,} rows in {took:.2f} s)")

                quiet = burst(path, so, "calm", 1000)
                print(
                    f"  dispatch lateness, 1,000 due at once, nothing else:  {percentiles(quiet)}"
                )
                busy = burst(path, so, "busy", 1000, big_details)
                print(f"  dispatch lateness, 1,000 due at once, Details runs: {percentiles(busy)}")
            finally:
                daemon.stop()
    finally:
        stop()


if __name__ == "__main__":
    main()
