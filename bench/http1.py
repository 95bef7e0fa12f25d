"""CPU per request of the orchestrator's HTTP/1.1 client, taken apart.

The fake SO runs in a process of its own (so its CPU is not counted); this process measures
its own CPU time (user + system) per request for:
- h11 alone: framing one GET and parsing one canned answer, no I/O (the floor h11 sets);
- raw trio: one pre-built GET at a time on one keep-alive socket, no parser (the floor of the
  I/O: send, receive, the event loop);
- the client: `HttpSO.statuses` with `--batch` polls pipelined down one connection, each framed
  by an h11 state machine of its own (the poller's way).
Usage: python bench/http1.py [--requests 5000] [--batch 25]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from cmsod.config import SoConfig, TlsConfig  # noqa: E402
from cmsod.peers import tls  # noqa: E402
from cmsod.peers.so import HttpSO  # noqa: E402

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.fake_http import FakeSO
so = FakeSO(["IN_PROGRESS"])
so.polls.update({f"req-{i}": 0 for i in range(1000)})
so.in_thread()
print(so.port, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
"""

ANSWER = (
    b'{"request": {"requestStatus": {"requestState": "IN_PROGRESS", "statusMessage": "x", '
    b'"percentProgress": 50, "finishTime": "Tue, 01 Dec 2026 09:00:00 GMT"}}}'
)


def h11_alone(n: int) -> float:
    answer = b"HTTP/1.1 200 X\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n%s" % (
        len(ANSWER),
        ANSWER,
    )
    headers = [("Host", "127.0.0.1:8080"), ("X-FromAppId", "cmso"), ("Accept", "application/json")]
    connection = h11.Connection(h11.CLIENT)
    start = time.process_time()
    for i in range(n):
        request = h11.Request(method="GET", target=f"/req-{i % 1000}", headers=headers)
        connection.send(request)
        connection.send(h11.EndOfMessage())
        connection.receive_data(answer)
        while not isinstance(connection.next_event(), h11.EndOfMessage):
            pass
        connection.start_next_cycle()
    return (time.process_time() - start) / n


async def raw_trio(port: int, n: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"GET /req-1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    start = time.process_time()
    for _ in range(n):
        await stream.send_all(request)
        data = b""
        while not data.endswith(b"}}}"):
            data += await stream.receive_some(65536)
    spent = time.process_time() - start
    await stream.aclose()
    return spent / n


async def client(port: int, n: int, batch: int) -> tuple[float, float]:
    so = HttpSO.from_config(
        SoConfig(mode="http", url=f"http://127.0.0.1:{port}"), batch, tls.context(TlsConfig())
    )
    ids = [f"req-{i}" for i in range(batch)]
    await so.statuses(ids)  # open the connections
    start, wall = time.process_time(), time.perf_counter()
    for _ in range(n // batch):
        await so.statuses(ids)
    spent, wall = time.process_time() - start, time.perf_counter() - wall
    await so.aclose()
    return spent / n, n / wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=25)
    args = parser.parse_args()
    print(describe())
    root = str(Path(__file__).resolve().parent.parent)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        n = args.requests
        print(f"h11 alone (frame a GET, parse its answer): {h11_alone(n) * 1e6:6.1f} us CPU")
        print(
            f"raw trio, one GET at a time, no parser:    {trio.run(raw_trio, port, n) * 1e6:6.1f} us CPU"
        )
        cpu, rate = trio.run(client, port, n, args.batch)
        print(
            f"HttpSO.statuses, {args.batch} pipelined:         {cpu * 1e6:6.1f} us CPU "
            f"({rate:,.0f} polls/s)"
        )
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(10)


if __name__ == "__main__":
    main()
