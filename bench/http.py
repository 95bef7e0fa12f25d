"""CMSO's REST API through the real daemon: create -> Pending Approval, concurrent GETs, and a
scheduleDetails of 100,000 rows.

Starts `cmsod --state-dir <tmp>` with `[http] listen` on a loopback port and a credentials file
(one user, the default scrypt cost: checked once, then remembered), then:
1. creates `--runs` schedules of `--elements` elements with HTTP POST (one kept-alive
   connection) and polls GET until each is `Pending Approval`: p50/p99/max;
2. `--concurrent` connections at once, each sending `--per-connection` GETs of a 1-element
   schedule, then of an `--elements`-element one (HTTP/1.1 keep-alive, raw trio sockets so that the client
   costs little of the 2 cores it shares with the daemon): requests/s;
3. creates schedules totalling `--rows` elements and times one scheduleDetails of all rows
   (streamed: time to the first byte and to the last, and the daemon's resident memory).
Usage: python bench/http.py [--elements 100] [--runs 50] [--concurrent 1000] [--rows 100000]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root instead of bench/: this file's name would hide the standard `http`.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402

import httpx  # noqa: E402
import trio  # noqa: E402

from bench.machine import describe  # noqa: E402
from cmsod.rest.auth import hash_password  # noqa: E402
from tests.cmso_requests import request  # noqa: E402
from tests.procs import Daemon  # noqa: E402

BASE = "/cmso/v1/schedules"
USER, PASSWORD = "bench", "bench-password"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssPeak:
    """The largest resident size of process `pid`, looked at every 10 ms until stop()."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, rss_mb(pid), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def schedule_body(schedule_id: str, elements: int) -> dict:
    nodes = [f"{schedule_id}-n{i}" for i in range(elements)]
    # a window from 5 minutes on: planned at once, never dispatched during the run
    return request(
        schedule_id, now=datetime.now(UTC) + timedelta(minutes=5), nodes=nodes, concurrency=10
    )


def create_to_pending(client: httpx.Client, runs: int, elements: int) -> list[float]:
    took = []
    for run in range(runs):
        schedule_id = f"create-{run}"
        body = schedule_body(schedule_id, elements)
        began = time.perf_counter()
        answer = client.post(f"{BASE}/{schedule_id}", json=body)
        assert answer.status_code == 202, answer.text
        while client.get(f"{BASE}/{schedule_id}").json()["status"] != "Pending Approval":
            pass
        took.append(time.perf_counter() - began)
    return took


async def one_connection(host: str, port: int, path: str, count: int, sizes: list[int]) -> None:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\n\r\n".encode()
    stream = await trio.open_tcp_stream(host, port)
    buffer = b""
    async with stream:
        for _ in range(count):
            await stream.send_all(head)
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(1 << 16)
            header, _, buffer = buffer.partition(b"\r\n\r\n")
            assert header.startswith(b"HTTP/1.1 200"), header
            match = re.search(rb"content-length: (\d+)", header, re.IGNORECASE)
            assert match is not None
            length = int(match[1])
            while len(buffer) < length:
                buffer += await stream.receive_some(1 << 16)
            sizes.append(length)
            buffer = buffer[length:]


async def concurrent_gets(
    address: str, schedule_id: str, connections: int, per_connection: int
) -> tuple[float, int]:
    host, port = address.split(":")
    sizes: list[int] = []
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(
                one_connection, host, int(port), f"{BASE}/{schedule_id}", per_connection, sizes
            )
    elapsed = time.perf_counter() - began
    assert len(sizes) == connections * per_connection
    return elapsed, sizes[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=100)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state_dir:
        state = Path(state_dir)
        users = state / "users"
        users.write_text(f"{USER}:approve:{hash_password(PASSWORD)}\n")
        daemon = Daemon(
            state,
            extra_env={
                "CMSOD_HTTP__LISTEN": "127.0.0.1:0",
                "CMSOD_HTTP__CREDENTIALS_FILE": str(users),
                "CMSOD_HTTP__MAX_BODY_BYTES": str(64 * 1024 * 1024),
                "CMSOD_OPTIMIZER__INTERVAL_S": "10",
            },
        )
        try:
            line = daemon.wait_log(r"event=http\.listening")[0]
            address = re.search(r"address=(\S+)", line)[1]  # type: ignore[index]
            with httpx.Client(
                base_url=f"http://{address}", auth=(USER, PASSWORD), timeout=300
            ) as client:
                client.get(BASE)  # the one KDF check, outside the figures
                created = create_to_pending(client, args.runs, args.elements)
                small = client.post(f"{BASE}/small", json=schedule_body("small", 1))
                assert small.status_code == 202, small.text
                gets = {
                    schedule_id: trio.run(
                        concurrent_gets, address, schedule_id, args.concurrent, args.per_connection
                    )
                    for schedule_id in ("small", "create-0")
                }
                per_schedule = 10_000
                made = 0
                while made < args.rows:
                    n = min(per_schedule, args.rows - made)
                    body = schedule_body(f"rows-{made}", n)
                    answer = client.post(f"{BASE}/rows-{made}", json=body)
                    assert answer.status_code == 202, answer.text
                    made += n
                if args.rows:
                    rss_before = rss_mb(daemon.proc.pid)
                    peak = RssPeak(daemon.proc.pid)
                    began = time.perf_counter()
                    with client.stream(
                        "GET", f"{BASE}/scheduleDetails", params={"vnfName": "rows-%"}
                    ) as details:
                        assert details.status_code == 200, details.read()[:500]
                        chunks = details.iter_bytes()
                        body = [next(chunks)]
                        first_byte_s = time.perf_counter() - began
                        body += list(chunks)
                    details_s = time.perf_counter() - began
                    peak.stop()
                    content = b"".join(body)
                    rows, details_bytes = len(json.loads(content)), len(content)
        finally:
            daemon.stop()
    created.sort()
    total = args.concurrent * args.per_connection
    print(describe())
    print(f"real daemon, HTTP/1.1 on loopback, basic auth; {args.elements}-element schedules")
    print(
        f"  create -> Pending Approval ({args.runs} runs): p50 {statistics.median(created) * 1000:6.1f} ms"
        f"  p99 {created[int(0.99 * (len(created) - 1))] * 1000:6.1f} ms  max {created[-1] * 1000:6.1f} ms"
    )
    for schedule_id, (elapsed, size) in gets.items():
        print(
            f"  {args.concurrent} connections x {args.per_connection} GETs of {schedule_id}"
            f" ({size:,} bytes): {total:,} in {elapsed:.2f} s = {total / elapsed:,.0f} requests/s"
        )
    if args.rows:
        print(
            f"  scheduleDetails of {rows:,} rows (streamed): {details_s:.2f} s, first byte after"
            f" {first_byte_s * 1000:.0f} ms, {details_bytes / 1e6:.1f} MB; daemon RSS"
            f" {rss_before:.0f} MB before, {peak.peak:.0f} MB at most during it"
        )


if __name__ == "__main__":
    main()
