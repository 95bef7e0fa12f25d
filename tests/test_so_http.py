"""Dispatch and polling against a real HTTP server on loopback playing SO (tests/fake_http.py),
through the daemon's control socket. Each fault ends in the status CMSO's contract names."""

from __future__ import annotations

import base64
import json
import logging
import socket
from pathlib import Path

import pytest
import trio

from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import request
from tests.conftest import EPOCH, Daemon, start_daemon, wait_until
from tests.fake_http import Drop, FakeSO, Reply, Reset

DONE = (S.COMPLETED, S.COMPLETED_WITH_ERRORS)


async def daemon_for(nursery, tmp_path: Path, so: FakeSO, **overrides) -> Daemon:
    await nursery.start(so.serve)
    secret = tmp_path / "so.credentials"
    secret.write_text("cmso-user:s3cret\n")
    settings = dict(
        so__mode="http",
        so__url=so.url,
        so__credentials_file=secret,
        so__read_timeout_s=5,
        poller__interval_s=30,
    )
    settings.update(overrides)
    return await start_daemon(nursery, tmp_path, **settings)


async def run_immediate(
    cmsod: Daemon, nodes: list[str], schedule_id: str = "s1"
) -> dict[str, dict]:
    client = await cmsod.connect()
    await client.ok(
        "io.cmsod.Schedules.Create",
        schedule=request(schedule_id, now=EPOCH, nodes=nodes, minutes_from_now=None),
    )
    view = await client.wait_for(schedule_id, *DONE)
    return {
        e["vnfName"]: {**e, "schedule": view["status"]}
        for g in view["groups"]
        for e in g["changeManagementSchedules"]
    }


@pytest.mark.parametrize("answer", ["201", "200"])
async def test_dispatch_poll_complete_and_what_so_receives(
    autojump_clock, nursery, tmp_path, answer
) -> None:
    so = FakeSO(["IN_PROGRESS", "IN_PROGRESS", "COMPLETE"], answer=answer)
    cmsod = await daemon_for(nursery, tmp_path, so)
    items = await run_immediate(cmsod, ["node1", "node2"])
    assert {n: i["status"] for n, i in items.items()} == {
        "node1": E.COMPLETED,
        "node2": E.COMPLETED,
    }
    assert items["node1"]["schedule"] == S.COMPLETED
    assert (
        items["node1"]["msoRequestId"].startswith("req-")
        and items["node1"]["msoStatus"] == "COMPLETE"
    )
    assert items["node1"]["executionCompletedTime"] == "2026-12-01T09:00:00Z"  # SO's finishTime
    posts = [r for r in so.requests if r.method == "POST"]
    assert sorted(r.path for r in posts) == ["/schedule/node1", "/schedule/node2"]
    for post in posts:
        assert post.headers["x-fromappid"] == "cmso"
        assert (
            post.headers["authorization"]
            == "Basic " + base64.b64encode(b"cmso-user:s3cret").decode()
        )
        assert len(post.headers["x-transactionid"]) == 36  # a UUID, one per element dispatch
        assert post.json()["vnfName"] == post.path.removeprefix("/schedule/")
        assert post.json()["requestInfo"]["source"] == "VID"  # the stored request, as sent
    assert len({p.headers["x-transactionid"] for p in posts}) == 2
    gets = [r for r in so.requests if r.method == "GET"]
    assert len(gets) == 6  # three polls each, the last COMPLETE
    log_text = (tmp_path / "cmsod.sqlite3").read_bytes()
    assert b"s3cret" not in log_text


@pytest.mark.parametrize(
    "fault,message",
    [
        (Reply(500, b"internal trouble"), "HTTP 500: internal trouble"),
        (
            Reply(201, {"cmResponses": [{"orchestratorRequestId": "x", "vnfName": "other"}]}),
            "Response did not contain vnfName=node1",
        ),
        (
            Reply(200, {"status": 500, "entity": {"requestReferences": {"requestId": "x"}}}),
            "HTTP 200",
        ),
        (Reply(201, b"{not json"), "HTTP 201: {not json"),
        (Reply(200, b""), "HTTP 200: "),
        (Reply(202, {"ok": True}), "HTTP 202"),
    ],
)
async def test_answers_that_are_not_acceptance_are_scheduling_failed(
    autojump_clock, nursery, tmp_path, fault, message
) -> None:
    so = FakeSO()
    so.dispatch_faults[1] = fault
    items = await run_immediate(await daemon_for(nursery, tmp_path, so), ["node1"])
    assert items["node1"]["status"] == E.SCHEDULING_FAILED
    assert items["node1"]["statusMessage"].startswith(message)
    assert items["node1"]["schedule"] == S.COMPLETED_WITH_ERRORS


