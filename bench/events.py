"""CM events drained to an HTTP sink (Message Router style) on loopback.

The real daemon runs as its own process with events.sink = http; the bus is the tests' fake
MR in a thread of this process, recording when each event arrives.
1. drain: with the bus down, schedules pile up events in the outbox; then it comes back and
   the time to drain the backlog gives events per second.
2. lag: with the bus up, schedules are submitted at a steady rate; lag = arrival time minus the
   event's eventTime (the transition's commit time). p50 / p99.
Usage: python bench/events.py [--schedules 2000] [--rate 40] [--seconds 10]"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from tests.cmso_requests import request  # noqa: E402
from tests.fake_http import Reset  # noqa: E402
from tests.procs import Daemon  # noqa: E402
from tests.test_events import Bus  # noqa: E402


class Control:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buffer = b""

    def call(self, method: str, **parameters) -> dict:
        self.sock.sendall(json.dumps({"method": method, "parameters": parameters}).encode() + b"\0")
        while b"\0" not in self.buffer:
            self.buffer += self.sock.recv(1 << 20)
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)


def pending(control: Control) -> int:
    return control.call("io.cmsod.Manager.Status")["parameters"]["counts"]["eventsPending"]


def event_time(event: dict) -> float:
    return datetime.strptime(event["eventTime"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=2000)
    parser.add_argument(
        "--rate", type=float, default=40.0, help="schedules per second in the lag run"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(describe())
    bus = Bus(validate=False)
    arrivals: list[tuple[float, dict]] = []
    handle = bus.handle

    def timed(request):  # note each event's arrival time
        reply = handle(request)
        if not isinstance(reply, Reset) and request.method == "POST":
            now = time.time()
            arrivals.extend((now, e) for e in bus.received["cm-events"][len(arrivals) :])
        return reply

    bus.handler = timed
    stop = bus.in_thread()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp)
            env = {
                "CMSOD_EVENTS__SINK": "http",
                "CMSOD_EVENTS__URL": bus.url,
                "CMSOD_CONTROL__IDLE_TIMEOUT_S": "600",
            }
            daemon = Daemon(state, extra_env=env)
            try:
                control = Control(state / "control.sock")
                now = datetime.now(UTC)
                bus.faults = [Reset()] * 10**9  # down
                for i in range(args.schedules):
                    body = request(
                        f"d{i}", now=now, nodes=[f"d{i}-a", f"d{i}-b"], minutes_from_now=60
                    )
                    assert "error" not in control.call("io.cmsod.Schedules.Create", schedule=body)
                while control.call(
                    "io.cmsod.Schedules.List",
                    status=["Pending Schedule", "Optimization In Progress"],
                )["parameters"]["schedules"]:
                    time.sleep(0.1)
                backlog = pending(control)
                bus.faults = []  # back up
                began = time.time()
                while pending(control):
                    time.sleep(0.01)
                drain_s = time.time() - began
                print(
                    f"drain: {backlog:,} events backlogged, delivered in {drain_s:.2f} s = {backlog / drain_s:,.0f} events/s"
                )

                arrivals.clear()
                bus.received.clear()
                began = time.time()
                n = 0
                while time.time() - began < args.seconds:
                    body = request(
                        f"l{n}", now=now, nodes=[f"l{n}-a", f"l{n}-b"], minutes_from_now=60
                    )
                    assert "error" not in control.call("io.cmsod.Schedules.Create", schedule=body)
                    n += 1
                    time.sleep(max(0.0, began + n / args.rate - time.time()))
                while (
                    pending(control)
                    or control.call(
                        "io.cmsod.Schedules.List",
                        status=["Pending Schedule", "Optimization In Progress"],
                    )["parameters"]["schedules"]
                ):
                    time.sleep(0.05)
                lag = sorted((at - event_time(e)) * 1000 for at, e in arrivals)
                p99 = lag[min(len(lag) - 1, int(len(lag) * 0.99))]
                print(
                    f"lag: {n} schedules at {args.rate:g}/s, {len(lag):,} events: p50 {statistics.median(lag):.1f} ms, p99 {p99:.1f} ms, max {lag[-1]:.1f} ms"
                )
            finally:
                daemon.stop()
    finally:
        stop()


if __name__ == "__main__":
    main()
