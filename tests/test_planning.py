"""Planning through the daemon and the command line: work already scheduled on an element
moves the next plan; `io.cmsod.Schedules.Plan`, `cmsod plan`, `cmsoctl plan` and
`cmsoctl gantt` (terminal and SVG)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta
from pathlib import Path

import trio

from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, ControlClient, start_daemon
from tests.procs import Daemon, cmsoctl

CREATE = "io.cmsod.Schedules.Create"


def starts(view: dict) -> dict[str, str]:
    return {
        e["vnfName"]: e["startTime"] for g in view["groups"] for e in g["changeManagementSchedules"]
    }


async def test_scheduled_work_on_an_element_moves_the_next_plan(
    autojump_clock, client: ControlClient
) -> None:
    await client.ok(
        CREATE, schedule=request("first", now=EPOCH, nodes=["node1", "node2"], concurrency=2)
    )
    first = starts(await client.wait_for("first", S.PENDING_APPROVAL))
    assert first == {"node1": "2026-12-01T08:01:00Z", "node2": "2026-12-01T08:01:00Z"}
    await client.ok("io.cmsod.Schedules.Approve", scheduleId="first", approval=approval())

    # node2 is busy 08:01-09:01 with the first schedule: the second puts it after that
    second_body = request("second", now=EPOCH, nodes=["node2", "node3"], concurrency=2)
    planned = (await client.ok("io.cmsod.Schedules.Plan", schedule=second_body))["optimizer"]
    placed = {e["elementId"]: e["startTime"] for e in planned["schedules"][0]["scheduledElements"]}
    assert placed == {
        "node3": "2026-12-01T08:01:00.000+0000",
        "node2": "2026-12-01T09:01:00.000+0000",
    }
    assert planned["status"] == "COMPLETED" and planned["objective"] == 1 + 2
    listed = await client.ok("io.cmsod.Schedules.List")
    assert [s["scheduleId"] for s in listed["schedules"]] == ["first"]  # Plan stores nothing

    await client.ok(CREATE, schedule=second_body)
    second = await client.wait_for("second", S.PENDING_APPROVAL)
    assert starts(second) == {"node2": "2026-12-01T09:01:00Z", "node3": "2026-12-01T08:01:00Z"}
    assert second["optimizerMessage"] == "2 scheduled, 0 not scheduled"  # the operator's words


async def test_plan_rejects_what_create_rejects(client: ControlClient) -> None:
    body = request("bad", now=EPOCH, normal=-5)
    reply = await client.call("io.cmsod.Schedules.Plan", schedule=body)
    assert reply["parameters"]["requestError"]["messageId"] == "Scheduler.INVALID_ATTRIBUTE"
    immediate = request("now", now=EPOCH, minutes_from_now=None)
    reply = await client.call("io.cmsod.Schedules.Plan", schedule=immediate)
    assert reply["parameters"]["requestError"]["variables"] == ["changeWindow"]


async def test_create_and_plan_refuse_more_elements_than_the_setting(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    d = await start_daemon(nursery, tmp_path, optimizer__max_elements=2)
    client = await d.connect()
    body = request("big", now=EPOCH, nodes=["n1", "n2", "n3"])
    for method in (CREATE, "io.cmsod.Schedules.Plan"):
        error = (await client.call(method, schedule=body))["parameters"]["requestError"]
        assert error["messageId"] == "Scheduler.TOO_MANY_ELEMENTS"
        assert error["variables"] == ["schedulingInfo.vnfDetails[].node", "3", "2"]
    reply = await client.call(CREATE, schedule=request("small", now=EPOCH, nodes=["n1", "n2"]))
    assert reply["parameters"]["status"] == "Pending Schedule"
    await client.aclose()
    d.cancel.cancel()


def test_cmsod_plan_offline(tmp_path: Path) -> None:
    body = request(
        "offline",
        now=EPOCH,
        nodes=["node1", "node2", "node3"],
        concurrency=1,
        policy="Weekday_00_06",
    )
    body["schedulingInfo"]["elements"] = [
        {"elementId": "node3", "elementData": [{"name": "timezone", "value": "Asia/Tokyo"}]}
    ]
    (tmp_path / "r.json").write_text(json.dumps(body))
    (tmp_path / "t.json").write_text(
        json.dumps(
            {
                "elements": [
                    {
                        "id": "CHG7",
                        "startTime": "2026-12-01T00:00:00Z",
                        "endTime": "2026-12-03T00:00:00Z",
                        "elementIds": ["node1"],
                    }
                ]
            }
        )
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmsod",
            "plan",
            str(tmp_path / "r.json"),
            "--unavailability",
            str(tmp_path / "t.json"),
            "--at",
            "2026-12-01T08:00:00Z",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    response = json.loads(run.stdout)
    solution = response["schedules"][0]
    # the window is 08:01 on Tue 1 Dec to 08:01 on Wed 2 Dec, UTC; Weekday_00_06 in UTC
    # leaves Wed 00:01..05:01 starts; Tokyo (UTC+9) leaves Tue 15:01..20:01 (00:01..05:01 local)
    placed = {e["elementId"]: e["startTime"] for e in solution["scheduledElements"]}
    assert placed == {
        "node3": "2026-12-01T15:01:00.000+0000",
        "node2": "2026-12-02T00:01:00.000+0000",
    }
    (unplaced,) = solution["unScheduledElements"]
    assert unplaced["elementId"] == "node1"
    assert unplaced["notScheduledReaons"] == ["AvailabilityConstraint"]
    assert "ticket CHG7" in unplaced["notScheduledMessages"][0]
    assert "objective" in run.stderr and "solved in" in run.stderr

    bad = subprocess.run(
        [sys.executable, "-m", "cmsod", "plan", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 66 and "missing.json" in bad.stderr


def test_cmsoctl_plan_and_gantt(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        body = request(
            "drawn",
            now=EPOCH,
            nodes=[f"n{i}" for i in range(5)],
            concurrency=2,
            minutes_from_now=60 * 24 * 365,
        )
        (tmp_path / "r.json").write_text(json.dumps(body))
        code, out = cmsoctl(tmp_path, "plan", str(tmp_path / "r.json"))
        assert code == 0, out
        assert out.splitlines()[0].split() == ["ELEMENT", "GROUP", "START", "END"]
        assert "COMPLETED: 5 scheduled, 0 not scheduled" in out
        assert cmsoctl(tmp_path, "submit", str(tmp_path / "r.json"))[0] == 0
        daemon.wait_log(r"event=schedule\.optimized schedule_id=drawn")
        code, out = cmsoctl(tmp_path, "gantt", "drawn", "--width", "30", "--tz", "Asia/Tokyo")
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].startswith("drawn  Pending Approval  5 elements")
        assert "Asia/Tokyo" in lines[0]
        assert "|" in lines[2]  # the ruler with its ticks under the labels
        assert sum("░" in line for line in lines) == 5 + 1  # five rows and the legend
        assert lines[-3].startswith("running") and "peak 2 at once, limit 2" in lines[-2]
        assert lines[-1] == "legend  ░ Pending Approval (5)"
        svg_file = tmp_path / "plan.svg"
        code, out = cmsoctl(tmp_path, "--json", "gantt", "drawn", "--svg", str(svg_file))
        assert code == 0, out
        assert json.loads(out)["schedule"]["scheduleId"] == "drawn"
        check_svg(ET.parse(svg_file).getroot(), rows=5, statuses={"Pending Approval": 5})
        for width in ("0", "-5", "abc"):
            code, out = cmsoctl(tmp_path, "gantt", "drawn", "--width", width)
            assert code == 2 and "--width" in out, out
        code, out = cmsoctl(tmp_path, "gantt", "drawn", "--tz", "Mars/Olympus")
        assert code == 2 and "unknown time zone 'Mars/Olympus'" in out
    finally:
        assert daemon.stop() == 0


SVG = "{http://www.w3.org/2000/svg}"


def check_svg(picture: ET.Element, rows: int, statuses: dict[str, int]) -> None:
    """An opaque background, a time axis with labelled ticks, one bar per row coloured by its
    status, a legend entry per status present, the concurrency profile against the limit."""
    from cmsod.gantt import style

    background = picture.find(f"{SVG}rect")
    assert background is not None and background.get("fill") == "#ffffff"
    axis = picture.find(f".//{SVG}g[@id='axis']")
    assert axis is not None and len(axis.findall(f"{SVG}text")) >= 2
    drawn = picture.findall(f".//{SVG}g[@class='row']")
    assert len(drawn) == rows
    for row in drawn:
        (bar,) = row.findall(f"{SVG}rect[@class='planned']")
        if row.get("data-status"):
            assert bar.get("fill") == style(row.get("data-status", ""))[0]
    legend = picture.find(f".//{SVG}g[@id='legend']")
    assert legend is not None
    keys = {r.get("data-status"): r.get("fill") for r in legend.findall(f"{SVG}rect")}
    assert keys == {status: style(status)[0] for status in statuses}
    texts = "".join(legend.itertext())
    assert all(f"{status} ({n})" in texts for status, n in statuses.items())
    assert picture.find(f".//{SVG}g[@id='concurrency']") is not None


def test_svg_colours_each_status_and_rolls_up_large_schedules() -> None:
    from cmsod import gantt

    def element(i: int, status: str) -> dict:
        start = EPOCH + timedelta(minutes=10 * (i // 50))

        def at(moment: datetime) -> str:
            return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

        item = {
            "vnfName": f"n{i}",
            "status": status,
            "startTime": at(start),
            "finishTime": at(start + timedelta(hours=1)),
        }
        if status in ("Completed", "Failed", "Triggered"):
            item["dispatchTime"] = item["startTime"]
        if status in ("Completed", "Failed"):
            item["executionCompletedTime"] = at(start + timedelta(minutes=40))
        return item

    kinds = ["Completed", "Failed", "Scheduling Failed", "Triggered", "Scheduled"]
    small = {
        "scheduleId": "s",
        "status": "Notifications Initiated",
        "groups": [
            {
                "groupId": "g",
                "concurrencyLimit": 2,
                "changeManagementSchedules": [element(i, kinds[i]) for i in range(5)],
            }
        ],
    }
    picture = ET.fromstring(gantt.svg(small))
    check_svg(picture, rows=5, statuses=dict.fromkeys(kinds, 1))
    # Scheduling Failed is not drawn in the pending colour; actual runs are drawn too
    assert gantt.style("Scheduling Failed")[0] != gantt.style("Scheduled")[0]
    assert len(picture.findall(f".//{SVG}rect[@class='actual']")) == 3
    limit = picture.find(f".//{SVG}line[@class='limit']")
    assert limit is not None

    big = {
        "scheduleId": "big",
        "status": "Scheduled",
        "groups": [
            {
                "groupId": f"site-{g}",
                "concurrencyLimit": 400,
                "changeManagementSchedules": [
                    element(i, kinds[i % 5]) for i in range(g * 1000, g * 1000 + 1000)
                ],
            }
            for g in range(10)
        ],
    }
    text = gantt.svg(big)
    picture = ET.fromstring(text)
    check_svg(picture, rows=10, statuses=dict.fromkeys(kinds, 2000))
    assert int(picture.get("height", "0")) < 1000  # ten group rows, not 10,000 element rows

    immediate = {"scheduleId": "now", "status": "Scheduled", "groups": []}
    assert "1970" not in gantt.svg(immediate) and "nothing planned" in gantt.svg(immediate)


def test_terminal_counts_are_numbers_and_colours_only_on_a_terminal() -> None:
    from cmsod import gantt

    group = [
        {
            "vnfName": f"n{i}",
            "status": "Failed" if i == 0 else "Scheduled",
            "startTime": "2026-12-01T08:00:00Z",
            "finishTime": "2026-12-01T09:00:00Z",
        }
        for i in range(120)
    ]
    view = {
        "scheduleId": "wide",
        "status": "Scheduled",
        "groups": [{"groupId": "g", "concurrencyLimit": 120, "changeManagementSchedules": group}],
    }
    plain = gantt.terminal(view, 40)
    row = next(line for line in plain.splitlines() if line.startswith("g "))
    assert "120" in row and "+" not in row
    assert "\x1b[" not in plain
    coloured = gantt.terminal(view, 40, colour=True)
    assert "\x1b[31m 120" in coloured  # a failure in the column: red
    by_element = gantt.terminal(view, 40, by="element")
    assert sum(line.startswith("g/n") for line in by_element.splitlines()) == 120


def test_concurrency_profile_counts_instants_not_columns() -> None:
    from cmsod.gantt import profile

    m = 60_000
    waves = [(0, 40 * m)] * 3 + [(40 * m, 80 * m)] * 3 + [(80 * m, 120 * m)]
    peaks = profile(waves, 0, 3 * m, 40)
    assert max(peaks) == 3  # the column where one wave ends and the next starts holds 3, not 6
    assert peaks[:13] == [3] * 13 and peaks[-1] == 1


async def test_inventory_time_zones_and_the_site_limit(
    autojump_clock, nursery, tmp_path: Path
) -> None:
    from tests.conftest import start_daemon

    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        '[elements."node1"]\ntimezone = "Asia/Tokyo"\nsite = "kista"\n'
        '[elements."node2"]\nsite = "kista"\n[elements."node3"]\nsite = "kista"\n'
    )
    cmsod = await start_daemon(
        nursery,
        tmp_path,
        optimizer__inventory=inventory,
        optimizer__attribute="site",
        optimizer__attribute_limit=1,
    )
    client = await cmsod.connect()
    body = request(
        "sited",
        now=EPOCH,
        nodes=["node1", "node2", "node3"],
        concurrency=3,
        policy="EveryDay_00_06",
    )
    body["schedulingInfo"]["elements"] = [  # the request's own data wins over the inventory
        {"elementId": "node3", "elementData": [{"name": "site", "value": "solna"}]}
    ]
    await client.ok(CREATE, schedule=body)
    view = await client.wait_for("sited", S.PENDING_APPROVAL)
    # node1 in Tokyo: 00:00-06:00 JST is 15:00-21:00Z; node2 (kista) and node3 (solna) in UTC
    # may share a slot, node2 and node1 (both kista) may not run at once (limit 1 per site)
    assert starts(view) == {
        "node1": "2026-12-01T15:01:00Z",
        "node2": "2026-12-02T00:01:00Z",
        "node3": "2026-12-02T00:01:00Z",
    }


def test_the_element_cap_is_a_setting(tmp_path: Path) -> None:
    def plan(nodes: list[str], max_elements: int) -> subprocess.CompletedProcess:
        body = request("big", now=EPOCH, nodes=nodes, concurrency=1000, normal=60)
        (tmp_path / "r.json").write_text(json.dumps(body))
        (tmp_path / "cmsod.toml").write_text(f"[optimizer]\nmax_elements = {max_elements}\n")
        return subprocess.run(
            [sys.executable, "-m", "cmsod", "plan", str(tmp_path / "r.json"), "--json"]
            + ["--config", str(tmp_path / "cmsod.toml"), "--at", "2026-12-01T08:00:00Z"],
            capture_output=True,
            text=True,
        )

    refused = plan(["node1", "node2", "node3"], 2)
    assert refused.returncode == 65
    assert refused.stderr.strip() == (
        "cmsod plan: 400 Scheduler.TOO_MANY_ELEMENTS: schedulingInfo.vnfDetails[].node holds 3 "
        "elements, more than the 2 allowed ([optimizer] max_elements)"
    )
    # more than the 100,000 that was a constant: planned, every element placed
    many = plan([f"n{i}" for i in range(100_001)], 100_001)
    assert many.returncode == 0, many.stderr
    assert len(json.loads(many.stdout)["schedules"][0]["scheduledElements"]) == 100_001
