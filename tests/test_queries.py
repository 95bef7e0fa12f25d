"""Large queries: reads on a connection (and thread) of their own, so they never hold up a write;
Details, Get and List streamed in bounded replies to a caller that asks with `more: true`, and
a plain call bounded with a clear error."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from cmsod import lifecycle
from cmsod.control import api
from cmsod.executor import ThreadExecutor
from cmsod.store import schedules, views
from cmsod.store.store import Store
from cmsod.wire.cmso import ScheduleRequest
from tests.cmso_requests import request
from tests.conftest import EPOCH, ControlClient, Daemon, wait_until

DETAILS, GET, LIST, TICKETS = (
    "io.cmsod.Schedules.Details",
    "io.cmsod.Schedules.Get",
    "io.cmsod.Schedules.List",
    "io.cmsod.Tickets.List",
)

# Every test here runs on SQLite and on PostgreSQL (the `backend` fixture).
pytestmark = pytest.mark.usefixtures("backend")


async def streamed(client: ControlClient, method: str, **parameters: Any) -> list[dict[str, Any]]:
    """Every reply to a call with `more: true`, up to the one that does not continue."""
    call = {"method": method, "parameters": parameters, "more": True}
    await client.send_raw(msgspec.json.encode(call) + b"\0")
    replies = []
    while True:
        raw = await client.receive_raw()
        assert raw is not None, "daemon closed the connection"
        replies.append(msgspec.json.decode(raw))
        if not replies[-1].get("continues"):
            return replies


async def create(client: ControlClient, schedule_id: str, count: int) -> None:
    nodes = [f"n{i:05}" for i in range(count)]
    body = request(schedule_id, nodes, now=EPOCH, minutes_from_now=600)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)


async def test_details_are_streamed_in_bounded_replies(client: ControlClient) -> None:
    await create(client, "big", 2500)
    await create(client, "other", 3)
    replies = await streamed(client, DETAILS, filters={"vnfName": ["n0%"]})
    assert [r.get("continues", False) for r in replies] == [True, True, False]
    assert [len(r["parameters"]["details"]) for r in replies] == [1000, 1000, 503]
    rows = [d for r in replies for d in r["parameters"]["details"]]
    assert [d["scheduleRequest"]["scheduleId"] for d in rows[2499:2501]] == ["big", "other"]
    assert [d["vnfName"] for d in rows[:2500]] == [f"n{i:05}" for i in range(2500)]
    # CMSO's paging filter still counts schedules
    replies = await streamed(client, DETAILS, filters={"vnfName": ["n0%"], "maxSchedules": ["1"]})
    assert sum(len(r["parameters"]["details"]) for r in replies) == 2500
    # nothing matches: CMSO's 404, as the only reply
    (reply,) = await streamed(client, DETAILS, filters={"vnfName": ["nothing%"]})
    assert reply["error"] == "io.cmsod.RequestError" and reply["parameters"]["status"] == 404


async def test_a_client_gone_mid_stream_ends_the_read(cmsod: Daemon) -> None:
    client = await cmsod.connect()
    await create(client, "big", 3000)
    call = {"method": DETAILS, "parameters": {"filters": {}}, "more": True}
    await client.send_raw(msgspec.json.encode(call) + b"\0")
    first = msgspec.json.decode(await client.receive_raw() or b"{}")
    assert first["continues"] and len(first["parameters"]["details"]) == 1000
    await client.aclose()  # gone, with 2,000 rows unread (the daemon blocked sending them)

    async def read_ended() -> bool:
        return cmsod.ctx.store.streams.borrowed_tokens == 0

    await wait_until(read_ended, "the stream's read ended", within_s=10)
    other = await cmsod.connect()  # and the daemon serves on
    assert len((await other.ok(DETAILS, filters={"vnfName": ["n0000%"]}))["details"]) == 10


async def test_a_plain_call_is_bounded_with_a_clear_error(
    client: ControlClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "MAX_REPLY_ROWS", 1000)
    await create(client, "big", 1001)
    reply = await client.call(DETAILS, filters={"vnfName": ["n%"]})
    assert reply["error"] == "io.cmsod.TooManyRows"
    assert "more: true" in reply["parameters"]["message"]
    assert reply["parameters"]["limit"] == 1000
    reply = await client.call(GET, scheduleId="big")
    assert reply["error"] == "io.cmsod.TooManyRows"
    # under the limit, the plain call answers as it always did
    narrow = await client.ok(DETAILS, filters={"vnfName": ["n000%"]})
    assert len(narrow["details"]) == 100


async def test_a_streamed_schedule_is_the_same_view(client: ControlClient) -> None:
    await create(client, "big", 1500)
    whole = await client.wait_for("big", "Pending Approval", "Optimization Failed")
    replies = await streamed(client, GET, scheduleId="big")
    head = replies[0]["parameters"]["schedule"]
    assert head["elements"] == 1500
    assert head["groups"][0]["changeManagementSchedules"] == []
    for reply in replies[1:]:
        for element in reply["parameters"]["elements"]:
            group = next(g for g in head["groups"] if g["groupId"] == element.pop("groupId"))
            group["changeManagementSchedules"].append(element)
    assert head == whole
    sizes = [len(r["parameters"].get("elements", [])) for r in replies]
    assert sizes[0] == 0 and sum(sizes) == 1500 and max(sizes) <= api.STREAM_CHUNK


async def test_list_follows_its_cursor_when_streamed(client: ControlClient) -> None:
    for n in range(5):
        await create(client, f"s{n}", 1)
    replies = await streamed(client, LIST, limit=2)
    assert [[s["scheduleId"] for s in r["parameters"]["schedules"]] for r in replies] == [
        ["s4", "s3"],  # newest first
        ["s2", "s1"],
        ["s0"],
    ]
    assert [r.get("continues", False) for r in replies] == [True, True, False]


async def paged(client: ControlClient, method: str, rows: str, key: str) -> list[str]:
    """Every page's ids, one row a page, each page from the one before's `next`."""
    ids, after = [], None
    while True:
        reply = await client.ok(method, limit=1, **({"after": after} if after else {}))
        ids += [row[key] for row in reply[rows]]
        if not (after := reply["next"]):
            return ids


async def test_after_takes_an_id_that_looks_like_a_cursor(
    cmsod: Daemon, client: ControlClient
) -> None:
    """A schedule id may hold ":" and a change id anything: an id given as `after` is the
    row the page starts after, never read as a cursor (`20261203:c` was: an empty page)."""
    from cmsod.model import ScheduleStatus as S
    from tests.cmso_requests import approval

    ids = ["20261203:a", "20261203:b", "20261203:c"]
    for n, schedule_id in enumerate(ids):
        body = request(schedule_id, [f"node{n}"], now=EPOCH, minutes_from_now=600)
        await client.ok("io.cmsod.Schedules.Create", schedule=body)
        await client.wait_for(schedule_id, S.PENDING_APPROVAL)
        await client.ok("io.cmsod.Schedules.Approve", scheduleId=schedule_id, approval=approval())
    listed = await client.ok(LIST, after="20261203:c")
    assert [s["scheduleId"] for s in listed["schedules"]] == ["20261203:b", "20261203:a"]
    assert await paged(client, LIST, "schedules", "scheduleId") == ids[::-1]

    # change ids as the ticket system might make them, one in each shape a cursor could take
    tickets = (await client.ok(TICKETS))["tickets"]
    renamed = ["0:a", "0~b", "0~c"]  # (in the order they are listed in: by planned start)

    def rename(tx: Any) -> None:
        for ticket, change_id in zip(tickets, renamed, strict=True):
            tx.execute(
                "UPDATE change_tickets SET change_id = ? WHERE change_id = ?",
                (change_id, ticket["changeId"]),
            )

    await cmsod.ctx.store.tx(rename)
    for n, change_id in enumerate(renamed):
        listed = await client.ok(TICKETS, after=change_id)
        assert [t["changeId"] for t in listed["tickets"]] == renamed[n + 1 :]
    assert await paged(client, TICKETS, "tickets", "changeId") == renamed


async def test_after_that_is_neither_an_id_nor_a_cursor_is_refused_naming_it(
    client: ControlClient,
) -> None:
    """Not a 500 and a bug logged: "²" is a digit to str.isdigit and not to int(); a number
    past a BIGINT overflowed SQLite's binding."""
    await create(client, "s0", 1)
    for method in (LIST, TICKETS):
        for after in ("nope", "²~s0", "9" * 30 + "~s0", "1:s0", "~s0"):
            reply = await client.call(method, after=after)
            assert reply["error"] == "org.varlink.service.InvalidParameter", reply
            assert reply["parameters"]["parameter"] == "after"


