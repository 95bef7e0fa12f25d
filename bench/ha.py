"""Several daemons on one store, killed and frozen while a rollout runs (issue 15).

Starts `--daemons N` real cmsod processes, each with its own state folder and control socket,
all on the store given by `--store`, against the tests' fake SO on loopback (in a thread of
this process; each daemon reaches it under its own path prefix /d<i>, so the record says who
dispatched what) and one shared event sink: the tests' fake Kafka REST proxy (`--sink kafka`,
the default) or, with one daemon, its event file (`--sink file`). A rollout of `--elements`
elements due over `--minutes` minutes is submitted through one daemon and approved; while it
runs, `--kills` times a random daemon is killed with SIGKILL at a random moment (half of them
just as a burst of dispatches begins, so that work is held), and `--stops` times another (the
only one, with one daemon) is frozen with SIGSTOP for 1.5 x `--lease-s`, longer than a lease,
then SIGCONT (fenced, it exits; it is restarted as systemd would).

Takeover, per kill: from the death until the dead daemon's row is gone from the store's
`daemons` table, polled every 50 ms on a connection of this process: whoever takes a daemon's
work over (its intents, polls, leases, plans) deletes its row in the same transaction
(fleet.take_over). With several daemons, every other kill (while no other victim is down)
restarts its victim only once its row is gone and 1.2 leases have passed: a host that died,
whose work another daemon must take over by the lease. Such a takeover is, by construction,
lease - lease/3 to lease after the death: the victim's lease ran from its last heartbeat (0 to
lease/3 before the death) and the others beat again just after the first other lease ends. The other kills restart their victim at once, on the same state directory, as a
host's service manager would: the new process takes its predecessor's work over as it starts
(same home), so those takeovers are a restart. On SQLite (one daemon, no `daemons` row to
watch from outside) the takeover is the restart: from the death until the new process is
ready, the store opened and what was in flight reconciled.

At the end, from the fake SO's record and the schedule's view: 0 dispatched twice, 0 lost
(every element terminal, or reconciled with a message; none Completed that SO never
started); every kill's work taken over (within 3 leases); from the sink, every schedule's
events complete (patch-ids 1..n, none missing), in order, in one partition, and the last
event of each element and of the schedule saying what the view says. It prints each kill
(which restart, its takeover), "N kills, M stops, D dispatched, 0 duplicated, 0 lost,
takeover p50 X s / max Y s" and the lease-based takeovers' p50/max apart, and exits non-zero
on a failed check.

Stores: `--store sqlite:///path/cmsod.sqlite3` (or a plain path; the default is a file in a
temporary folder) is passed as `CMSOD_STORE__PATH`; SQLite takes one daemon per store, so
it runs with `--daemons 1` (the one daemon killed and restarted, frozen and thawed).
`--store postgresql://...` is passed as `CMSOD_STORE__URL` and `--lease-s` as
`CMSOD_STORE__LEASE_S` (`[store] url` and `lease_s` of the PostgreSQL backend); give it a
fresh database or schema (`?options=-csearch_path%3D<schema>`): the rollout's schedule id is
fixed. `--env KEY=VALUE` adds any other setting to every daemon.

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
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from tests.cmso_requests import iso, request  # noqa: E402
from tests.fake_http import FakeKafkaProxy, FakeSO, Reply, Request  # noqa: E402
from tests.procs import Daemon, cmsoctl  # noqa: E402
from tests.test_events import in_order_and_complete  # noqa: E402

SCHEDULE = "ha"
ENDED = {"Completed", "Error", "Scheduling Failed"}


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


@dataclass
class Kill:
    """One SIGKILL: the victim, its death (epoch s), whether its restart waited past the lease,
    and what was measured (None: not yet / never)."""

    daemon: int
    death: float
    delayed: bool
    row: str  # its id in `daemons` (PostgreSQL)
    takeover_s: float | None = None
    back_s: float | None = None


def daemon_id(url: str, pid: int) -> str:
    """The `daemons` row of the daemon process `pid` (one host: pids are unique)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT id FROM daemons WHERE pid = %s", (pid,)).fetchone()
    assert row is not None, f"no daemons row for pid {pid}"
    return str(row[0])


def follow(fleet: Fleet, kill: Kill, url: str, lease_s: float, down: set[int]) -> None:
    """(A thread per kill, PostgreSQL.) Polls the dead daemon's row every 50 ms on a
    connection of its own: its work (intents, polls, leases, plans) is taken over in the
    transaction that deletes it (fleet.take_over), so the takeover is the death until the row
    is gone. A delayed restart comes once the row is gone and 1.2 leases have passed, so the
    work went to another daemon by the lease, not to the restarted one (which takes its
    predecessor's over at start: same home)."""
    with psycopg.connect(url, autocommit=True) as conn:
        give_up = kill.death + 3 * lease_s
        while conn.execute("SELECT 1 FROM daemons WHERE id = %s", (kill.row,)).fetchone():
            if time.time() > give_up:
                break  # never taken over: reported, and a failure
            time.sleep(0.05)
        else:
            kill.takeover_s = time.time() - kill.death
    if kill.delayed:
        time.sleep(max(0.0, kill.death + 1.2 * lease_s - time.time()))
        fleet.restart(kill.daemon)
        kill.back_s = time.time() - kill.death
        down.discard(kill.daemon)


