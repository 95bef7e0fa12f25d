"""The alarm gate: Alertmanager matchers from templates (quoting as its parser reads them),
and, under MockClock against the fake SO and a fake Alertmanager on loopback serving API v2's
JSON: a firing alert holds the element and it is carried over, a resolved one lets it run,
an alert source that fails holds (fail-closed, the default) or lets go (fail-open)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from cmsod import alarms, config, gates
from cmsod.errors import ConfigError
from cmsod.lifecycle import parse_time_ms
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.wire.alertmanager import AlertStatus, GettableAlert
from tests.conftest import Daemon
from tests.fake_http import FakeAlertmanager, FakeSO, Raw, Reply, Reset
from tests.test_rollout import DONE, approved, at, daemon, edits, items, sleep_until

# -- the queries ----------------------------------------------------------------------------


def test_templates_become_matchers_quoted_as_alertmanager_reads_them() -> None:
    templates = [['instance="{vnfName}"'], ['site="{site}"', 'severity=~"critical|major"']]
    assert alarms.queries(templates, 'n"1\\x', {"site": "PAR 1\n"}) == [
        ('instance="n\\"1\\\\x"',),
        ('site="PAR 1\\n"', 'severity=~"critical|major"'),
    ]
    # an attribute the element lacks leaves that query out
    assert alarms.queries(templates, "n1", {}) == [('instance="n1"',)]
    # a regex operator: the attribute's value is matched literally (Go's QuoteMeta)
    assert alarms.queries([['region=~"{region}-.*"']], "n1", {"region": "eu.west(1)"}) == [
        ('region=~"eu\\\\.west\\\\(1\\\\)-.*"',)
    ]
    assert alarms.queries([['site!="{site}"']], "n1", {"site": "a"}) == [('site!="a"',)]
    # the template's own escapes as Alertmanager reads them; a regex's \d stays
    assert alarms.queries([['x=~"\\d+\\.{vnfName}"']], "n1", {}) == [('x=~"\\\\d+\\\\.n1"',)]
    assert alarms.queries([['x="a\\"b\\\\c\\n"']], "n1", {}) == [('x="a\\"b\\\\c\\n"',)]


def test_a_bad_template_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "cmsod.toml"
    path.write_text("[alarms]\nurl = \"http://am:9093\"\nqueries = [['instance={vnfName}']]\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})
    assert "at `$.alarms.queries[0][0]`" in str(caught.value)


def alert(name: str, state: str = "active") -> GettableAlert:
    return GettableAlert(
        {"alertname": name},
        AlertStatus(state),
        "f1",
        "2026-12-01T07:55:00.000Z",  # type: ignore[arg-type]
    )


def test_what_fires() -> None:
    assert alarms.firing([]) is None
    assert alarms.firing([alert("A", "suppressed")]) is None
    assert alarms.firing([alert("A"), alert("B")]) == (
        "alerts firing: A since 2026-12-01T07:55:00.000Z, B since 2026-12-01T07:55:00.000Z"
    )
    many = alarms.firing([alert(f"A{i}") for i in range(7)])
    assert many is not None and many.endswith(" and 2 more")


def test_the_gate() -> None:
    snap = gates.Snapshot(
        now_ms=1000, schedule_id="s", name="n1", status=E.SCHEDULED, start_ms=1000, created_ms=0
    )
    templates = (('instance="{vnfName}"',),)
    query = ('instance="n1"',)
    firing = gates.AlarmGate(templates, firing={query: "alerts firing: X"}, recheck_ms=60_000)
    assert firing(snap) == gates.Hold(61_000, 'alerts firing: X (instance="n1")')
    failed = gates.AlarmGate(templates, failed={query: "refused"})
    held = failed(snap)
    assert isinstance(held, gates.Hold) and "alarms.on_error = hold): refused" in held.why
    assert gates.AlarmGate(templates, failed={query: "refused"}, fail_open=True)(snap) == gates.GO
    assert gates.AlarmGate(templates)(snap) == gates.GO  # asked: nothing fires
    assert gates.AlarmGate()(snap) == gates.GO  # no alarm gate configured


# -- the daemon against a fake Alertmanager --------------------------------------------------


async def with_alertmanager(
    nursery: trio.Nursery, tmp_path: Path, so: FakeSO, url: str, **overrides: Any
) -> Daemon:
    return await daemon(nursery, tmp_path, so, alarms__url=url, **overrides)


async def test_a_firing_alert_holds_then_carries_over_and_its_end_lets_it_run(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so, am = FakeSO(), FakeAlertmanager()
    await nursery.start(am.serve)
    am.fire("NodeDown", instance="n1", severity="critical")
    am.fire("Muted", instance="n2", silenced=True)  # silenced: not counted
    cmsod = await with_alertmanager(nursery, tmp_path, so, am.url)
    client = await cmsod.connect()
    await approved(client, "am", ["n1", "n2"])  # 08:01, 09:01
    client = await sleep_until(cmsod, client, "09:30")
    view = await client.schedule("am")
    element = items(view)
    # held at 08:01, asked again every minute; past the grace (08:06) carried over to the
    # next free slot (09:01 is n2's)
    assert element["n1"]["status"] == E.SCHEDULED
    assert element["n1"]["startTime"] == at("10:01")
    assert element["n1"]["statusMessage"] == (
        "carried over to 2026-12-01T10:01:00Z: held by alarm: alerts firing: NodeDown since"
        ' 2026-12-01T07:55:00.000Z (instance="n1")'
    )
    assert element["n2"]["dispatchTime"] == at("09:01")
    held = [e for e in edits(tmp_path) if e.get("hold-gate") == "alarm"]
    assert [(e["vnf-name"], e["hold-until-time"]) for e in held] == [("n1", at("08:02"))]
    assert ['instance="n1"'] in am.queries and ['instance="n2"'] in am.queries
    assert all(
        "active=true&silenced=false&inhibited=false&filter=instance%3D%22n" in r.path
        for r in am.requests
    )
    status = await client.ok("io.cmsod.Manager.Status")
    assert status["alarms"]["ok"] is True and status["alarms"]["firing"] >= 5
    am.resolve("NodeDown")
    view = await client.wait_for("am", *DONE)
    assert items(view)["n1"]["dispatchTime"] == at("10:01")
    assert sorted(vnf for _, vnf in so.started) == ["n1", "n2"]
    await client.aclose()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "fault,why",
    [
        (Reply(500, b"internal error"), "answered 500: internal error"),
        (Reply(200, b"<html>garbage</html>"), "not a list of alerts: JSON is malformed"),
        (Reply(200, [{"labels": {}}]), "not a list of alerts: Object missing required field"),
        (Reply(200, [], delay_s=30), "no answer within 5 s"),
        (Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n[]", close=True), "Alertmanager at"),
        (Reset(), "Alertmanager at"),
    ],
)
async def test_an_alert_source_that_fails_holds_until_it_answers(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path, fault: Any, why: str
) -> None:
    so, am = FakeSO(), FakeAlertmanager()
    await nursery.start(am.serve)
    am.fault = fault
    cmsod = await with_alertmanager(nursery, tmp_path, so, am.url)
    client = await cmsod.connect()
    await approved(client, "fc", ["n1"])  # 08:01
    client = await sleep_until(cmsod, client, "08:02")
    element = items(await client.schedule("fc"))["n1"]
    assert so.started == []
    status = await client.ok("io.cmsod.Manager.Status")
    assert status["healthy"] is False and "Alert Source FAILED" in status["problems"]
    assert status["alarms"]["ok"] is False and why in status["alarms"]["lastError"]
    held = [e for e in edits(tmp_path) if e.get("hold-gate") == "alarm"]
    assert len(held) == 1 and "(alarms.on_error = hold)" in held[0]["hold-why"]
    assert why in held[0]["hold-why"]
    assert element["status"] == E.SCHEDULED
    am.fault = None  # it answers again: the next look lets it go, within the grace
    view = await client.wait_for("fc", *DONE)
    dispatched = parse_time_ms(items(view)["n1"]["dispatchTime"])
    # The hold ends at 08:02, the instant this test woke and cleared the fault: the look then
    # may come before or after the clearing, so 08:02 itself is a right answer.
    assert parse_time_ms(at("08:02")) <= dispatched <= parse_time_ms(at("08:06"))
    assert (await client.ok("io.cmsod.Manager.Status"))["healthy"] is True
    await client.aclose()


async def test_fail_open_dispatches_when_the_source_cannot_be_reached(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    url = f"http://127.0.0.1:{closed_port()}"
    cmsod = await with_alertmanager(nursery, tmp_path, so, url, alarms__on_error="go")
    client = await cmsod.connect()
    await approved(client, "fo", ["n1", "n2"])
    view = await client.wait_for("fo", *DONE)
    assert [e["dispatchTime"] for e in items(view).values()] == [at("08:01"), at("09:01")]
    status = await client.ok("io.cmsod.Manager.Status")
    assert status["alarms"]["onError"] == "go" and status["alarms"]["ok"] is False
    assert "ECONNREFUSED" in status["alarms"]["lastError"]
    assert not [e for e in edits(tmp_path) if e.get("hold-gate")]
    await client.aclose()
    assert S.COMPLETED == view["status"]


async def test_a_burst_against_a_silent_source_is_decided_within_one_timeout(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """300 elements due at once, one query each, max_concurrent 8, an Alertmanager that takes
    them and never answers: the whole batch is decided (here: let go, on_error = go) within
    one connect + read timeout, not 300 / 8 read timeouts one after another."""
    so, am = FakeSO(), FakeAlertmanager()
    await nursery.start(am.serve)
    am.fault = Reply(200, [], delay_s=3600)
    cmsod = await with_alertmanager(nursery, tmp_path, so, am.url, alarms__on_error="go")
    client = await cmsod.connect()
    nodes = [f"n{i}" for i in range(300)]
    await approved(client, "burst", nodes, concurrency=300)  # all at 08:01
    view = await client.wait_for("burst", *DONE)
    start, deadline = parse_time_ms(at("08:01")), 2_000 + 5_000  # connect + read timeouts
    assert all(
        start <= parse_time_ms(e["dispatchTime"]) <= start + deadline + 1_000
        for e in items(view).values()
    )
    assert len(so.started) == 300 and 8 <= len(am.requests) < 300
    status = await client.ok("io.cmsod.Manager.Status")
    assert status["alarms"]["ok"] is False and "no answer within" in status["alarms"]["lastError"]
    await client.aclose()


async def test_after_a_connect_failure_the_rest_of_the_batch_is_not_tried(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    url = f"http://127.0.0.1:{closed_port()}"
    cmsod = await with_alertmanager(nursery, tmp_path, so, url, alarms__on_error="go")
    source = cmsod.ctx.alerts
    assert source is not None
    connect, attempts = source.client._connect, []

    async def counted() -> Any:
        attempts.append(1)
        return await connect()

    source.client._connect = counted  # type: ignore[method-assign]
    client = await cmsod.connect()
    await approved(client, "cf", [f"n{i}" for i in range(50)], concurrency=50)
    view = await client.wait_for("cf", *DONE)
    assert {e["dispatchTime"] for e in items(view).values()} == {at("08:01")}
    # 50 queries: only those already trying (max_concurrent, 8) when the first was refused,
    # and those handed their freed seats at that moment
    assert 1 <= len(attempts) <= 16
    assert cmsod.ctx.alert_source.queries == 50
    status = await client.ok("io.cmsod.Manager.Status")
    assert "ECONNREFUSED" in status["alarms"]["lastError"]
    await client.aclose()
