"""Several daemons on one PostgreSQL (cmsod/store/fleet.py): work is claimed, a lapsed daemon's
work is taken over and reconciled as after a crash, and a daemon whose work was taken over
writes nothing more (fencing)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from cmsod import ctl, daemon, lifecycle
from cmsod.actors import dispatcher
from cmsod.clock import TrioWallClock
from cmsod.executor import InlineExecutor, ThreadExecutor
from cmsod.model import ElementStatus as E
from cmsod.model import PollOutcome
from cmsod.model import ScheduleStatus as S
from cmsod.store import Store, dispatch, fleet, outboxes, schedules, views
from cmsod.store.backend import connect_postgres
from cmsod.store.schema import MIGRATION_LOCK, SCHEMA_VERSION
from cmsod.store.store import EVENTS_LOCK, LeaseLost, Tx, shared_lock
from cmsod.wire.cmso import ScheduleRequest
from tests import pg
from tests.cmso_requests import request
from tests.conftest import EPOCH, daemon_config, start_daemon, store_rows, wait_until
from tests.test_events import in_order_and_complete, run_schedules, watch
from tests.test_lifecycle import SilentSO

ON_POSTGRES = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
LEASE_MS = 15_000


class Clock:
    def __init__(self) -> None:
        self.ms = int(EPOCH.timestamp() * 1000)

    def now_ms(self) -> int:
        return self.ms


async def daemon_store(url: str, clock: Clock, me: str) -> Store:
    store = Store(url, InlineExecutor(), clock)  # type: ignore[arg-type]
    await store.open()
    await store.tx(fleet.register, me, "host", 1, LEASE_MS)
    store.owner = me
    return store


@ON_POSTGRES
async def test_a_lapsed_daemon_is_taken_over_and_fenced(backend: str, tmp_path: Path) -> None:
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await daemon_store(url, clock, "a")
    b = await daemon_store(url, clock, "b")
    try:
        body = request("shared", ["n1", "n2"], now=EPOCH, minutes_from_now=None, normal=60)
        new = lifecycle.validate_request(msgspec.convert(body, ScheduleRequest))
        await a.tx(schedules.create_schedule, new)
        assert (await a.tx(fleet.heartbeat, "a", LEASE_MS, False)).held == {"events", "tickets"}
        assert (await b.tx(fleet.heartbeat, "b", LEASE_MS, False)).held == set()
        due = await a.read(dispatch.due_elements, clock.ms, 1000)
        jobs = (await a.tx(dispatch.begin_dispatches, [d.element for d in due], [])).jobs
        assert len(jobs) == 2  # a's intents: claimed by a
        assert (await b.tx(dispatch.begin_dispatches, [d.element for d in due], [])).jobs == []

        clock.ms += 2 * LEASE_MS // 3  # two heartbeats missed: alive, as far as one can tell
        state = {d["id"]: ctl.daemon_state(d) for d in await b.read(fleet.daemons, clock.ms)}
        assert state["a"].startswith("alive, lease to ")
        clock.ms += LEASE_MS // 3 - 1  # not lapsed yet: nothing is taken
        assert (await b.tx(fleet.heartbeat, "b", LEASE_MS, False)).gone == []
        state = {d["id"]: ctl.daemon_state(d) for d in await b.read(fleet.daemons, clock.ms)}
        assert state == {  # `cmsoctl status`: a is probably dead, and says until when
            "a": "silent 15.0 s: taken over when its lease ends at " + ctl._ms_time(clock.ms + 1),
            "b": "alive, lease to " + ctl._ms_time(clock.ms + LEASE_MS),
        }
        clock.ms += 1  # a is silent for a whole lease: b takes over, reconciles as after a crash
        done = await b.tx(fleet.heartbeat, "b", LEASE_MS, False)
        assert done.gone == ["a"] and sorted(done.reconciled) == ["n1", "n2"]
        assert done.held == {"events", "tickets"}
        view = await b.read(views.get_schedule, "shared")
        items = view["groups"][0]["changeManagementSchedules"]
        assert {i["status"] for i in items} == {E.ERROR}
        assert all("dispatch outcome unknown" in i["statusMessage"] for i in items)

        # a wakes up with the orchestrator's answers: refused, nothing written
        with pytest.raises(LeaseLost):
            await a.tx(dispatch.record_dispatch_results, [(j.element, "so-1", None) for j in jobs])
        with pytest.raises(LeaseLost):  # and every later write too, without asking
            await a.tx(fleet.heartbeat, "a", LEASE_MS, False)
        view = await b.read(views.get_schedule, "shared")
        assert view["status"] == S.COMPLETED_WITH_ERRORS
        daemons = await b.read(fleet.daemons, clock.ms)
        assert [(d["id"], d["alive"], d["leases"]) for d in daemons] == [
            ("b", True, ["events", "tickets"])
        ]
    finally:
        await a.close()
        await b.close()


async def next_beat(daemon: Any) -> None:
    """Until `daemon` renews its lease (just after it did)."""
    me = daemon.ctx.store.owner

    async def beat() -> int:
        return await daemon.ctx.store.read(
            lambda conn: conn.execute(
                "SELECT heartbeat_ms FROM daemons WHERE id = ?", (me,)
            ).fetchone()[0]
        )

    before = await beat()

    async def renewed() -> bool:
        return await beat() != before

    await wait_until(renewed, "a heartbeat", 60)


@ON_POSTGRES
async def test_two_daemons_one_killed_the_other_finishes_its_rollout(
    backend: str, autojump_clock, nursery, tmp_path: Path
) -> None:
    """In process: a daemon 'dies' with a work flow sent and unanswered (its row stays, its
    lease lapses); the other takes its work over within one lease (it beats just after the
    lease ends, not at its next regular beat)."""
    silent = SilentSO(clock=None)  # type: ignore[arg-type]
    first = await start_daemon(nursery, tmp_path / "a", so=silent, store__lease_s=30)
    silent.clock = first.ctx.clock
    client = await first.connect()
    await client.ok(
        "io.cmsod.Schedules.Create",
        schedule=request("ha", ["n1"], now=EPOCH, minutes_from_now=None, normal=60),
    )

    async def sent() -> bool:
        return bool(silent.dispatched)

    await wait_until(sent, "the work flow sent")
    await next_beat(first)  # b's regular beats come 9.5 s after a's: the worst phase for a
    await trio.sleep(9.5)  # takeover at b's next regular beat (9.5 s after a's lease ends)
    second = await start_daemon(nursery, tmp_path / "b", clock=first.ctx.clock, store__lease_s=30)
    assert first.ctx.store.owner != second.ctx.store.owner
    await client.aclose()
    client = await second.connect()
    assert (await client.schedule("ha"))["status"] == S.NOTIFICATIONS_INITIATED  # not taken yet
    status = await client.ok("io.cmsod.Manager.Status")
    assert {d["id"]: d["dispatching"] for d in status["daemons"]} == {
        first.ctx.store.owner: 1,  # its intent, unanswered
        second.ctx.store.owner: 0,
    }
    await next_beat(first)
    first.ctx.store.owner = None  # dies without a word: no clean leave, its lease lapses
    first.cancel.cancel()
    died = trio.current_time()
    view = await client.wait_for("ha", S.COMPLETED_WITH_ERRORS, S.COMPLETED)
    item = view["groups"][0]["changeManagementSchedules"][0]
    assert item["status"] == E.ERROR and "dispatch outcome unknown" in item["statusMessage"]
    took = trio.current_time() - died
    assert took <= 30 + 0.5, took  # a lease (and the looks of wait_for)
    assert second.ctx.so.dispatched == []  # never re-sent blindly
    owners = store_rows(tmp_path, "SELECT owner FROM elements")
    assert owners == [(second.ctx.store.owner,)]
    status = await client.ok("io.cmsod.Manager.Status")  # `cmsoctl status`: who is alive
    assert [(d["id"], d["alive"], d["leases"]) for d in status["daemons"]] == [
        (second.ctx.store.owner, True, ["events", "tickets"])
    ]
    second.cancel.cancel()


@ON_POSTGRES
async def test_daemons_started_together_one_migrates_all_the_others_find_it_done(
    backend: str,
) -> None:
    """Not one daemon migrating 1 to 10 and the other 11: the lock was taken per migration,
    so daemons waiting on it took turns. Both wait on the lock (held here) before it frees."""
    url = pg.server().fresh()
    stores = [Store(url, ThreadExecutor()) for _ in range(2)]
    holder = connect_postgres(url).raw
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(store.open)

            async def both_wait() -> bool:
                (waiting,) = holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ).fetchone()
                return bool(waiting == 2)

            try:
                await wait_until(both_wait, "both daemons wait on the migration lock", within_s=10)
            finally:  # even so: the opens wait in threads, which a cancel does not end
                holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        applied = sorted(store.migrations_applied for store in stores)
        assert applied == [[], list(range(1, SCHEMA_VERSION + 1))]
    finally:
        holder.close()
        for store in stores:
            await store.close()


@ON_POSTGRES
async def test_a_commit_rings_the_other_daemons_doorbells(backend: str) -> None:
    """LISTEN/NOTIFY: work stored by one daemon wakes the other at its commit; its own
    commits do not ring its own listener."""
    url = os.environ["CMSOD_STORE__URL"]
    a = Store(url, ThreadExecutor())
    b = Store(url, ThreadExecutor())
    await a.open()
    await b.open()
    await a.tx(fleet.register, "a", "host", 1, LEASE_MS)
    await b.tx(fleet.register, "b", "host", 2, LEASE_MS)
    a.owner, b.owner = "a", "b"
    rings = 0
    rang = trio.Event()

    def ring() -> None:  # called in trio by the listener
        nonlocal rings, rang
        rings += 1
        rang.set()
        rang = trio.Event()

    async def wait_for_rings(count: int) -> None:
        with trio.fail_after(10):
            while rings < count:
                await rang.wait()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(b.listen, ring)  # LISTEN is on before any commit below
            body = request("rings", ["n1"], now=EPOCH, minutes_from_now=60)
            new = lifecycle.validate_request(msgspec.convert(body, ScheduleRequest))
            await b.tx(schedules.create_schedule, new)  # b's own: no ring
            await a.tx(schedules.delete_schedule, "rings")
            await wait_for_rings(1)
            # notifications arrive in commit order: had b's own rung, it would be counted
            # before either of a's; one more of a's makes the count exact
            more = request("rings2", ["n1"], now=EPOCH, minutes_from_now=60)
            await a.tx(
                schedules.create_schedule,
                lifecycle.validate_request(msgspec.convert(more, ScheduleRequest)),
            )
            await wait_for_rings(2)
            assert rings == 2
            nursery.cancel_scope.cancel()
    finally:
        await a.close()
        await b.close()


@ON_POSTGRES
async def test_a_watcher_on_a_daemon_that_does_not_publish_sees_every_event_once_in_order(
    backend: str, autojump_clock, nursery, tmp_path: Path
) -> None:
    """`cmsoctl watch` on any daemon: every CM event of the shared store, each once, in order
    per schedule, whichever daemon wrote it and whichever publishes it."""
    a = await start_daemon(nursery, tmp_path / "a")
    b = await start_daemon(nursery, tmp_path / "b")
    assert a.ctx.store.held_leases == {"events", "tickets"} and not b.ctx.store.held_leases
    on_b = await b.connect()  # `cmsoctl status` on b says who publishes, through which sink
    lines = ctl.human("status", await on_b.ok("io.cmsod.Manager.Status")).splitlines()
    await on_b.aclose()
    a_id, b_id = a.ctx.store.owner, b.ctx.store.owner
    sink = f"component  Event Sink: OK (file); not used here: daemon {a_id} publishes"
    assert any(line.startswith(sink) for line in lines)
    (line_a,) = [line for line in lines if line.startswith(f"daemon     {a_id}: alive")]
    assert line_a.endswith("planning; publishes the CM events; sends the ticket operations")
    (line_b,) = [line for line in lines if line.startswith(f"daemon     {b_id} (this one): alive")]
    assert line_b.endswith("0 planning")
    watcher = await watch(b)
    await trio.testing.wait_all_tasks_blocked()
    await run_schedules(a, ["w1", "w2", "w3"])  # written on a (and b: both dispatch), sent by a
    stored = [json.loads(body) for (body,) in store_rows(tmp_path, "SELECT body FROM events")]
    got = []
    for _ in stored:
        with trio.fail_after(60):
            reply = msgspec.json.decode(await watcher.receive_raw())
        got.append(reply["parameters"]["event"])
    with trio.move_on_after(60):  # and nothing more: none twice
        assert await watcher.receive_raw() is None
    assert sorted(e["eventId"] for e in got) == sorted(e["eventId"] for e in stored)
    assert set(in_order_and_complete(got)) == {"w1", "w2", "w3"}
    await watcher.aclose()
    a.cancel.cancel()
    b.cancel.cancel()


@ON_POSTGRES
async def test_events_are_stored_in_commit_order_across_daemons(backend: str) -> None:
    """A transaction that inserts events waits for one that inserted events before it to
    commit (EVENTS_LOCK), even under the shared write lock: a reader of the log (watchers,
    outboxes.Tail) never sees an event before one of a lower seq still to come."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await thread_store(url, clock, "a")
    other = connect_postgres(url)  # another daemon, in the middle of storing its events
    insert = (
        "INSERT INTO events (schedule_id, topic, body, created_ms) VALUES (?, 't', ?, 0)"
        " RETURNING seq"
    )
    try:
        await immediates(a, {"x": ["x1"]})
        top = await a.read(outboxes.last_event_seq)
        other.execute("BEGIN")
        other.execute("SELECT pg_advisory_xact_lock(?)", (EVENTS_LOCK,))
        (first,) = other.execute(insert, ("other", b"{}")).fetchone()
        due = await a.read(dispatch.due_elements, clock.ms, 10)
        async with trio.open_nursery() as nursery:  # a's claim writes events: it waits
            nursery.start_soon(a.tx, dispatch.begin_dispatches, [d.element for d in due], [])
            await wait_until(lambda: a.read(waiting_for_a_lock, a.conn), "a's claim waiting", 10)
            assert [r[0] for r in await a.read(outboxes.read_tail, top, 100)] == []
            other.execute("COMMIT")
        seqs = [r[0] for r in await a.read(outboxes.read_tail, top, 100)]
        assert seqs[0] == first and seqs == sorted(seqs) and len(seqs) > 1
    finally:
        other.close()
        await a.close()