def chaos(
    fleet: Fleet,
    so: SharedSO,
    args: argparse.Namespace,
    first_due: float,
    rng: random.Random,
    backend: str,
) -> tuple[list[Kill], list[tuple[int, float, float]]]:
    """The kills and stops, spread over the rollout; returns the kills and (daemon, stopped,
    continued) per stop. With several daemons, every other kill (when no other victim is still
    down) restarts its victim only after 1.2 leases (a host that died: the others must take
    its work over), the rest at once (the same host restarting it)."""
    actions = ["kill"] * args.kills + ["stop"] * args.stops
    rng.shuffle(actions)
    span_s = args.minutes * 60
    step = span_s / (len(actions) + 1)
    kills: list[Kill] = []
    stops: list[tuple[int, float, float]] = []
    followers: list[threading.Thread] = []
    down: set[int] = set()  # killed, restart delayed: neither a victim nor a taker meanwhile
    n = len(fleet.daemons)
    for k, action in enumerate(actions):
        moment = first_due + step * (k + rng.uniform(0.5, 1.5))
        time.sleep(max(0.0, moment - time.time()))
        victim = rng.choice([i for i in range(n) if i not in down])
        if action == "stop":
            daemon = fleet.daemons[victim]
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            stopped = time.time()
            time.sleep(args.lease_s * 1.5)
            os.kill(daemon.proc.pid, signal.SIGCONT)
            stops.append((victim, stopped, time.time()))
            after = "thawed"  # alone: nobody took its work over, it goes on
            if n > 1:  # fenced: its work was taken over meanwhile, its first write refused
                try:
                    daemon.proc.wait(args.lease_s)
                except subprocess.TimeoutExpired:
                    after = "still running"
                else:
                    fleet.restart(victim)  # as systemd's Restart= would
                    after = "fenced, exited, restarted"
            print(f"  stop daemon {victim} for {stops[-1][2] - stopped:.1f} s: {after}", flush=True)
            continue
        me = daemon_id(args.store, fleet.daemons[victim].proc.pid) if backend != "sqlite" else ""
        if rng.random() < 0.5:  # just as a burst begins: work held at the death
            seen = len(so.dispatched)
            try:
                so.wait_for(lambda seen=seen: len(so.dispatched) > seen, timeout_s=10)
            except AssertionError:
                pass  # no more bursts: a moment like any other
            time.sleep(rng.uniform(0, 0.03))
        delayed = n > 1 and not down and sum(x.delayed for x in kills) * 2 <= len(kills)
        death = time.time()
        fleet.daemons[victim].kill()
        kill = Kill(victim, death, delayed, me)
        kills.append(kill)
        if delayed:
            down.add(victim)
        if me:
            followers.append(
                threading.Thread(target=follow, args=(fleet, kill, args.store, args.lease_s, down))
            )
            followers[-1].start()
        if not delayed:  # measured beside the restart, which takes the work over at its start
            fleet.restart(victim)
            kill.back_s = time.time() - death
            if not me:  # SQLite: one daemon, its takeover is its restart (back and reconciled)
                kill.takeover_s = kill.back_s
    for thread in followers:
        thread.join()
    return kills, stops


def p50_max(kills: list[Kill]) -> str:
    times = [k.takeover_s for k in kills if k.takeover_s is not None]
    if not times:
        return "n/a"
    return f"p50 {statistics.median(times):.1f} s / max {max(times):.1f} s"


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
            kills, stops = chaos(fleet, so, args, first_due, rng, backend)
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
            by_daemon = collections.Counter(d for _, d, _ in so.dispatched)
            late_at_stops = [
                arrived[v] - due[v] for v in arrived if any(s <= due[v] <= c for _, s, c in stops)
            ]
            events_line = check_events(read_events(args, proxy, fleet), view)
    finally:
        stop_proxy()
        stop_so()
    for k, kill in enumerate(kills):
        taken = f"{kill.takeover_s:.2f} s" if kill.takeover_s is not None else "NEVER"
        how = "after 1.2 leases" if kill.delayed else "at once"
        print(
            f"  kill {k + 1} at {kill.death - first_due:.0f} s: daemon {kill.daemon} "
            f"taken over after {taken}; restarted {how}, back after {kill.back_s or 0:.1f} s"
        )
    never = [k for k in kills if k.takeover_s is None]
    print(
        f"{len(kills)} kills, {len(stops)} stops, {len(started):,} dispatched, "
        f"{duplicated} duplicated, {len(lost) + len(unexplained) + len(phantom)} lost, "
        f"takeover {p50_max(kills)}"
    )
    if backend == "sqlite":
        print("  (SQLite, one daemon: the takeover is its restart, back and reconciled)")
    else:
        by_lease = [k for k in kills if k.delayed]
        print(
            f"  by another daemon at the lease ({len(by_lease)} kills restarted after 1.2 "
            f"leases): {p50_max(by_lease)} (lease {args.lease_s:g} s, heartbeat every lease/3: "
            f"{args.lease_s * 2 / 3:g}-{args.lease_s:g} s by construction); by the "
            f"restart in place ({len(kills) - len(by_lease)}): "
            f"{p50_max([k for k in kills if not k.delayed])}"
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
    if duplicated or lost or unexplained or phantom or never:
        raise SystemExit(
            f"FAILED: duplicated {duplicated}, lost {lost[:5]}, "
            f"unexplained {unexplained[:5]}, completed unstarted {phantom[:5]}, "
            f"never taken over: kills {[kills.index(k) + 1 for k in never]}"
        )


if __name__ == "__main__":
    main()