async def test_the_nth_call_fails_only_its_element(autojump_clock, nursery, tmp_path) -> None:
    so = FakeSO()
    so.dispatch_faults[2] = Reply(503, b"busy")
    items = await run_immediate(
        await daemon_for(nursery, tmp_path, so), ["node1", "node2", "node3"]
    )
    statuses = sorted(i["status"] for i in items.values())
    assert statuses == sorted([E.COMPLETED, E.COMPLETED, E.SCHEDULING_FAILED])


async def test_a_slow_answer_past_the_read_timeout_is_unconfirmed(
    autojump_clock, nursery, tmp_path
) -> None:
    so = FakeSO()
    so.dispatch_faults[1] = Reply(201, b"{}", delay_s=60)
    items = await run_immediate(await daemon_for(nursery, tmp_path, so), ["node1"])
    assert items["node1"]["status"] == E.SCHEDULING_FAILED
    assert "may have started the work flow" in items["node1"]["statusMessage"]
    assert "no answer within 5 s" in items["node1"]["statusMessage"]


async def test_executed_but_the_reply_dropped(autojump_clock, nursery, tmp_path) -> None:
    so = FakeSO()
    so.dispatch_faults[1] = Drop()
    items = await run_immediate(await daemon_for(nursery, tmp_path, so), ["node1"])
    assert so.started and so.started[0][1] == "node1"  # SO did start it
    assert items["node1"]["status"] == E.SCHEDULING_FAILED
    assert "not re-sent" in items["node1"]["statusMessage"]
    assert so.dispatch_calls == 1  # never blindly re-sent


async def test_executed_reply_dropped_resent_with_the_same_key_where_so_dedupes(
    autojump_clock, nursery, tmp_path
) -> None:
    so = FakeSO()
    so.dedupe = True
    so.dispatch_faults[1] = Drop()
    items = await run_immediate(
        await daemon_for(nursery, tmp_path, so, so__resend_unconfirmed=True), ["node1"]
    )
    assert items["node1"]["status"] == E.COMPLETED
    keys = [r.headers["x-transactionid"] for r in so.requests if r.method == "POST"]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert len(so.started) == 1  # started once


async def test_connection_reset_before_the_request_is_read(
    autojump_clock, nursery, tmp_path
) -> None:
    so = FakeSO()
    cmsod = await daemon_for(nursery, tmp_path, so)
    so.reset_next = 1
    items = await run_immediate(cmsod, ["node1"])
    # a reset after the request went out on the wire: the outcome is unknown, so not re-sent
    assert items["node1"]["status"] == E.SCHEDULING_FAILED
    assert "may have started" in items["node1"]["statusMessage"]