class StuckSink:
    """Takes a batch and never answers: the publisher dies between the sink's taking it and
    its record of that."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, events: list[tuple[str, bytes]]) -> int:
        self.taken += events
        await trio.sleep_forever()
        raise AssertionError


class TakingSink:
    def __init__(self) -> None:
        self.taken: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, events: list[tuple[str, bytes]]) -> int:
        self.taken += events
        return len(events)


@ON_POSTGRES
async def test_events_sent_again_after_a_takeover_keep_their_ids(
    backend: str, autojump_clock, nursery, tmp_path: Path
) -> None:
    """The publisher dies with a batch taken by the sink and not recorded as sent: the daemon
    that takes over sends it again (at least once), each event with the id it had, byte for
    byte, so that a receiver can drop what it already has."""
    a = await start_daemon(nursery, tmp_path / "a", store__lease_s=30)
    b = await start_daemon(nursery, tmp_path / "b", store__lease_s=30)
    a.ctx.sink, b.ctx.sink = stuck, taking = StuckSink(), TakingSink()
    client = await a.connect()
    body = request("again", ["n1", "n2"], now=EPOCH, minutes_from_now=60)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    await client.aclose()

    async def taken() -> bool:
        return bool(stuck.taken)

    await wait_until(taken, "a batch on the wire")
    a.ctx.store.owner = None  # dies without a word: its lease lapses
    a.cancel.cancel()

    async def all_sent() -> bool:
        return store_rows(tmp_path, "SELECT count(*) FROM events WHERE sent_ms IS NULL") == [(0,)]

    await wait_until(all_sent, "every event sent by b")
    stored = [bytes(body) for (body,) in store_rows(tmp_path, "SELECT body FROM events")]
    assert set(stuck.taken) <= set(taking.taken)  # the same events again, the same bytes
    assert sorted(body for _, body in taking.taken) == sorted(stored)  # each once from b
    ids = [json.loads(body)["eventId"] for _, body in stuck.taken + taking.taken]
    assert len(set(ids)) == len(stored)  # a receiver de-duplicating on eventId gets each once
    b.cancel.cancel()


# -- claims under the shared write lock (several daemons writing at once) -------------------


def held(tx: Tx, fn: Any, args: tuple, locked: threading.Event, release: threading.Event) -> Any:
    """`fn`, then its transaction kept open (its locks held) until `release` (or 10 s)."""
    result = fn(tx, *args)
    locked.set()
    release.wait(10)
    return result


shared_lock(held)  # as the hot paths it wraps: beside other daemons' transactions


async def thread_store(url: str, clock: Clock, me: str, lease_ms: int = LEASE_MS) -> Store:
    store = Store(url, ThreadExecutor(), clock, lease_s=lease_ms / 1000)  # type: ignore[arg-type]
    await store.open()
    await store.tx(fleet.register, me, "host", 1, lease_ms)
    store.owner = me
    return store


async def immediates(store: Store, names: dict[str, list[str]]) -> None:
    for schedule_id, nodes in names.items():
        body = request(schedule_id, nodes, now=EPOCH, minutes_from_now=None, normal=60)
        new = lifecycle.validate_request(msgspec.convert(body, ScheduleRequest))
        await store.tx(schedules.create_schedule, new)


@ON_POSTGRES
async def test_daemons_claiming_at_once_take_disjoint_work(backend: str) -> None:
    """Two daemons claim the same due batches at the same time, in small batches, until
    nothing is due: every element is claimed once, by one of them."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await thread_store(url, clock, "a")
    b = await thread_store(url, clock, "b")
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    async def claim(store: Store) -> None:
        while due := await store.read(dispatch.due_elements, clock.ms, 7):
            claim = await store.tx(dispatch.begin_dispatches, [d.element for d in due], [])
            claimed[store.owner or ""].extend(j.element for j in claim.jobs)

    try:
        await immediates(a, {f"s{i}": [f"s{i}-n{j}" for j in range(15)] for i in range(8)})
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(claim, a)
                nursery.start_soon(claim, b)
        both = claimed["a"] + claimed["b"]
        assert len(both) == len(set(both)) == 120  # none twice, none left
        rows = await a.read(
            lambda conn: conn.execute(
                "SELECT id, owner, dispatch_attempts FROM elements"
            ).fetchall()
        )
        owners = {element: owner for owner, elements in claimed.items() for element in elements}
        assert sorted((e, o, n) for e, o, n in rows) == sorted((e, o, 1) for e, o in owners.items())
    finally:
        await a.close()
        await b.close()


