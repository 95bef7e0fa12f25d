"""Freeze calendars: the file format and its errors, the periods' expansion (yearly, across
the year's end, in a zone with daylight saving), the planner never planning into one, and
the dispatcher holding an element in one, including a period added by a reload after
approval (under MockClock, against the fake SO)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from cmsod import calendars, config, daemon, gates
from cmsod.calendars import CalendarFile, Calendars, compile_file
from cmsod.clock import TrioWallClock
from cmsod.errors import ConfigError
from cmsod.executor import InlineExecutor
from cmsod.lifecycle import format_time, parse_time_ms
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.planner import Options, Planning
from cmsod.optimize.problem import Problem, ProblemGroup
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, Daemon
from tests.fake_http import FakeSO
from tests.test_rollout import at, edits, fingerprint_of, items, sleep_until

DONE = (S.COMPLETED, S.COMPLETED_WITH_ERRORS)


def periods(text: str, source: str = "cal.toml") -> Calendars:
    import tomllib

    content = msgspec.convert(tomllib.loads(text), CalendarFile)
    return Calendars(tuple(compile_file(content, source)))


def spans(cal: Calendars, name: str = "n1", **attrs: str) -> list[tuple[str, str]]:
    lo, hi = parse_time_ms("2026-01-01T00:00:00Z"), parse_time_ms("2028-01-01T00:00:00Z")
    return [
        (format_time(a) or "", format_time(b) or "") for a, b, _ in cal.denied(name, attrs, lo, hi)
    ]


def test_dates_ranges_and_yearly_periods_in_their_zone() -> None:
    cal = periods(
        """
        timezone = "Europe/Paris"
        [[deny]]
        name = "Christmas"
        from = "12-24"
        to = "12-26"
        yearly = true
        [[deny]]
        name = "New Year"
        from = "12-31T18:00"
        to = "01-01"
        yearly = true
        [[deny]]
        name = "summer night"
        from = "2026-07-14T22:00"
        to = "2026-07-15T02:00"
        [[deny]]
        name = "one day"
        date = "2026-03-29"
        timezone = "UTC"
        """
    )
    assert spans(cal) == [
        ("2025-12-31T17:00:00Z", "2026-01-01T23:00:00Z"),  # the New Year of 2025, whole
        ("2026-03-29T00:00:00Z", "2026-03-30T00:00:00Z"),
        ("2026-07-14T20:00:00Z", "2026-07-15T00:00:00Z"),  # CEST: UTC+2
        ("2026-12-23T23:00:00Z", "2026-12-26T23:00:00Z"),  # CET: UTC+1, the 26th included
        ("2026-12-31T17:00:00Z", "2027-01-01T23:00:00Z"),  # across the year's end
        ("2027-12-23T23:00:00Z", "2027-12-26T23:00:00Z"),
        ("2027-12-31T17:00:00Z", "2028-01-01T23:00:00Z"),
    ]


def test_a_scope_names_the_elements_it_denies() -> None:
    cal = periods(
        """
        [[deny]]
        name = "PAR1 works"
        date = "2026-12-09"
        scope = { site = "PAR1" }
        [[deny]]
        name = "eu freeze"
        date = "2026-12-10"
        scope = { region = "eu", kind = "router" }
        [[deny]]
        name = "that one"
        date = "2026-12-11"
        scope = { vnfName = "n7" }
        """
    )
    assert [a[:10] for a, _ in spans(cal, site="PAR1")] == ["2026-12-09"]
    assert spans(cal, site="LON1") == []
    assert spans(cal, region="eu") == []  # every pair of the scope must match
    assert [a[:10] for a, _ in spans(cal, region="eu", kind="router")] == ["2026-12-10"]
    assert [a[:10] for a, _ in spans(cal, "n7")] == ["2026-12-11"]


def test_feb_29_every_year_only_in_leap_years() -> None:
    cal = periods('[[deny]]\nname = "leap"\ndate = "02-29"\nyearly = true\n')
    lo, hi = parse_time_ms("2026-01-01T00:00:00Z"), parse_time_ms("2030-01-01T00:00:00Z")
    found = cal.denied("n1", {}, lo, hi)
    assert [format_time(a) for a, _, _ in found] == ["2028-02-29T00:00:00Z"]


def test_a_yearly_period_from_or_to_feb_29_in_a_common_year() -> None:
    """In a common year Feb 29 is Mar 1 00:00: a period to it (a day as the end is inclusive)
    runs through Feb 28, one from it starts on Mar 1; one within it is absent that year."""
    cal = periods(
        """
        [[deny]]
        name = "to"
        from = "02-20"
        to = "02-29"
        yearly = true
        [[deny]]
        name = "from"
        from = "02-29T12:00"
        to = "03-03"
        yearly = true
        [[deny]]
        name = "within"
        from = "02-29T06:00"
        to = "02-29T18:00"
        yearly = true
        """
    )
    lo, hi = parse_time_ms("2027-01-01T00:00:00Z"), parse_time_ms("2029-01-01T00:00:00Z")
    found = [(format_time(a), format_time(b), w) for a, b, w in cal.denied("n1", {}, lo, hi)]
    assert found == [
        ("2027-02-20T00:00:00Z", "2027-03-01T00:00:00Z", "calendar 'to' (cal.toml)"),
        ("2027-03-01T00:00:00Z", "2027-03-04T00:00:00Z", "calendar 'from' (cal.toml)"),
        ("2028-02-20T00:00:00Z", "2028-03-01T00:00:00Z", "calendar 'to' (cal.toml)"),
        ("2028-02-29T06:00:00Z", "2028-02-29T18:00:00Z", "calendar 'within' (cal.toml)"),
        ("2028-02-29T12:00:00Z", "2028-03-04T00:00:00Z", "calendar 'from' (cal.toml)"),
    ]


def test_edges_in_a_daylight_saving_change_never_shrink_a_period() -> None:
    """A local time the clocks skip (spring) or pass twice (autumn) has two readings: a
    start takes the earlier, an end the later."""
    cal = periods(
        """
        timezone = "Europe/Paris"
        [[deny]]
        name = "spring"
        from = "03-29T02:30"
        to = "03-29T03:30"
        yearly = true
        [[deny]]
        name = "autumn"
        from = "10-25T02:30"
        to = "10-25T02:45"
        yearly = true
        [[deny]]
        name = "skipped"
        from = "2026-03-29T02:15"
        to = "2026-03-29T02:45"
        """
    )
    lo, hi = parse_time_ms("2026-01-01T00:00:00Z"), parse_time_ms("2027-01-01T00:00:00Z")
    found = {w: (format_time(a), format_time(b)) for a, b, w in cal.denied("n1", {}, lo, hi)}
    assert found == {
        # 02:30 does not exist: 00:30Z (02:30 read as CEST) .. 03:30 CEST
        "calendar 'spring' (cal.toml)": ("2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"),
        # 02:30 happens twice: the first (CEST, 00:30Z) .. the second 02:45 (CET, 01:45Z)
        "calendar 'autumn' (cal.toml)": ("2026-10-25T00:30:00Z", "2026-10-25T01:45:00Z"),
        "calendar 'skipped' (cal.toml)": ("2026-03-29T00:15:00Z", "2026-03-29T01:45:00Z"),
    }


@pytest.mark.parametrize(
    "body,error",
    [
        ('date = "2026-02-30"', "deny[1] ('bad').date: '2026-02-30': day is out of range"),
        ('from = "2026-12-10"\nto = "2026-12-09"', "deny[1] ('bad').to: the period must end"),
        ('from = "2026-12-10"', "deny[1] ('bad'): needs `date`, or `from` and `to`"),
        ('date = "12-25"', "deny[1] ('bad').date: '12-25' is not YYYY-MM-DD"),
        ('date = "2026-12-25"\nyearly = true', "is not MM-DD or MM-DDTHH:MM (yearly)"),
        ('date = "2026-12-25"\ntimezone = "Mars/Olympus"', "timezone: unknown time zone"),
        ('date = "2026-12-25"\nwhen = "always"', "unknown field `when` - at `$.deny[1]`"),
        ("date = 2026-12-25T10:00:00Z", "'2026-12-25T10:00:00+00:00' is not YYYY-MM-DD"),
    ],
)
def test_a_bad_period_names_the_file_its_line_and_the_field(
    tmp_path: Path, body: str, error: str
) -> None:
    cal = tmp_path / "holidays.toml"
    cal.write_text(f'[[deny]]\nname = "ok"\ndate = 2026-12-24\n\n[[deny]]\nname = "bad"\n{body}\n')
    (tmp_path / "cmsod.toml").write_text(f'[calendars]\nfiles = ["{cal}"]\n')
    cfg = config.load(tmp_path / "cmsod.toml", env={})
    with pytest.raises(ConfigError) as caught:
        config.load_calendars(cfg)
    assert str(caught.value).startswith(f"calendar {cal} (line 5): ")
    assert error in str(caught.value)


def test_inline_periods_are_checked_with_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "cmsod.toml"
    path.write_text(
        '[calendars]\ntimezone = "Europe/Paris"\n\n[[calendars.deny]]\nname = "x"\n'
        'from = "2026-12-24"\nto = "2026-12-20"\n'
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})
    assert f"{path} (line 4): deny[0] ('x').to: the period must end after it starts" in str(
        caught.value
    )
    path.write_text('[calendars]\n[[calendars.deny]]\nname = "x"\ndate = 2026-12-24\n')
    cal = config.load_calendars(config.load(path, env={}))
    assert [p.what for p in cal.periods] == ["calendar 'x' (cmsod.toml)"]


def test_the_planner_never_plans_into_a_period() -> None:
    start = parse_time_ms(at("08:01"))
    cal = periods(
        """
        [[deny]]
        name = "maintenance"
        from = "2026-12-01T08:30"
        to = "2026-12-01T10:30"
        [[deny]]
        name = "PAR1"
        from = "2026-12-01T12:00"
        to = "2026-12-01T13:00"
        scope = { site = "PAR1" }
        """
    )
    problem = Problem(
        key=1,
        schedule_id="s",
        duration_ms=3600_000,
        concurrency=1,
        policy_id=None,
        not_before_ms=start,
        groups=[ProblemGroup("g", [(start, start + 86400_000)], ["n1", "n2", "n3"])],
        element_data={"n2": {"site": "PAR1"}},
    )
    plan = Planning({}, {}, Options(), cal).plan(problem)
    assert {n: format_time(t) for n, t in plan.placed.items()} == {
        "n1": at("11:01"),  # 08:01, 09:01 and 10:01 overlap the maintenance
        "n3": at("12:01"),
        "n2": at("13:01"),  # not 12:01: PAR1's period
    }


def test_an_element_cut_off_by_a_period_is_told_why() -> None:
    start = parse_time_ms(at("08:01"))
    cal = periods('[[deny]]\nname = "all day"\ndate = "2026-12-01"\n')
    problem = Problem(
        key=1,
        schedule_id="s",
        duration_ms=3600_000,
        concurrency=1,
        policy_id=None,
        not_before_ms=start,
        groups=[ProblemGroup("g", [(start, start + 4 * 3600_000)], ["n1"])],
    )
    plan = Planning({}, {}, Options(), cal).plan(problem)
    reason, message = plan.unplaced["n1"]
    assert reason == "AvailabilityConstraint"
    assert "calendar 'all day' (cal.toml)" in message


def test_the_calendar_gate_holds_past_the_period() -> None:
    cal = periods('[[deny]]\nname = "short"\nfrom = "2026-12-01T10:00"\nto = "2026-12-01T10:03"\n')
    gate = gates.CalendarGate(cal, {"n2": {"site": "PAR1"}})
    snap = gates.Snapshot(
        now_ms=parse_time_ms(at("10:01")),
        schedule_id="s",
        name="n1",
        status=E.SCHEDULED,
        start_ms=parse_time_ms(at("10:01")),
        created_ms=0,
        duration_ms=3600_000,
    )
    assert gate(snap) == gates.Hold(
        parse_time_ms("2026-12-01T10:03:00Z"),
        "calendar 'short' (cal.toml) until 2026-12-01T10:03:00Z",
    )
    later = msgspec.structs.replace(snap, now_ms=parse_time_ms(at("10:03")))
    assert gate(later) == gates.GO
    assert gates.CalendarGate()(snap) == gates.GO


# -- the daemon -----------------------------------------------------------------------------


async def daemon_from_file(nursery: trio.Nursery, path: Path) -> Daemon:
    """A daemon on a configuration file, as `cmsod --config FILE` runs, with `reload` reading
    the file again; on the `backend` fixture's PostgreSQL when it is set."""
    cfg = config.load(path, env={k: v for k, v in os.environ.items() if k == "CMSOD_STORE__URL"})
    ctx = daemon.build_context(cfg, TrioWallClock(EPOCH.timestamp()), InlineExecutor())
    ctx.reload = daemon.make_reload(ctx, path, None)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await daemon.run(ctx, task_status=task_status)

    socket = await nursery.start(run)
    return Daemon(ctx, socket, scope)


