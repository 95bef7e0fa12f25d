"""CM events drained to an HTTP sink on loopback: Message Router (`--sink http`, the
default) or a Kafka REST proxy (`--sink kafka`).

The real daemon runs as its own process with events.sink = http (or kafka); the bus is the
tests' fake MR (or fake Kafka REST proxy: records put in partitions by key, offsets given)
in a thread of this process, recording when each event arrives.
1. drain: a backlog of `--backlog` events of `--backlog-schedules` schedules, interleaved as
   a busy daemon writes them (each schedule's 1st event, then each one's 2nd, ...), is put in
   the outbox of a stopped daemon (real envelopes from cmevents.build, written by the store's
   own SQL); the daemon starts with the bus up. Rate = events / (the last event taken - the
   first POST's arrival), so the daemon's start-up is not counted.
2. lag: with the bus up, schedules are submitted at a steady rate; lag = arrival time minus the
   event's eventTime (the transition's commit time). p50 / p99.
Usage: python bench/events.py [--backlog 100000] [--backlog-schedules 20000] [--rate 40]
       [--seconds 10] [--batch-size N (default: the daemon's)] [--sink http|kafka]"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from cmsod import cmevents  # noqa: E402
from tests.cmso_requests import request  # noqa: E402
from tests.fake_http import FakeHTTP, FakeKafkaProxy, Reply, Request, Reset  # noqa: E402
from tests.procs import Daemon  # noqa: E402
from tests.test_events import Bus, cambria_messages  # noqa: E402


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


def seed_outbox(store: Path, events: int, schedules: int) -> None:
    """`events` real CM events of `schedules` schedules into the outbox, round robin."""
    now_ms = int(time.time() * 1000)
    rows = []
    for n in range(events):
        schedule_id, seq = f"bk{n % schedules}", n // schedules + 1
        edit = cmevents.schedule_edit(schedule_id, "patch", {"status": "Scheduled"})
        body = cmevents.encode(cmevents.build(schedule_id, seq, [edit], now_ms, "urn:onap:cmsod"))
        rows.append((schedule_id, "cm-events", body, now_ms))
    with sqlite3.connect(store) as db:
        db.executemany(
            "INSERT INTO events (schedule_id, topic, body, created_ms) VALUES (?, ?, ?, ?)", rows
        )


class Sink:
    """The fake bus of one kind: `count(request)` takes a POST and returns (its answer, how
    many events it held); `new_events()` returns the events taken since the last call."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.seen = 0
        if kind == "kafka":
            self.proxy = FakeKafkaProxy()
            self.proxy.check_shape = False  # (the daemon is measured, not the checks)
            self.server: FakeHTTP = self.proxy
        else:
            self.bus = Bus(validate=False)
            self.server = self.bus

    def count(self, req: Request) -> tuple[Reply, int]:
        if self.kind == "kafka":
            reply = self.proxy.handle(req)
            self.proxy.written.clear()
            assert isinstance(reply, Reply), reply
            return reply, len(self.proxy.posts[-1])
        messages = cambria_messages(req.body)
        self.bus.requests.clear()
        return Reply(200, {"count": len(messages), "serverTimeMs": 1}), len(messages)

    def handle(self, req: Request):
        if self.kind == "kafka":
            return self.proxy.handle(req)
        return self.bus.handle(req)

    def new_events(self) -> list[dict]:
        events = self.proxy.events() if self.kind == "kafka" else self.bus.received["cm-events"]
        new, self.seen = events[self.seen :], len(events)
        return new


def drain(args: argparse.Namespace, env: dict) -> None:
    taken: list[tuple[float, float, int]] = []  # (POST arrived, answered, events)
    all_in = threading.Event()
    sink = Sink(args.sink)

    def count(req: Request):  # checked and counted; the events themselves are not kept
        reply, n = sink.count(req)
        sink.server.requests.clear()
        taken.append((req.at, time.time(), n))
        if sum(n for _, _, n in taken) >= args.backlog:
            all_in.set()
        return reply

    sink.server.handler = lambda req: Reset()  # down while the first daemon makes the store
    stop = sink.server.in_thread()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp)
            env = {**env, "CMSOD_EVENTS__URL": sink.server.url}
            Daemon(state, extra_env=env).stop()
            seed_outbox(state / "cmsod.sqlite3", args.backlog, args.backlog_schedules)
            sink.server.handler = count
            daemon = Daemon(state, extra_env=env)
            try:
                if not all_in.wait(600):
                    raise SystemExit(f"only {sum(n for _, _, n in taken):,} events arrived")
                drain_s = taken[-1][1] - taken[0][0]
                sizes = [n for _, _, n in taken]
                print(
                    f"drain ({args.sink}): {args.backlog:,} events of "
                    f"{args.backlog_schedules:,} schedules in {len(taken)} POSTs of up to "
                    f"{max(sizes)} events: {drain_s:.2f} s = {args.backlog / drain_s:,.0f} events/s"
                )
            finally:
                daemon.stop()
    finally:
        stop()


def lag(args: argparse.Namespace, env: dict) -> None:
    sink = Sink(args.sink)
    arrivals: list[tuple[float, dict]] = []

    def timed(req: Request):  # note each event's arrival time
        reply = sink.handle(req)
        if not isinstance(reply, Reset) and req.method == "POST":
            now = time.time()
            arrivals.extend((now, e) for e in sink.new_events())
        return reply

    sink.server.handler = timed
    stop = sink.server.in_thread()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp)
            daemon = Daemon(state, extra_env={**env, "CMSOD_EVENTS__URL": sink.server.url})
            try:
                control = Control(state / "control.sock")
                now = datetime.now(UTC)
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
                    f"lag ({args.sink}): {n} schedules at {args.rate:g}/s, {len(lag):,} events: p50 {statistics.median(lag):.1f} ms, p99 {p99:.1f} ms, max {lag[-1]:.1f} ms"
                )
            finally:
                daemon.stop()
    finally:
        stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--backlog-schedules", type=int, default=20_000)
    parser.add_argument(
        "--rate", type=float, default=40.0, help="schedules per second in the lag run"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, help="events.batch_size (default: the daemon's)")
    parser.add_argument(
        "--sink", choices=["http", "kafka"], default="http", help="MR (http) or Kafka REST proxy"
    )
    args = parser.parse_args()
    print(describe())
    env = {"CMSOD_EVENTS__SINK": args.sink, "CMSOD_CONTROL__IDLE_TIMEOUT_S": "600"}
    if args.batch_size:
        env["CMSOD_EVENTS__BATCH_SIZE"] = str(args.batch_size)
    drain(args, env)
    lag(args, env)


if __name__ == "__main__":
    main()