@ON_POSTGRES
async def test_a_claim_does_not_wait_for_another_daemons_claim(backend: str) -> None:
    """While a's claim of schedule x is open (its rows locked), b's claim of the same due
    batch takes y's elements at once and skips x's (SKIP LOCKED), instead of waiting."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await thread_store(url, clock, "a")
    b = await thread_store(url, clock, "b")
    locked, release = threading.Event(), threading.Event()
    try:
        await immediates(a, {"x": ["x1", "x2"], "y": ["y1", "y2"]})
        due = await a.read(dispatch.due_elements, clock.ms, 1000)
        names = {d.element: d.name for d in due}
        x = [d.element for d in due if d.name.startswith("x")]
        x_schedule = await a.read(schedule_row, "x")
        a_jobs: list[dispatch.DispatchJob] = []

        async def a_claims() -> None:
            claim = await a.tx(held, dispatch.begin_dispatches, (x, []), locked, release)
            a_jobs.extend(claim.jobs)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a_claims)
            await trio.to_thread.run_sync(locked.wait, 10)
            try:
                b_claim = await b.tx(dispatch.begin_dispatches, list(names), [])
                open_meanwhile = not release.is_set() and not a_jobs  # a still holds x
            finally:
                release.set()
        assert open_meanwhile
        assert sorted(names[j.element] for j in b_claim.jobs) == ["y1", "y2"]
        assert b_claim.skipped == [x_schedule]  # a's, reported
        assert sorted(names[j.element] for j in a_jobs) == ["x1", "x2"]
        assert (await b.tx(dispatch.begin_dispatches, list(names), [])).jobs == []  # all claimed
    finally:
        release.set()
        await a.close()
        await b.close()


@ON_POSTGRES
async def test_a_fenced_daemons_write_is_refused_during_and_after_take_over(
    backend: str,
) -> None:
    """a records its answers in a transaction still open when b takes a over: b's take-over
    waits for it (a's write, begun before, completes and is reconciled as a's) and a's next
    write is refused."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await thread_store(url, clock, "a")
    b = await thread_store(url, clock, "b")
    locked, release = threading.Event(), threading.Event()
    try:
        await immediates(a, {"f": ["f1", "f2"]})
        due = await a.read(dispatch.due_elements, clock.ms, 1000)
        jobs = (await a.tx(dispatch.begin_dispatches, [d.element for d in due], [])).jobs
        answers = [(j.element, f"so-{j.element}", None) for j in jobs]
        took: list[fleet.Round] = []

        async def b_takes_over() -> None:
            took.append(await b.tx(fleet.heartbeat, "b", LEASE_MS, False))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                a.tx, held, dispatch.record_dispatch_results, (answers,), locked, release
            )
            await trio.to_thread.run_sync(locked.wait, 10)
            clock.ms += LEASE_MS  # a's lease lapsed while its write is open
            nursery.start_soon(b_takes_over)
            # b's take-over waits for a's transaction
            await wait_until(
                lambda: a.read(waiting_for_a_lock, b.conn), "b's take-over waiting", 10
            )
            assert not took
            release.set()
        (done,) = took
        assert done.gone == ["a"] and done.reconciled == [] and done.polls == 2
        rows = await b.read(
            lambda conn: conn.execute(
                "SELECT status, owner, so_request_id FROM elements"
            ).fetchall()
        )
        assert sorted(rows) == sorted((E.TRIGGERED, "b", so) for _, so, _ in answers)
        with pytest.raises(LeaseLost):  # after the take-over: refused
            await a.tx(
                dispatch.record_polls, [(jobs[0].element, PollOutcome("COMPLETE", "", E.COMPLETED))]
            )
        rows = await b.read(lambda conn: conn.execute("SELECT status FROM elements").fetchall())
        assert rows == [(E.TRIGGERED,), (E.TRIGGERED,)]
    finally:
        release.set()
        await a.close()
        await b.close()