def write_config(tmp_path: Path, so: FakeSO, calendar: Path, **extra: str) -> Path:
    path = tmp_path / "cmsod.toml"
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        f'[so]\nmode = "http"\nurl = "{so.url}"\nread_timeout_s = 5\n'
        "[dispatcher]\nlead_time_s = 0\n[poller]\ninterval_s = 30\n"
        "[control]\nidle_timeout_s = 60\n"
        f'[calendars]\nfiles = ["{calendar}"]\n{more}'
    )
    return path


async def test_a_period_added_by_a_reload_after_approval_holds_and_carries_over(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    await nursery.start(so.serve)
    calendar = tmp_path / "freeze.toml"
    calendar.write_text("")  # no period yet
    cmsod = await daemon_from_file(nursery, write_config(tmp_path, so, calendar))
    client = await cmsod.connect()
    body = request("cal", now=EPOCH, nodes=["n1", "n2", "n3"], concurrency=1)
    body["schedulingInfo"]["elements"] = [
        {"elementId": "n2", "elementData": [{"name": "region", "value": "eu"}]}
    ]
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    view = await client.wait_for("cal", S.PENDING_APPROVAL)
    assert [e["startTime"] for e in items(view).values()] == [at("08:01"), at("09:01"), at("10:01")]
    await client.ok("io.cmsod.Schedules.Approve", scheduleId="cal", approval=approval())
    calendar.write_text(
        """
        [[deny]]
        name = "eu maintenance"
        from = "2026-12-01T08:30"
        to = "2026-12-01T09:30"
        scope = { region = "eu" }
        reason = "core router upgrade"

        [[deny]]
        name = "short"
        from = "2026-12-01T10:00"
        to = "2026-12-01T10:03"
        scope = { vnfName = "n3" }

        [[deny]]
        name = "n2 later"
        from = "2026-12-01T11:00"
        to = "2026-12-01T11:30"
        scope = { vnfName = "n2" }
        """
    )
    reloaded = await client.ok("io.cmsod.Manager.Reload")
    assert reloaded["reloaded"] is True
    status = await client.ok("io.cmsod.Manager.Status")
    assert [(c["name"], c["from"], c["inForce"]) for c in status["calendars"]] == [
        ("eu maintenance", at("08:30"), False),
        ("short", at("10:00"), False),
        ("n2 later", at("11:00"), False),
    ]
    # `why` asks the calendar gate now, before n2 is due: it would be held
    why = await client.ok("io.cmsod.Schedules.Why", element="n2", scheduleId="cal")
    (held,) = [r for r in why["reasons"] if r["kind"] == "calendar"]
    assert held == {
        "kind": "calendar",
        "words": "held by calendar: calendar 'eu maintenance' (freeze.toml) until"
        " 2026-12-01T09:30:00Z",
        "until": at("09:30"),
    }
    why = await client.ok("io.cmsod.Schedules.Why", element="n1", scheduleId="cal")
    assert not [r for r in why["reasons"] if r["kind"] == "calendar"]
    view = await client.wait_for("cal", *DONE)
    element = items(view)
    assert element["n1"]["dispatchTime"] == at("08:01")  # not in the eu region
    # n2 (eu) at 09:01 would overlap the period: held past it, so past its slot's grace,
    # carried over to the next free slot clear of its periods (10:01 is n3's, 11:01 would
    # overlap "n2 later")
    assert element["n2"]["dispatchTime"] == at("12:01")
    assert view["planFingerprint"] == fingerprint_of(view)
    carried = (
        "carried over to 2026-12-01T12:01:00Z: held by calendar: calendar 'eu maintenance'"
        " (freeze.toml) until 2026-12-01T09:30:00Z"
    )
    assert carried in [
        e.get("status-message") for e in edits(tmp_path) if e.get("vnf-name") == "n2"
    ]
    assert element["n2"]["statusMessage"] == "complete"  # the orchestrator's, once done
    # n3 at 10:01 is inside "short": held until 10:03 (within the grace), then sent
    assert element["n3"]["dispatchTime"] == at("10:03")
    held = [e for e in edits(tmp_path) if e.get("hold-gate") == "calendar"]
    assert held == [
        {
            "vnf-name": "n3",
            "status": "Scheduled",
            "hold-gate": "calendar",
            "hold-why": "held by calendar: calendar 'short' (freeze.toml) until "
            "2026-12-01T10:03:00Z",
            "hold-until-time": "2026-12-01T10:03:00Z",
        }
    ]
    assert sorted(vnf for _, vnf in so.started) == ["n1", "n2", "n3"]
    await client.aclose()


async def test_a_period_removed_by_a_reload_releases_its_holds_at_once(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    await nursery.start(so.serve)
    calendar = tmp_path / "freeze.toml"
    calendar.write_text("")
    cmsod = await daemon_from_file(nursery, write_config(tmp_path, so, calendar))
    client = await cmsod.connect()
    body = request("rm", now=EPOCH, nodes=["n1"])
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    await client.wait_for("rm", S.PENDING_APPROVAL)
    await client.ok("io.cmsod.Schedules.Approve", scheduleId="rm", approval=approval())
    calendar.write_text(
        '[[deny]]\nname = "p"\nfrom = "2026-12-01T08:00"\nto = "2026-12-01T08:05"\n'
    )
    reloaded = await client.ok("io.cmsod.Manager.Reload")
    assert reloaded["changed"] == ["calendars"]  # only a calendar file changed
    client = await sleep_until(cmsod, client, "08:02")
    held = [e for e in edits(tmp_path) if e.get("hold-gate") == "calendar"]
    assert [e["hold-until-time"] for e in held] == [at("08:05")]  # held at 08:01
    assert so.started == []
    calendar.write_text("")  # the period is gone: n1 goes now, not at the old period's end
    reloaded = await client.ok("io.cmsod.Manager.Reload")
    assert reloaded["changed"] == ["calendars"]
    view = await client.wait_for("rm", *DONE)
    assert items(view)["n1"]["dispatchTime"] == at("08:02")
    await client.aclose()


async def test_a_bad_calendar_on_reload_keeps_the_old_one(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    so = FakeSO()
    await nursery.start(so.serve)
    calendar = tmp_path / "freeze.toml"
    calendar.write_text('[[deny]]\nname = "x"\ndate = "2026-12-24"\n')
    cmsod = await daemon_from_file(nursery, write_config(tmp_path, so, calendar))
    client = await cmsod.connect()
    calendar.write_text('[[deny]]\nname = "x"\ndate = "2026-12-32"\n')
    error = await client.call("io.cmsod.Manager.Reload")
    assert f"calendar {calendar} (line 1): deny[0] ('x').date" in str(error)
    assert [p.name for p in cmsod.ctx.planning.calendars.periods] == ["x"]
    assert calendars.Calendars() == calendars.Calendars(())
    await client.aclose()


def test_the_readme_examples_work(tmp_path: Path) -> None:
    """The TOML of README's "Freeze calendars" and "Alarm gate": the configuration blocks
    load, the calendar file's periods compile (and the shipped example file's)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Freeze calendars", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```toml\n")[1:]]
    assert len(blocks) == 3
    shipped = Path(__file__).parent.parent / "etc" / "cmsod" / "calendars" / "holidays.toml"
    (tmp_path / "a.toml").write_text(
        blocks[0].replace("/etc/cmsod/calendars/holidays.toml", str(shipped))
    )
    cal = config.load_calendars(config.load(tmp_path / "a.toml", env={}))
    assert [p.name for p in cal.periods][-1] == "Core network upgrade"
    assert len(cal.periods) == 5
    assert [p.name for p in periods(blocks[1]).periods] == [
        "Christmas",
        "New Year",
        "PAR1 power works",
    ]
    (tmp_path / "b.toml").write_text(blocks[2])
    alarms_cfg = config.load(tmp_path / "b.toml", env={}).alarms
    assert alarms_cfg.queries[1] == ('site="{site}"', 'severity=~"critical|major"')


async def test_approve_replan_places_passed_slots_clear_of_the_calendars(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`approve --replan` re-places passed slots by the carry-over's rules, calendars included:
    a period in force over the first free slots pushes the element past it."""
    so = FakeSO()
    await nursery.start(so.serve)
    calendar = tmp_path / "freeze.toml"
    calendar.write_text("")
    path = write_config(tmp_path, so, calendar)
    path.write_text(path.read_text() + "[optimizer]\napproval_timeout_s = 86400\n")
    cmsod = await daemon_from_file(nursery, path)
    client = await cmsod.connect()
    body = request("rp", now=EPOCH, nodes=["n1", "n2", "n3"], concurrency=1)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    view = await client.wait_for("rp", S.PENDING_APPROVAL)
    assert [e["startTime"] for e in items(view).values()] == [at("08:01"), at("09:01"), at("10:01")]
    calendar.write_text(
        '[[deny]]\nname = "n1 works"\nfrom = "2026-12-01T10:30"\nto = "2026-12-01T12:30"\n'
        'scope = { vnfName = "n1" }\n'
    )
    assert (await client.ok("io.cmsod.Manager.Reload"))["reloaded"] is True
    await client.aclose()
    await trio.sleep((parse_time_ms(at("09:30")) - cmsod.ctx.clock.now_ms()) / 1000)
    client = await cmsod.connect()
    done = await client.ok(
        "io.cmsod.Schedules.Approve",
        scheduleId="rp",
        approval=approval(),
        plan=view["planFingerprint"],
        replan=True,
    )
    moved = {c["vnfName"]: c["startTime"] for c in done["replanned"]["changes"]}
    # n2 takes the first free slot (11:01); n1's 11:01 and 12:01 runs overlap its period
    assert moved == {"n1": at("13:01"), "n2": at("11:01")}
