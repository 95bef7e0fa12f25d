"""Several daemons on one store, killed and frozen while a rollout runs (issue 15).

Starts `--daemons N` real cmsod processes, each with its own state folder and control socket,
all on the store given by `--store`, against the tests' fake SO on loopback (in a thread of
this process; each daemon reaches it under its own path prefix /d<i>, so the record says who
dispatched what) and one shared event sink: the tests' fake Kafka REST proxy (`--sink kafka`,
the default) or, with one daemon, its event file (`--sink file`). A rollout of `--elements`
elements due over `--minutes` minutes is submitted through one daemon and approved; while it
runs, `--kills` times a random daemon is killed with SIGKILL at a random moment (half of them
just as a burst of dispatches begins, so that work is held) and restarted, and `--stops`
times another (the only one, with one daemon) is frozen with SIGSTOP for 1.5 x `--lease-s`,
longer than a lease, then SIGCONT.

At the end, from the fake SO's record and the schedule's view: 0 dispatched twice, 0 lost
(every element terminal, or reconciled with a message; none Completed that SO never
started); the takeover time of each kill: from the death until the last of the elements it
left late (due before the next kill or stop, dispatched later than 0.25 s and than 3x the
rollout's median lateness after they fell due) went out, p50 and max; and from the sink, every schedule's events complete (patch-ids 1..n,
none missing), in order, in one partition, and the last event of each element and of the
schedule saying what the view says.

Stores: `--store sqlite:///path/cmsod.sqlite3` (or a plain path; the default is a file in a
temporary folder) is passed as `CMSOD_STORE__PATH`; SQLite takes one daemon per store, so
it runs with `--daemons 1` (the one daemon killed and restarted, frozen and thawed; its
takeover is its restart). `--store postgresql://...` is passed as `CMSOD_STORE__URL` and
`--lease-s` as `CMSOD_STORE__LEASE_S` (`[store] url` and `lease_s` of the PostgreSQL
backend); `--env KEY=VALUE` adds any other setting to every daemon.

Usage: python -m bench.ha [--daemons 3] [--store URL] [--elements 2000] [--minutes 3]
       [--kills 10] [--stops 1] [--lease-s 15] [--seed 1] [--sink kafka|file] [--env K=V]..."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from tests.cmso_requests import iso, request  # noqa: E402
from tests.fake_http import FakeKafkaProxy, FakeSO, Reply, Request  # noqa: E402
from tests.procs import Daemon, cmsoctl  # noqa: E402
from tests.test_events import in_order_and_complete  # noqa: E402

SCHEDULE = "ha"
ENDED = {"Completed", "Error", "Scheduling Failed"}
LATE_MIN_S = 0.25  # dispatched later than this after falling due, and than 3x the median
# lateness of the whole rollout: work a death or a freeze held up


class SharedSO(FakeSO):
    """The fake SO, reached by daemon i under /d<i>: `dispatched` records (vnf, daemon,
    wall time) of every work flow started."""

    def __init__(self) -> None:
        super().__init__(["COMPLETE"])
        self.dispatched: list[tuple[str, int, float]] = []

    def handle(self, request: Request) -> Any:
        prefix, _, rest = request.path.lstrip("/").partition("/")
        if not prefix.startswith("d") or not prefix[1:].isdigit():
            return Reply(404, b"no daemon prefix")
        request.path = "/" + rest
        started = len(self.started)
        reply = super().handle(request)
        if len(self.started) > started:
            self.dispatched.append((self.started[-1][1], int(prefix[1:]), time.time()))
        return reply


def store_env(store: str, tmp: Path, lease_s: float) -> tuple[dict[str, str], str]:
    if store.startswith(("postgresql://", "postgres://")):
        return {"CMSOD_STORE__URL": store, "CMSOD_STORE__LEASE_S": f"{lease_s:g}"}, "postgresql"
    path = Path(store.removeprefix("sqlite://")) if store else tmp / "cmsod.sqlite3"
    return {"CMSOD_STORE__PATH": str(path.resolve())}, "sqlite"


class Fleet:
    """The N daemons: daemon i in <tmp>/d<i>, restarted in place after a kill."""

    def __init__(self, tmp: Path, n: int, env: dict[str, str], so_url: str) -> None:
        self.dirs = [tmp / f"d{i}" for i in range(n)]
        self.env = [{**env, "CMSOD_SO__URL": f"{so_url}/d{i}"} for i in range(n)]
        self.daemons: list[Daemon] = []
        for i, state in enumerate(self.dirs):
            state.mkdir()
            self.daemons.append(Daemon(state, extra_env=self.env[i]))

    def restart(self, i: int) -> None:
        self.daemons[i] = Daemon(self.dirs[i], extra_env=self.env[i])

    def ctl(self, *args: str, stdin: str | None = None) -> tuple[int, str]:
        """cmsoctl through the first daemon that answers."""
        out = ""
        for state in self.dirs:
            code, out = cmsoctl(state, *args, stdin=stdin)
            if code == 0:
                return code, out
        return 1, out

    def view(self) -> dict:
        code, out = self.ctl("--json", "show", SCHEDULE)
        assert code == 0, out
        return json.loads(out)["schedule"]


def submit(fleet: Fleet, args: argparse.Namespace) -> float:
    """The rollout, due from `lead` seconds from now over `--minutes`; returns its first due
    time (epoch s)."""
    span_s = args.minutes * 60
    concurrency = math.ceil(args.elements / span_s)  # 1-second slots
    now = datetime.now(UTC)
    start = now + timedelta(seconds=args.lead_s)
    body = request(
        SCHEDULE,
        now=now,
        nodes=[f"ha{i:05d}" for i in range(args.elements)],
        normal=1,
        additional=0,
        concurrency=concurrency,
    )
    body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"] = iso(start)
    code, out = fleet.ctl("submit", "-", stdin=json.dumps(body))
    assert code == 0, out
    while fleet.view()["status"] != "Pending Approval":
        time.sleep(0.2)
    code, out = fleet.ctl("approve", SCHEDULE, "--user", "jf9860")
    assert code == 0, out
    return start.replace(microsecond=0).timestamp()


def chaos(
    fleet: Fleet, so: SharedSO, args: argparse.Namespace, first_due: float, rng: random.Random
) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """The kills and stops, spread over the rollout; returns (daemon, death time) per kill and
    (daemon, stopped, continued) per stop."""
    actions = ["kill"] * args.kills + ["stop"] * args.stops
    rng.shuffle(actions)
    span_s = args.minutes * 60
    step = span_s / (len(actions) + 1)
    kills: list[tuple[int, float]] = []
    stops: list[tuple[int, float, float]] = []
    n = len(fleet.daemons)
    for k, action in enumerate(actions):
        moment = first_due + step * (k + rng.uniform(0.5, 1.5))
        time.sleep(max(0.0, moment - time.time()))
        victim = rng.randrange(n)
        if action == "stop":
            pid = fleet.daemons[victim].proc.pid
            os.kill(pid, signal.SIGSTOP)
            stopped = time.time()
            time.sleep(args.lease_s * 1.5)
            os.kill(pid, signal.SIGCONT)
            stops.append((victim, stopped, time.time()))
            print(f"  stop daemon {victim} for {time.time() - stopped:.1f} s", flush=True)
            continue
        if rng.random() < 0.5:  # just as a burst begins: work held at the death
            seen = len(so.dispatched)
            try:
                so.wait_for(lambda seen=seen: len(so.dispatched) > seen, timeout_s=10)
            except AssertionError:
                pass  # no more bursts: a moment like any other
            time.sleep(rng.uniform(0, 0.03))
        death = time.time()
        fleet.daemons[victim].kill()
        kills.append((victim, death))
        fleet.restart(victim)
        print(f"  kill daemon {victim}: back in {time.time() - death:.1f} s", flush=True)
    return kills, stops


def takeovers(
    kills: list[tuple[int, float]],
    stops: list[tuple[int, float, float]],
    due: dict[str, float],
    arrived: dict[str, float],
) -> list[float]:
    """Per kill: from the death until the last element it left late went out."""
    lateness = sorted(at - due[vnf] for vnf, at in arrived.items())
    late_s = max(LATE_MIN_S, 3 * statistics.median(lateness)) if lateness else LATE_MIN_S
    disruptions = sorted([t for _, t in kills] + [t for _, t, _ in stops])
    out = []
    for _, death in kills:
        later = [t for t in disruptions if t > death]
        until = later[0] if later else math.inf
        held = [
            at - max(due[vnf], death)
            for vnf, at in arrived.items()
            if at > death and due[vnf] < until and at - due[vnf] > late_s
        ]
        if held:
            out.append(max(held))
    return out


def read_events(args: argparse.Namespace, proxy: FakeKafkaProxy | None, fleet: Fleet) -> list:
    if proxy is not None:
        assert not proxy.refused, proxy.refused
        parts = proxy.partitions_of_keys()
        assert all(len(p) == 1 for p in parts.values()), "a schedule in two partitions"
        return proxy.events()
    folder = fleet.dirs[0] / "events"
    files = sorted(folder.glob("cm-events.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    files.append(folder / "cm-events.jsonl")
    return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]


def check_events(events: list[dict], view: dict) -> str:
    per_schedule = in_order_and_complete(events)  # patch-ids 1..n in order, none missing
    last: dict[str, str] = {}
    for event in events:
        patch = event["event"]["push-change-update"]["datastore-changes"][
            "ietf-yang-patch:yang-patch"
        ]
        for edit in patch["edit"]:
            value = edit["value"]
            for node in value.get("cm-schedule:vnf", []) + value.get("cm-schedule:schedule", []):
                if "status" in node:
                    last[node.get("vnf-name") or f"schedule {node.get('schedule-id')}"] = node[
                        "status"
                    ]
    items = view["groups"][0]["changeManagementSchedules"]
    wrong = [i["vnfName"] for i in items if last.get(i["vnfName"]) != i["status"]]
    assert not wrong, f"last event of {wrong[:5]} is not the element's status"
    final = last.get(f"schedule {SCHEDULE}")
    assert final == view["status"], f"the schedule's last event says {final}, not {view['status']}"
    ids = [e["eventId"] for e in events]
    return (
        f"events: {len(set(ids)):,} of {len(per_schedule)} schedule(s) complete and in order "
        f"({len(ids) - len(set(ids))} delivered twice, at least once)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--store", default="", help="sqlite:///path, a path, or postgresql://")
    parser.add_argument("--elements", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=3.0, help="the rollout's due span")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--stops", type=int, default=1)
    parser.add_argument("--lease-s", type=float, default=15.0, help="[store] lease_s")
    parser.add_argument("--lead-s", type=float, default=30.0, help="submit to first due")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sink", choices=["kafka", "file"], default="kafka")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every daemon")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    so = SharedSO()
    stop_so = so.in_thread()
    proxy = FakeKafkaProxy() if args.sink == "kafka" else None
    stop_proxy = proxy.in_thread() if proxy is not None else (lambda: None)
    began = time.time()
    try:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            env, backend = store_env(args.store, tmp, args.lease_s)
            if backend == "sqlite" and args.daemons != 1:
                raise SystemExit(
                    "SQLite takes one daemon per store: use --daemons 1, or "
                    "--store postgresql://... for several"
                )
            if args.sink == "file" and args.daemons != 1:
                raise SystemExit("--sink file: one daemon only (each writes its own files)")
            env |= {
                "CMSOD_SO__MODE": "http",
                "CMSOD_POLLER__INTERVAL_S": "1",
                "CMSOD_EVENTS__SINK": args.sink,
                **dict(kv.split("=", 1) for kv in args.env),
            }
            if proxy is not None:
                env["CMSOD_EVENTS__URL"] = proxy.url
            fleet = Fleet(tmp, args.daemons, env, so.url)
            print(describe())
            print(
                f"{args.daemons} daemon(s) on {backend}, {args.elements:,} elements due over "
                f"{args.minutes:g} min, {args.kills} kills, {args.stops} stops of "
                f"{args.lease_s * 1.5:g} s",
                flush=True,
            )
            first_due = submit(fleet, args)
            kills, stops = chaos(fleet, so, args, first_due, rng)
            deadline = time.time() + args.minutes * 60 + 600
            while (view := fleet.view())["status"] not in (
                "Completed",
                "Completed with error(s)",
            ):
                assert time.time() < deadline, f"the rollout never finished: {view['status']}"
                time.sleep(1)
            while json.loads(fleet.ctl("--json", "status")[1])["counts"]["eventsPending"]:
                assert time.time() < deadline, "the events were never all published"
                time.sleep(0.5)
            for daemon in fleet.daemons:
                daemon.stop()
            items = view["groups"][0]["changeManagementSchedules"]
            started = collections.Counter(vnf for _, vnf in so.started)
            duplicated = sum(n - 1 for n in started.values() if n > 1)
            lost = [i["vnfName"] for i in items if i["status"] not in ENDED]
            unexplained = [
                i["vnfName"]
                for i in items
                if i["status"] != "Completed" and not i.get("statusMessage")
            ]
            phantom = [
                i["vnfName"]
                for i in items
                if i["status"] == "Completed" and i["vnfName"] not in started
            ]
            reconciled = sum(i["status"] != "Completed" for i in items)
            due = {
                i["vnfName"]: datetime.strptime(i["startTime"], "%Y-%m-%dT%H:%M:%SZ")
                .replace(tzinfo=UTC)
                .timestamp()
                for i in items
                if "startTime" in i
            }
            arrived = {vnf: at for vnf, _, at in so.dispatched}
            taken = takeovers(kills, stops, due, arrived)
            by_daemon = collections.Counter(d for _, d, _ in so.dispatched)
            late_at_stops = [
                arrived[v] - due[v] for v in arrived if any(s <= due[v] <= c for _, s, c in stops)
            ]
            events_line = check_events(read_events(args, proxy, fleet), view)
    finally:
        stop_proxy()
        stop_so()
    held = (
        f"takeover p50 {statistics.median(taken):.1f} s / max {max(taken):.1f} s "
        f"({len(taken)} of {len(kills)} kills held work)"
        if taken
        else "takeover n/a (no kill held work)"
    )
    print(
        f"{len(kills)} kills, {len(stops)} stops, {len(started):,} dispatched, "
        f"{duplicated} duplicated, {len(lost) + len(unexplained) + len(phantom)} lost, {held}"
    )
    print(
        f"schedule {view['status']}: {len(items) - reconciled:,} Completed, {reconciled} "
        f"ended otherwise with a message; dispatched per daemon {dict(sorted(by_daemon.items()))}; "
        f"due during a stop: {len(late_at_stops)}, late by up to "
        f"{max(late_at_stops, default=0):.1f} s; {time.time() - began:.0f} s in all"
    )
    reasons = collections.Counter(
        f"{i['status']}: {i.get('statusMessage', '')[:100]}"
        for i in items
        if i["status"] != "Completed"
    )
    for reason, count in reasons.most_common(5):
        print(f"  {count} x {reason}")
    print(events_line)
    if duplicated or lost or unexplained or phantom:
        raise SystemExit(
            f"FAILED: duplicated {duplicated}, lost {lost[:5]}, "
            f"unexplained {unexplained[:5]}, completed unstarted {phantom[:5]}"
        )


if __name__ == "__main__":
    main()