@ON_POSTGRES
async def test_a_dispatcher_pass_takes_other_schedules_work_while_one_is_claimed(
    backend: str, tmp_path: Path
) -> None:
    """The earliest due elements are all x's, which a is claiming: b's dispatcher pass (it
    claims 4 at a time) skips them and takes y's at once, not after a doorbell or a retry."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await thread_store(url, clock, "a")
    cfg = daemon_config(tmp_path, dispatcher__max_concurrent=4)
    b = daemon.build_context(cfg, TrioWallClock(EPOCH.timestamp()), InlineExecutor())
    await b.store.open()
    await b.store.tx(fleet.register, "b", "host", 2, LEASE_MS)
    b.store.owner = "b"
    locked, release = threading.Event(), threading.Event()
    try:
        await immediates(a, {s: [f"{s}{i}" for i in range(4)] for s in ("x", "y")})
        due = await a.read(dispatch.due_elements, clock.ms, 1000)
        names = {d.element: d.name for d in due}
        x = [d.element for d in due if d.name.startswith("x")]
        assert [names[d.element] for d in due[:4]] == ["x0", "x1", "x2", "x3"]  # the earliest
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.tx, held, dispatch.begin_dispatches, (x, []), locked, release)
            await trio.to_thread.run_sync(locked.wait, 10)
            try:
                _, jobs, _ = await dispatcher.claim_due(b, 4)
                a_still_claiming = not release.is_set()
            finally:
                release.set()
        assert a_still_claiming
        assert sorted(names[j.element] for j in jobs) == ["y0", "y1", "y2", "y3"]
    finally:
        release.set()
        await a.close()
        await b.store.close()


@ON_POSTGRES
async def test_a_claim_that_reaches_a_change_beyond_its_schedules_runs_again_alone(
    backend: str,
) -> None:
    """b's claim finds the freeze past its end: turning it off concerns every schedule, so
    the claim (under the shared write lock) is run again under the exclusive one
    (`Tx.exclusive`), which waits for a's transaction, open under the shared lock."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    a = await thread_store(url, clock, "a")
    b = await thread_store(url, clock, "b")
    locked, release = threading.Event(), threading.Event()
    claimed: list[dispatch.Claim] = []

    async def b_claims() -> None:
        claimed.append(await b.tx(dispatch.begin_dispatches, [], []))

    try:
        await b.tx(dispatch.set_freeze, True, "ops", "incident", clock.ms + 1000)
        clock.ms += 1000  # the freeze reached its end
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.tx, held, lambda tx: None, (), locked, release)
            await trio.to_thread.run_sync(locked.wait, 10)
            try:
                nursery.start_soon(b_claims)
                await wait_until(lambda: a.read(waiting_for_a_lock, b.conn), "b waiting", 5)
                assert not claimed
            finally:
                release.set()
        assert claimed and await b.read(dispatch.load_freeze) is None  # turned off, by b
    finally:
        release.set()
        await a.close()
        await b.close()


