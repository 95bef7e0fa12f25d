"""Dispatch and polling against an HTTP orchestrator on loopback.

The real daemon runs as its own process (so.mode = http); the orchestrator is the tests'
fake SO in a thread of this process, which records when each POST arrives. Lateness is that
time minus the element's due time (start - lead_time). Then, with 10,000 work flows in
flight (the fake SO answers IN_PROGRESS for ever) polled at the default interval (10 s) and then
every second, the daemon process's CPU and memory are read from /proc.
With --all-gates every dispatch gate has something to check: a failure threshold on every
schedule, a freeze turned on and off again, a blackout in the book on each burst element
(long after its slot), freeze calendars (a yearly period for every element months away, one
scoped to a site no element has over now), so each due element's snapshot reads them all.
BENCH_CALENDARS=0 leaves the calendars out. (The alarm gate is not in it: it asks
Alertmanager over HTTP, one request per distinct query of a due batch; see bench/README.md.)

With --store postgresql://... the daemons share a fresh schema on that server (dropped at the
end), and --daemons N starts N of them, each with its own state folder (the schedules are
submitted through the first; every daemon claims its share of each burst).
Usage: python bench/dispatch.py [--skip-polling] [--all-gates] [--store URL] [--daemons N]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe  # noqa: E402
from cmsod.config import PollerConfig  # noqa: E402
from cmsod.ctl import call  # noqa: E402
from tests.cmso_requests import iso, request  # noqa: E402
from tests.fake_http import FakeSO  # noqa: E402
from tests.procs import Daemon, cmsoctl  # noqa: E402

LEAD_S = 1.0


def due_times(state: Path, schedule_id: str) -> dict[str, float]:
    code, out = cmsoctl(state, "--json", "show", schedule_id)
    assert code == 0, out
    items = json.loads(out)["schedule"]["groups"][0]["changeManagementSchedules"]
    return {
        i["vnfName"]: datetime.fromisoformat(i["startTime"].replace("Z", "+00:00")).timestamp()
        - LEAD_S
        for i in items
    }


def approve_when_pending(state: Path, schedule_id: str) -> None:
    for _ in range(600):
        code, out = cmsoctl(state, "--json", "show", schedule_id)
        if code != 0:  # say what the daemon answered, and look again
            print(f"  (show {schedule_id}: {out.strip()[-300:]})")
            time.sleep(0.5)
            continue
        if json.loads(out)["schedule"]["status"] == "Pending Approval":
            assert cmsoctl(state, "approve", schedule_id)[0] == 0
            return
        time.sleep(0.05)
    raise RuntimeError(f"{schedule_id} never reached Pending Approval")


def figures(name: str, lateness: list[float]) -> str:
    ordered = sorted(lateness)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{name:<34} n={len(ordered):>6}  p50 {statistics.median(ordered):7.1f} ms  "
        f"p99 {p99:7.1f} ms  max {ordered[-1]:7.1f} ms"
    )


def proc_cpu_and_rss(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = 100.0
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks
    rss_mb = int(fields[21]) * 4096 / 2**20
    return cpu_s, rss_mb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-polling", action="store_true")
    parser.add_argument("--all-gates", action="store_true")
    parser.add_argument("--store", default="", help="postgresql://... (default: SQLite)")
    parser.add_argument("--daemons", type=int, default=1, help="several: PostgreSQL only")
    args = parser.parse_args()
    if args.daemons > 1 and not args.store:
        parser.error("several daemons share a store on PostgreSQL only: --store postgresql://...")
    print(describe())
    schema = f"bench_{os.getpid()}"
    if args.store:
        import psycopg

        from tests.pg import with_schema

        with psycopg.connect(args.store, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
            version = conn.info.server_version
        print(f"store: PostgreSQL {version // 10000}.{version % 10000}, {args.daemons} daemon(s)")
    else:
        print("store: SQLite, 1 daemon")
    so = FakeSO(["IN_PROGRESS"])
    stop = so.in_thread()
    env = {
        "CMSOD_SO__MODE": "http",
        "CMSOD_SO__URL": so.url,
        "CMSOD_DISPATCHER__LEAD_TIME_S": str(LEAD_S),
        "CMSOD_DISPATCHER__MAX_CONCURRENT": os.environ.get("BENCH_DISPATCH_CONCURRENCY", "100"),
        "CMSOD_POLLER__MAX_CONCURRENT": os.environ.get("BENCH_POLL_CONCURRENCY", "50"),
        "CMSOD_POLLER__INTERVAL_S": "3600",
        "CMSOD_CONTROL__IDLE_TIMEOUT_S": "600",
        "CMSOD_OPTIMIZER__APPROVAL_TIMEOUT_S": "3600",  # approved seconds before the start
    }
    if args.all_gates:
        env["CMSOD_DISPATCHER__MAX_FAILURE_RATIO"] = "0.5"
    if args.store:
        env["CMSOD_STORE__URL"] = with_schema(args.store, schema)
        args.skip_polling = args.skip_polling or args.daemons > 1
    print(f"gates: {'all active' if args.all_gates else 'nothing to check'}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp)
            config_file = None
            if args.all_gates and os.environ.get("BENCH_CALENDARS", "1") == "1":
                soon, today = datetime.now(UTC) + timedelta(days=100), datetime.now(UTC)
                (state / "calendar.toml").write_text(
                    f'[[deny]]\nname = "later"\nfrom = "{soon:%m-%d}"\nto = "{soon:%m-%d}"\n'
                    "yearly = true\n"
                    f'[[deny]]\nname = "elsewhere"\nfrom = "{today - timedelta(days=1):%Y-%m-%d}"\n'
                    f'to = "{today + timedelta(days=1):%Y-%m-%d}"\nscope = {{ site = "NOWHERE" }}\n'
                )
                config_file = state / "cmsod.toml"
                config_file.write_text(
                    f'[daemon]\nstate_dir = "{state}"\n'
                    f'[calendars]\nfiles = ["{state / "calendar.toml"}"]\n'
                )
            others = [Daemon(state / f"d{i}", extra_env=env) for i in range(1, args.daemons)]
            daemon = Daemon(state, config_file, extra_env=env)
            socket = str(state / "control.sock")
            try:
                if args.all_gates:
                    for state_word in ("on", "off"):
                        assert cmsoctl(state, "freeze", state_word)[0] == 0
                for schedule_id, n, per_slot, lead_in in [
                    ("burst100", 100, 100, 4),
                    ("burst1000", 1000, 1000, 6),
                    ("spread10k", 10_000, 167, 20),
                ]:
                    nodes = [f"{schedule_id}-{i}" for i in range(n)]
                    if args.all_gates and schedule_id != "spread10k":
                        later = datetime.now(UTC) + timedelta(days=300)
                        for node in nodes:
                            entry = {
                                "element": node,
                                "startTime": iso(later),
                                "endTime": iso(later + timedelta(hours=1)),
                            }
                            reply = call(socket, "io.cmsod.Availability.Add", entry, 10)
                            assert reply.error is None, reply
                    # (after the blackouts: adding 1,000 of them takes seconds)
                    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=lead_in)
                    body = request(
                        schedule_id,
                        now=start,
                        nodes=nodes,
                        normal=1,
                        additional=0,
                        concurrency=per_slot,
                    )
                    body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"] = iso(
                        start
                    )
                    body_file = state / f"{schedule_id}.json"
                    body_file.write_text(json.dumps(body))
                    assert cmsoctl(state, "submit", str(body_file))[0] == 0
                    approve_when_pending(state, schedule_id)
                    due = due_times(state, schedule_id)
                    deadline = time.time() + lead_in + n / per_slot + 60
                    while time.time() < deadline:
                        arrived = {
                            r.path.removeprefix("/schedule/"): r.at
                            for r in list(so.requests)
                            if r.method == "POST"
                        }
                        if all(name in arrived for name in due):
                            break
                        time.sleep(0.2)
                    lateness = [(arrived[name] - due[name]) * 1000 for name in due]
                    label = {
                        "burst100": "100 due at one instant",
                        "burst1000": "1,000 due at one instant",
                        "spread10k": "10,000 spread over a minute",
                    }[schedule_id]
                    print(figures(label, lateness))
                    if schedule_id == "burst1000":
                        print(
                            f"{'':34} all 1,000 dispatched {max(arrived[n] for n in due) - min(due.values()):.3f} s after they fell due"
                        )
                if not args.skip_polling:
                    in_flight = len([r for r in so.requests if r.method == "POST"])
                    default = PollerConfig().interval_s
                    for interval, settle_s, measure_s in [(default, 12, 40), (1.0, 5, 20)]:
                        daemon.stop()
                        env["CMSOD_POLLER__INTERVAL_S"] = str(interval)
                        daemon = Daemon(state, extra_env=env)
                        time.sleep(settle_s)  # the first round of polls has begun
                        cpu0, _ = proc_cpu_and_rss(daemon.proc.pid)
                        polls0, t0 = so.status_calls, time.time()
                        time.sleep(measure_s)
                        cpu1, rss = proc_cpu_and_rss(daemon.proc.pid)
                        polls, elapsed = so.status_calls - polls0, time.time() - t0
                        every = f"{interval:g} s" + (
                            " (the default)" if interval == default else ""
                        )
                        print(
                            f"{in_flight:,} work flows in flight polled every {every}: "
                            f"{polls / elapsed:,.0f} polls/s, daemon CPU "
                            f"{(cpu1 - cpu0) / elapsed:.3f} cores, RSS {rss:.0f} MB "
                            f"(over {elapsed:.0f} s)"
                        )
            finally:
                for d in [daemon, *others]:
                    d.stop()
    finally:
        stop()
        if args.store:
            with psycopg.connect(args.store, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