async def test_a_word_that_is_no_status_is_refused_listing_the_statuses(
    client: ControlClient,
) -> None:
    """Not an empty list, which reads as "none in that status"."""
    await create(client, "s0", 1)
    for status in (["completed"], ["Pending Approval", "Bogus"]):
        reply = await client.call(LIST, status=status)
        assert reply["error"] == "org.varlink.service.InvalidParameter", reply
        assert reply["parameters"]["parameter"] == "status"
        message = reply["parameters"]["message"]
        assert message.startswith(f"{status[-1]!r} is not a schedule status; they are (exactly): ")
        assert "Pending Approval, Accepted," in message and "Completed with error(s)" in message
    listed = await client.ok(LIST, status=["Pending Schedule", "Pending Approval"])
    assert [s["scheduleId"] for s in listed["schedules"]] == ["s0"]


# -- the store: reads beside the writer -----------------------------------------------------


async def store_with(tmp_path: Path, count: int) -> Store:
    store = Store(os.environ.get("CMSOD_STORE__URL") or tmp_path / "cmsod.db", ThreadExecutor())
    await store.open()
    body = request("big", [f"n{i}" for i in range(count)], now=EPOCH, minutes_from_now=600)
    new = lifecycle.validate_request(msgspec.convert(body, ScheduleRequest))
    await store.tx(schedules.create_schedule, new)
    return store


