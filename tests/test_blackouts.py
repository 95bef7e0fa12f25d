"""The built-in ticket book: blackouts and outside tickets make elements unavailable to the
optimizer, also through an element they require; adding one says which planned work it
touches; `cmsoctl blackout` drives it end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import request
from tests.conftest import EPOCH, ControlClient
from tests.procs import Daemon, cmsoctl

ADD = "io.cmsod.Availability.Add"


def starts(view: dict) -> dict[str, str]:
    return {
        e["vnfName"]: e["startTime"]
        for g in view["groups"]
        for e in g["changeManagementSchedules"]
        if "startTime" in e
    }


async def test_a_blackout_moves_the_plan_and_reports_what_it_touches(
    autojump_clock, client: ControlClient
) -> None:
    await client.ok(
        "io.cmsod.Schedules.Create", schedule=request("planned", now=EPOCH, nodes=["node1"])
    )
    await client.wait_for("planned", S.PENDING_APPROVAL)  # node1 at 08:01-09:01
    added = await client.ok(
        ADD,
        element="node1",
        startTime="2026-12-01T08:30:00Z",
        endTime="2026-12-01T10:30:00Z",
        reason="fibre works",
        by="ops",
    )
    assert added["entry"]["id"] == "BO000001" and added["touches"] == ["planned"]
    second = await client.ok(
        ADD,
        element="node2",
        startTime="2026-12-01T08:00:00Z",
        endTime="2026-12-01T09:30:00Z",
        kind="ticket",
        id="CHG77",
    )
    assert second["entry"]["kind"] == "ticket" and second["touches"] == []

    await client.ok(
        "io.cmsod.Schedules.Create",
        schedule=request("next", now=EPOCH, nodes=["node1", "node2", "node3"], concurrency=3),
    )
    view = await client.wait_for("next", S.PENDING_APPROVAL)
    # node1: after its blackout and after "planned" (08:01-09:01); node2 after the ticket
    assert starts(view) == {
        "node1": "2026-12-01T11:01:00Z",
        "node2": "2026-12-01T10:01:00Z",
        "node3": "2026-12-01T08:01:00Z",
    }
    listed = (await client.ok("io.cmsod.Availability.List"))["entries"]
    assert [e["id"] for e in listed] == ["CHG77", "BO000001"]
    assert (await client.ok("io.cmsod.Availability.List", element="node1"))["entries"][0][
        "reason"
    ] == "fibre works"
    assert (await client.ok("io.cmsod.Availability.Remove", id="CHG77"))["removed"] is True
    reply = await client.call("io.cmsod.Availability.Remove", id="CHG77")
    assert reply["error"] == "io.cmsod.Availability.NoSuchEntry"
    bad = await client.call(
        ADD, element="node1", startTime="2026-12-01T10:00:00Z", endTime="2026-12-01T09:00:00Z"
    )
    assert bad["error"] == "org.varlink.service.InvalidParameter"
    assert bad["parameters"] == {
        "parameter": "endTime",
        "message": "the blackout must end after it starts"
        " (2026-12-01T10:00:00Z .. 2026-12-01T09:00:00Z)",
    }


async def test_ids_are_never_reused_and_times_need_a_zone(client: ControlClient) -> None:
    def add(start: str = "2026-12-01T08:00:00Z", **more: str) -> Any:
        return client.call(ADD, element="n1", startTime=start, endTime="2026-12-02T00:00Z", **more)

    first = (await add())["parameters"]["entry"]["id"]
    await client.ok("io.cmsod.Availability.Remove", id=first)
    second = (await add())["parameters"]["entry"]["id"]
    assert (first, second) == ("BO000001", "BO000002")  # the removed one's id is not reused
    await client.ok("io.cmsod.Availability.Remove", id=second)
    assert (await add(kind="ticket"))["parameters"]["entry"]["id"] == "TK000003"
    reply = await add(start="2026-12-01T08:00:00")
    assert reply["parameters"]["parameter"] == "startTime"
    assert "no time zone: add Z for UTC" in reply["parameters"]["message"]
    reply = await add(id="TK000003")
    assert reply["error"] == "io.cmsod.Availability.Exists"
    assert reply["parameters"]["message"] == "an entry 'TK000003' is already in the ticket book"


async def test_a_ticket_on_a_required_element_blocks_the_element(
    autojump_clock, client: ControlClient
) -> None:
    await client.ok(
        ADD,
        element="pserver-7",
        startTime="2026-12-01T00:00:00Z",
        endTime="2026-12-03T00:00:00Z",
        kind="ticket",
        id="CHG9",
        reason="host maintenance",
    )
    body = request("hosted", now=EPOCH, nodes=["node1", "node2"], concurrency=2)
    body["schedulingInfo"]["elements"] = [
        {"elementId": "node1", "elementData": [{"name": "requires", "value": "pserver-7"}]}
    ]
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    view = await client.wait_for("hosted", S.OPTIMIZATION_FAILED)
    items = {e["vnfName"]: e for e in view["groups"][0]["changeManagementSchedules"]}
    assert items["node1"]["status"] == E.NOT_SCHEDULED
    assert (
        "ticket CHG9 on pserver-7, which it requires (host maintenance)"
        in items["node1"]["statusMessage"]
    )
    plan = await client.ok("io.cmsod.Schedules.Plan", schedule={**body, "scheduleId": "again"})
    assert plan["optimizer"]["schedules"][0]["unScheduledElements"][0]["elementId"] == "node1"


def test_cmsoctl_blackout_moves_the_next_plan_end_to_end(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        body = request(
            "e2e-next",
            now=EPOCH,
            nodes=["node1", "node2"],
            concurrency=2,
            minutes_from_now=60 * 24 * 400,
        )
        start = body["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"]
        code, out = cmsoctl(tmp_path, "plan", "-", stdin=json.dumps(body))
        assert code == 0 and out.count(start) == 2  # both at the start (one time format)
        end = start.replace(start[11:13], f"{int(start[11:13]) + 2:02d}")
        code, out = cmsoctl(
            tmp_path,
            "blackout",
            "add",
            "node2",
            "--from",
            start,
            "--to",
            end,
            "--reason",
            "site visit",
        )
        assert code == 0, out
        assert out.startswith("BO000001: node2 unavailable") and "(site visit)" in out
        code, out = cmsoctl(tmp_path, "blackout", "list")
        assert code == 0 and "BO000001" in out and "site visit" in out
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        daemon.wait_log(r"event=schedule\.optimized schedule_id=e2e-next")
        code, out = cmsoctl(tmp_path, "--json", "show", "e2e-next")
        planned = starts(json.loads(out)["schedule"])
        assert (
            planned["node1"] == start and planned["node2"] >= end
        )  # after it (half-open: at its end)
        code, out = cmsoctl(tmp_path, "blackout", "rm", "BO000001")
        assert (code, out.strip()) == (0, "BO000001 removed")

        # times without a zone, or an --until already past: refused in a sentence naming the flag
        code, out = cmsoctl(tmp_path, "blackout", "add", "node2", "--from", start[:-1], "--to", end)
        assert code != 0 and out.strip() == (
            f"cmsoctl: --from: {start[:-1]!r}: no time zone: add Z for UTC, or an offset"
            " such as +01:00"
        )
        code, out = cmsoctl(tmp_path, "freeze", "on", "--until", "2099-01-01T00:00:00")
        assert code != 0 and out.strip() == (
            "cmsoctl: --until: 400 Scheduler.INVALID_ATTRIBUTE: Invalid attribute"
            " until=2099-01-01T00:00:00: no time zone: add Z for UTC, or an offset such as +01:00"
        )
        code, out = cmsoctl(tmp_path, "freeze", "on", "--until", "2020-01-01T00:00:00Z")
        assert code != 0 and out.startswith(
            "cmsoctl: --until: 400 Scheduler.INVALID_ATTRIBUTE: Invalid attribute"
            " until=2020-01-01T00:00:00Z: not in the future (it is 20"
        ), out
        assert "FROZEN" not in cmsoctl(tmp_path, "status")[1]  # nothing changed
    finally:
        assert daemon.stop() == 0


async def test_a_book_from_before_the_migration_keeps_its_entries_and_numbers(
    nursery, tmp_path: Path
) -> None:
    """A database of schema 5 (ids then came from max(id) + 1) is migrated: its entries stay,
    and numbering goes on from the highest id, never back."""
    import sqlite3

    from cmsod.store.schema import MIGRATIONS
    from tests.conftest import start_daemon

    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        for number, migration in enumerate(MIGRATIONS[:5], start=1):
            db.executescript(migration)
            db.execute(f"PRAGMA user_version = {number}")
        db.execute(
            "INSERT INTO availability VALUES"
            " (3, 'BO000003', 'blackout', 'n1', 0, 1000, 'old', 0, 'someone')"
        )
    db.close()
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    listed = (await client.ok("io.cmsod.Availability.List"))["entries"]
    assert [(e["id"], e["reason"]) for e in listed] == [("BO000003", "old")]
    await client.ok("io.cmsod.Availability.Remove", id="BO000003")
    added = await client.ok(
        ADD, element="n1", startTime="2026-12-01T08:00:00Z", endTime="2026-12-01T09:00:00Z"
    )
    assert added["entry"]["id"] == "BO000004"
    await client.aclose()
    cmsod.cancel.cancel()