def schedule_row(conn: Any, schedule_id: str) -> int:
    return conn.execute(
        "SELECT id FROM schedules WHERE schedule_id = ?", (schedule_id,)
    ).fetchone()[0]


def waiting_for_a_lock(conn: Any, whose: Any) -> bool:
    """The session of `whose` (a store's writer connection) waits for a lock."""
    return bool(
        conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ? AND wait_event_type = 'Lock'",
            (whose.raw.info.backend_pid,),
        ).fetchone()[0]
    )


@ON_POSTGRES
async def test_a_daemon_frozen_in_a_transaction_holds_the_others_up_for_a_third_of_a_lease(
    backend: str,
) -> None:
    """a stops inside its claim (frozen, cut off), its locks held: the server ends the
    transaction after lease/3 idle, so b's heartbeat (exclusive lock) goes through then, not
    when a wakes. a woken before its lease ends runs its claim again and commits it; woken
    after b took it over, it is fenced."""
    url = os.environ["CMSOD_STORE__URL"]
    clock = Clock()
    lease_ms = 3000  # the shortest allowed: a transaction idle for 1 s is ended
    a = await thread_store(url, clock, "a", lease_ms)
    b = await thread_store(url, clock, "b", lease_ms)
    try:
        await immediates(a, {"x": ["x1", "x2"], "y": ["y1", "y2"]})
        due = await a.read(dispatch.due_elements, clock.ms, 1000)
        names = {d.element: d.name for d in due}
        x = [e for e, name in names.items() if name.startswith("x")]
        y = [e for e, name in names.items() if name.startswith("y")]

        async def frozen_a_and_b_beating(elements: list[int]) -> tuple[Any, fleet.Round, float]:
            """a's claim of `elements` stopped mid-way; b's heartbeat meanwhile."""
            locked, release = threading.Event(), threading.Event()
            outcome: list[Any] = []

            async def a_claims() -> None:
                try:
                    outcome.append(
                        await a.tx(held, dispatch.begin_dispatches, (elements, []), locked, release)
                    )
                except LeaseLost as exc:
                    outcome.append(exc)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a_claims)
                    await trio.to_thread.run_sync(locked.wait, 10)
                    began = trio.current_time()
                    done = await b.tx(fleet.heartbeat, "b", lease_ms, False)
                    waited_s = trio.current_time() - began
                    a_still_frozen = not release.is_set()
                    release.set()
            finally:
                release.set()
            assert a_still_frozen
            assert waited_s < 2.5, f"b's heartbeat waited {waited_s:.1f} s for frozen a"
            return outcome[0], done, waited_s

        # woken within its lease: its claim, ended by the server, runs again and commits
        claimed, done, _ = await frozen_a_and_b_beating(x)
        assert done.gone == []
        assert sorted(names[j.element] for j in claimed.jobs) == ["x1", "x2"]
        # frozen past its lease: b takes it over meanwhile, a's claim is refused
        clock.ms += lease_ms
        refused, done, _ = await frozen_a_and_b_beating(y)
        assert isinstance(refused, LeaseLost)
        assert done.gone == ["a"] and sorted(done.reconciled) == ["x1", "x2"]
        b_claim = await b.tx(dispatch.begin_dispatches, y, [])
        assert sorted(names[j.element] for j in b_claim.jobs) == ["y1", "y2"]  # a's claim undone
    finally:
        await a.close()
        await b.close()