def closed_port() -> socket.socket:
    """A loopback port bound but not listening: connections to it are refused (the
    orchestrator is down); close it to let a server take the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_an_orchestrator_that_cannot_be_reached_fails_after_the_grace(
    autojump_clock, nursery, tmp_path
) -> None:
    with closed_port() as down:
        port = down.getsockname()[1]
        cmsod = await start_daemon(
            nursery,
            tmp_path,
            so__mode="http",
            so__url=f"http://127.0.0.1:{port}",
            dispatcher__misfire_grace_s=120,
        )
        began = trio.current_time()
        items = await run_immediate(cmsod, ["node1"])
    assert trio.current_time() - began >= 120  # tried for the whole grace
    assert items["node1"]["status"] == E.SCHEDULING_FAILED
    message = items["node1"]["statusMessage"]
    assert message.startswith("not dispatched within the misfire grace (")
    assert message.count("orchestrator") == 1, message  # the cause, said once
    assert "reach" not in message  # (it was: could not reach ...: cannot reach ...: ...)
    assert message.count(f"127.0.0.1:{port}") == 1, message  # the address, once


async def test_a_short_orchestrator_outage_costs_nothing(autojump_clock, nursery, tmp_path) -> None:
    so = FakeSO()
    down = closed_port()
    so.port = down.getsockname()[1]
    cmsod = await start_daemon(nursery, tmp_path, so__mode="http", so__url=so.url)
    client = await cmsod.connect()
    await client.ok(
        "io.cmsod.Schedules.Create",
        schedule=request("s1", now=EPOCH, nodes=["node1"], minutes_from_now=None),
    )

    async def so_reported_down() -> bool:
        health = await client.ok("io.cmsod.Manager.Status")
        return health["actors"]["dispatcher"]["lastError"] is not None

    await wait_until(so_reported_down, "the dispatcher meets the outage")
    await trio.sleep(20)  # an outage of 20 s: longer than the old 4 tries in 1.7 s
    down.close()
    await nursery.start(so.serve)
    view = await client.wait_for("s1", *DONE)
    assert cmsod.element_statuses(view) == {"node1": E.COMPLETED}
    assert len([r for r in so.requests if r.method == "POST"]) == 1


async def test_stopping_during_an_outage_releases_the_element(
    autojump_clock, nursery, tmp_path
) -> None:
    """Nothing was sent: the next start dispatches it, it is not reconciled as unknown."""
    with closed_port() as down:
        port = down.getsockname()[1]
        cmsod = await start_daemon(
            nursery, tmp_path, so__mode="http", so__url=f"http://127.0.0.1:{port}"
        )
        client = await cmsod.connect()
        await client.ok(
            "io.cmsod.Schedules.Create",
            schedule=request("s1", now=EPOCH, nodes=["node1"], minutes_from_now=None),
        )

        async def released() -> bool:
            cmsod.ctx.stopping.set()
            return cmsod.ctx.drained.is_set()

        async def tried() -> bool:
            health = await client.ok("io.cmsod.Manager.Status")
            return health["actors"]["dispatcher"]["lastError"] is not None

        await wait_until(tried, "the dispatcher meets the outage")
        await wait_until(released, "the dispatcher drains")
        cmsod.cancel.cancel()
    so = FakeSO()
    again = await (await daemon_for(nursery, tmp_path, so)).connect()
    view = await again.wait_for("s1", *DONE)
    assert view["groups"][0]["changeManagementSchedules"][0]["status"] == E.COMPLETED
    assert len([r for r in so.requests if r.method == "POST"]) == 1


@pytest.mark.parametrize(
    "states,status",
    [
        (["COMPLETED"], E.COMPLETED),
        (["IN_PROGRESS", "FAILED"], E.FAILED),
        (["ABORTED"], E.FAILED),
        (["TIMEOUT"], E.FAILED),
        (["ROLLED_BACK_TO_ASSIGNED"], E.FAILED),
        (["UNLOCKED"], E.FAILED),
        (["PENDING", "IN_PROGRESS", "COMPLETE"], E.COMPLETED),
    ],
)
async def test_so_end_states(autojump_clock, nursery, tmp_path, states, status) -> None:
    items = await run_immediate(await daemon_for(nursery, tmp_path, FakeSO(states)), ["node1"])
    assert items["node1"]["status"] == status
    assert items["node1"]["msoStatus"] == states[-1]


@pytest.mark.parametrize(
    "fault,status,mso_status",
    [
        (Reply(404, b"{}"), E.FAILED, "Not found"),
        (Reply(400, b"{}"), E.ERROR, "Bad Request"),
        (Reply(500, b"{}"), E.ERROR, "Failed"),
        (Reply(200, b"<html>"), E.ERROR, "Bad Response"),
        (Reply(200, {"request": {}}), E.ERROR, "Bad Response"),
    ],
)
async def test_bad_poll_answers(
    autojump_clock, nursery, tmp_path, fault, status, mso_status
) -> None:
    so = FakeSO()
    so.status_faults[1] = fault
    items = await run_immediate(await daemon_for(nursery, tmp_path, so), ["node1"])
    assert (items["node1"]["status"], items["node1"]["msoStatus"]) == (status, mso_status)


async def test_poll_connection_errors_change_nothing_then_recover(
    autojump_clock, nursery, tmp_path
) -> None:
    so = FakeSO(["IN_PROGRESS", "COMPLETE"])
    for n in (1, 2, 3):
        so.status_faults[n] = Reset()
    cmsod = await daemon_for(nursery, tmp_path, so)
    items = await run_immediate(cmsod, ["node1"])
    assert items["node1"]["status"] == E.COMPLETED
    figures = cmsod.ctx.figures["poller"]
    assert figures.errors == 3 and "no answer from the orchestrator" in (figures.last_error or "")
    import sqlite3

    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        assert db.execute("SELECT poll_errors FROM elements").fetchone() == (3,)
    status = await (await cmsod.connect()).ok("io.cmsod.Manager.Status")
    assert status["actors"]["poller"]["errors"] == 3


async def test_a_work_flow_that_never_ends_times_out(autojump_clock, nursery, tmp_path) -> None:
    so = FakeSO(["IN_PROGRESS"])
    began = trio.current_time()
    items = await run_immediate(
        await daemon_for(nursery, tmp_path, so, poller__execution_timeout_s=3600), ["node1"]
    )
    assert items["node1"]["status"] == E.FAILED
    assert items["node1"]["msoStatus"] == "Timeout"
    assert "no end state from the orchestrator within 3600 s" in items["node1"]["msoMessage"]
    assert 3600 <= trio.current_time() - began <= 3600 + 2 * 30 * 1.1


async def test_credentials_never_reach_the_log(autojump_clock, nursery, tmp_path, caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="cmsod")
    logging.getLogger("cmsod").propagate = True
    try:
        so = FakeSO()
        so.dispatch_faults[1] = Reply(401, b"who are you")
        await run_immediate(await daemon_for(nursery, tmp_path, so), ["node1"])
    finally:
        logging.getLogger("cmsod").propagate = False
    text = json.dumps([r.__dict__.get("fields", {}) for r in caplog.records], default=str)
    assert "s3cret" not in text and "element.dispatch_failed" in [
        getattr(r, "event", "") for r in caplog.records
    ]


async def test_a_failed_work_flow_is_a_warning_with_its_schedule_and_so_reason(
    autojump_clock, nursery, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="cmsod")
    so = FakeSO(["IN_PROGRESS", "FAILED"])
    items = await run_immediate(await daemon_for(nursery, tmp_path, so), ["node1"])
    assert items["node1"]["status"] == E.FAILED
    # the orchestrator's reason is the element's message (show's MESSAGE column)
    assert items["node1"]["statusMessage"] == "orchestrator: FAILED: failed"
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "element.finished"]
    assert record.levelno == logging.WARNING
    assert record.fields["schedule_id"] == "s1"  # type: ignore[attr-defined]
    assert record.fields["so_message"] == "failed"  # type: ignore[attr-defined]


async def test_an_so_outage_does_not_cost_a_commit_per_element_per_round(
    autojump_clock, nursery, tmp_path
) -> None:
    so = FakeSO(["IN_PROGRESS"])
    cmsod = await daemon_for(nursery, tmp_path, so)
    client = await cmsod.connect()
    nodes = [f"n{i}" for i in range(200)]
    await client.ok(
        "io.cmsod.Schedules.Create",
        schedule=request("s1", now=EPOCH, nodes=nodes, minutes_from_now=None),
    )

    async def all_polled() -> bool:
        view = await client.schedule("s1")
        items = [e for g in view["groups"] for e in g["changeManagementSchedules"]]
        return all(e.get("msoStatus") == "IN_PROGRESS" for e in items)

    await wait_until(all_polled, "every work flow polled once")
    so.polls_down = True
    commits = cmsod.ctx.store.commits
    failed = cmsod.ctx.figures["poller"].errors
    await trio.sleep(200)  # polls at about 30 s, 90 s (backing off), 210 s: twice each
    assert cmsod.ctx.figures["poller"].errors - failed >= 2 * len(nodes)
    # one transaction per round of polls (a round: those due within the jitter band), not
    # one per element per round (400 and more)
    assert cmsod.ctx.store.commits - commits < 50