def held_read(release: threading.Event, started: trio.Event) -> Any:
    """A read that takes as long as the test says (a search over 100,000 rows, in effect)."""

    def read(conn: Any) -> int:
        (count,) = conn.execute("SELECT count(*) FROM elements").fetchone()
        trio.from_thread.run_sync(started.set)
        release.wait(30)
        return int(count)

    return read


async def test_a_long_read_does_not_hold_up_a_write(tmp_path: Path) -> None:
    store = await store_with(tmp_path, 10)
    release, started = threading.Event(), trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.read, held_read(release, started))
            await started.wait()
            with trio.fail_after(10):  # (it would wait for the read: release comes only after)
                await store.tx(schedules.delete_schedule, "big")
            release.set()
    finally:
        release.set()
        await store.close()


async def test_a_stream_reads_one_snapshot_while_writes_go_on(tmp_path: Path) -> None:
    store = await store_with(tmp_path, 2500)
    try:
        statuses = []
        stream = store.stream(views.details, {"vnfName": ["n%"]}, chunk=1000)
        async for rows in stream:
            statuses += [row["status"] for row in rows]
            if len(statuses) == 1000:  # half read: the schedule is deleted meanwhile
                with trio.fail_after(10):
                    await store.tx(schedules.delete_schedule, "big")
        assert len(statuses) == 2500 and set(statuses) == {"Pending Schedule"}
        rows = [row async for chunk in store.stream(views.details, {}, chunk=1000) for row in chunk]
        assert {row["status"] for row in rows} == {"Deleted"}
    finally:
        await store.close()
