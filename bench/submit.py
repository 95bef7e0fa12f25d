"""Time from `cmsoctl submit` to `Pending Approval`, through the real daemon.

Starts `cmsod --state-dir <tmp>` on the embedded defaults, submits schedules of N elements
with the real `cmsoctl`, and polls the control socket until each is `Pending Approval`.
Usage: python bench/submit.py [--elements 100] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from tests.cmso_requests import request  # noqa: E402


def ask(path: str, method: str, **parameters) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(json.dumps({"method": method, "parameters": parameters}).encode() + b"\0")
        data = b""
        while not data.endswith(b"\0"):
            data += sock.recv(1 << 20)
    return json.loads(data[:-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        sock = f"{state}/control.sock"
        log = open(f"{state}/daemon.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "cmsod", "--state-dir", state], stderr=log)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                assert time.monotonic() < deadline, "daemon did not start"
                time.sleep(0.01)
            submit_s, ready_s = [], []
            nodes = [f"n{i}" for i in range(args.elements)]
            for run in range(args.runs):
                body = request(
                    f"bench-{run}",
                    now=datetime.now(UTC) + timedelta(minutes=5),
                    nodes=nodes,
                    concurrency=10,
                )
                began = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "cmsod.ctl", "--socket", sock, "submit", "-"],
                    input=json.dumps(body).encode(),
                    check=True,
                    capture_output=True,
                )
                submitted = time.perf_counter()
                while (
                    ask(sock, "io.cmsod.Schedules.Get", scheduleId=f"bench-{run}")["parameters"][
                        "schedule"
                    ]["status"]
                    != "Pending Approval"
                ):
                    time.sleep(0.001)
                submit_s.append(submitted - began)
                ready_s.append(time.perf_counter() - began)
        finally:
            daemon.terminate()
            daemon.wait(10)
    print(describe())
    print(
        f"{args.elements}-element schedule, {args.runs} runs, real daemon on the embedded defaults"
    )
    print(
        f"  cmsoctl submit returned:        median {statistics.median(submit_s) * 1000:7.1f} ms  max {max(submit_s) * 1000:7.1f} ms"
    )
    print(
        f"  submit -> Pending Approval:     median {statistics.median(ready_s) * 1000:7.1f} ms  max {max(ready_s) * 1000:7.1f} ms"
    )
    print("  (includes starting the cmsoctl Python process, about 60-100 ms of it)")


if __name__ == "__main__":
    main()
