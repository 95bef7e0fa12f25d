"""Several daemons on one PostgreSQL (cmsod/store/fleet.py): work is claimed, a lapsed daemon's
work is taken over and reconciled as after a crash, and a daemon whose work was taken over
writes nothing more (fencing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from cmsod import ctl, lifecycle
from cmsod.executor import InlineExecutor, ThreadExecutor
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.store import Store, dispatch, fleet, outboxes, schedules, views
from cmsod.store.backend import connect_postgres
from cmsod.store.store import LeaseLost
from cmsod.wire.cmso import ScheduleRequest
from tests.cmso_requests import request
from tests.conftest import EPOCH, start_daemon, store_rows, wait_until
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
        jobs = await a.tx(dispatch.begin_dispatches, [d.element for d in due], [])
        assert len(jobs) == 2  # a's intents: claimed by a
        assert await b.tx(dispatch.begin_dispatches, [d.element for d in due], []) == []

        clock.ms += LEASE_MS - 1  # not lapsed yet: nothing is taken
        assert (await b.tx(fleet.heartbeat, "b", LEASE_MS, False)).gone == []
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


@ON_POSTGRES
async def test_two_daemons_one_killed_the_other_finishes_its_rollout(
    backend: str, autojump_clock, nursery, tmp_path: Path
) -> None:
    """In process: a daemon 'dies' with a work flow sent and unanswered (its row stays, its
    lease lapses); the other takes its work over within a lease and a beat."""
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
    second = await start_daemon(nursery, tmp_path / "b", store__lease_s=30)
    assert first.ctx.store.owner != second.ctx.store.owner
    await client.aclose()
    client = await second.connect()
    assert (await client.schedule("ha"))["status"] == S.NOTIFICATIONS_INITIATED  # not taken yet
    status = await client.ok("io.cmsod.Manager.Status")
    assert {d["id"]: d["dispatching"] for d in status["daemons"]} == {
        first.ctx.store.owner: 1,  # its intent, unanswered
        second.ctx.store.owner: 0,
    }
    first.ctx.store.owner = None  # dies without a word: no clean leave, its lease lapses
    first.cancel.cancel()
    died = trio.current_time()
    view = await client.wait_for("ha", S.COMPLETED_WITH_ERRORS, S.COMPLETED)
    item = view["groups"][0]["changeManagementSchedules"][0]
    assert item["status"] == E.ERROR and "dispatch outcome unknown" in item["statusMessage"]
    assert trio.current_time() - died <= 30 + 10 + 2  # a lease and a beat (and the looks)
    assert second.ctx.so.dispatched == []  # never re-sent blindly
    owners = store_rows(tmp_path, "SELECT owner FROM elements")
    assert owners == [(second.ctx.store.owner,)]
    status = await client.ok("io.cmsod.Manager.Status")  # `cmsoctl status`: who is alive
    assert [(d["id"], d["alive"], d["leases"]) for d in status["daemons"]] == [
        (second.ctx.store.owner, True, ["events", "tickets"])
    ]
    second.cancel.cancel()


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
async def test_the_watch_tail_finds_an_event_committed_out_of_order_and_skips_a_rollback(
    backend: str,
) -> None:
    """Write transactions may commit out of their events' seq order: the tail (what watchers
    read) takes a lower seq that shows up late, once, and gives up one rolled back once no
    transaction that could hold it is running."""
    url = os.environ["CMSOD_STORE__URL"]
    store = Store(url, InlineExecutor())
    await store.open()
    slow, rolled, quick = (connect_postgres(url) for _ in range(3))
    insert = (
        "INSERT INTO events (schedule_id, topic, body, created_ms) VALUES (?, 't', ?, 0)"
        " RETURNING seq"
    )

    async def read(tail: outboxes.Tail) -> list[int]:
        found = await store.read(outboxes.read_tail, tail.top, list(tail.gaps), 100)
        return [row[0] for row in tail.advance(found)]

    try:
        tail = outboxes.Tail(await store.read(outboxes.last_event_seq))
        slow.execute("BEGIN")
        (first,) = slow.execute(insert, ("a", b"1")).fetchone()
        rolled.execute("BEGIN")
        (second,) = rolled.execute(insert, ("b", b"2")).fetchone()
        (third,) = quick.execute(insert, ("c", b"3")).fetchone()
        assert await read(tail) == [third]
        assert set(tail.gaps) == {first, second}  # still running: looked for again
        assert await read(tail) == [] and set(tail.gaps) == {first, second}
        rolled.execute("ROLLBACK")
        slow.execute("COMMIT")
        assert await read(tail) == [first]  # late, not missed
        with trio.fail_after(30):  # (other sessions of the server may hold its xmin a moment)
            while tail.gaps:
                assert await read(tail) == []
                await trio.sleep(0.05)
        assert await read(tail) == []  # the rolled-back one is given up, nothing twice
    finally:
        for conn in (slow, rolled, quick):
            conn.close()
        await store.close()


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
