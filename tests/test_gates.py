"""The dispatch decision, pure: each gate's answer, their order, and the ticket moves."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cmsod import gates, ticketing
from cmsod.gates import GO, End, Hold, Snapshot
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S

START = 1_000_000
GRACE = 60_000


def snap(now_ms: int = START, **fields: object) -> Snapshot:
    base: dict[str, object] = {
        "now_ms": now_ms,
        "schedule_id": "s1",
        "name": "vnf1",
        "status": E.SCHEDULED,
        "start_ms": START,
        "created_ms": 0,
        "change_id": "CHG1",
        "ticket_state": "Approved|Scheduled",
    }
    base.update(fields)
    return Snapshot(**base)  # type: ignore[arg-type]


def rules(ticket: gates.TicketGate | None = None, immediate: bool = True) -> list[gates.Gate]:
    return gates.standard(
        ticket or gates.TicketGate(ticketing.DEFAULT_DISPATCH_ALLOWED), GRACE, immediate
    )


def test_all_go_in_time() -> None:
    answers = gates.evaluate(snap(), rules())
    assert [name for name, _ in answers] == [
        "stop",
        "freeze",
        "failures",
        "calendar",
        "blackout",
        "alarm",
        "ticket",
        "immediate",
        "misfire",
    ]
    assert all(answer == GO for _, answer in answers)
    assert gates.decide(snap(), rules()) == ("", GO)


def test_ticket_not_approved_ends_scheduling_failed() -> None:
    name, answer = gates.decide(snap(ticket_state="Pending|Scheduled"), rules())
    assert name == "ticket"
    assert isinstance(answer, End) and answer.status is E.SCHEDULING_FAILED
    assert "CM_TICKET_NOT_APPROVED" in answer.why and "Pending|Scheduled" in answer.why


def test_ticket_system_silent_holds_within_grace_then_ends() -> None:
    ticket = gates.TicketGate(
        ticketing.DEFAULT_DISPATCH_ALLOWED, {}, {}, {"CHG1": "timed out"}, hold_ms=5000
    )
    name, answer = gates.decide(snap(START + 1000), rules(ticket))
    assert (name, answer) == ("ticket", Hold(START + 6000, answer.why))  # type: ignore[union-attr]
    assert "timed out" in answer.why  # type: ignore[union-attr]
    _, late = gates.decide(snap(START + GRACE + 1), rules(ticket))
    assert isinstance(late, End) and late.status is E.SCHEDULING_FAILED
    assert "within the misfire grace" in late.why


def test_remote_answer_wins_over_our_record() -> None:
    ticket = gates.TicketGate(ticketing.DEFAULT_DISPATCH_ALLOWED, {"CHG1": "Approved|Closed"})
    _, answer = gates.decide(snap(), rules(ticket))
    assert isinstance(answer, End) and "Approved|Closed" in answer.why


def test_loopback_and_ticketless_elements_pass_the_ticket_gate() -> None:
    assert gates.TicketGate(None)(snap(ticket_state="|")) == GO
    assert gates.TicketGate(("Approved|Scheduled",))(snap(change_id=None)) == GO


def test_immediate_disabled() -> None:
    s = snap(status=E.SCHEDULED_IMMEDIATE, start_ms=None)
    name, answer = gates.decide(s, rules(immediate=False))
    assert name == "immediate" and isinstance(answer, End)
    assert gates.decide(s, rules(immediate=True)) == ("", GO)


@given(late_ms=st.integers(0, 10 * GRACE))
def test_misfire_only_beyond_the_grace(late_ms: int) -> None:
    name, answer = gates.decide(snap(START + late_ms), rules())
    if late_ms <= GRACE:
        assert answer == GO
    else:
        assert name == "misfire" and isinstance(answer, End) and answer.status is E.PAST_DUE


def test_first_refusal_wins_but_why_sees_all() -> None:
    s = snap(START + GRACE + 1, ticket_state="Pending|Scheduled")
    name, _ = gates.decide(s, rules())
    assert name == "ticket"
    answers = dict(gates.evaluate(s, rules()))
    assert isinstance(answers["ticket"], End) and isinstance(answers["misfire"], End)


def test_ticket_moves() -> None:
    pending = [(E.SCHEDULED, None, None), (E.SCHEDULED, None, None)]
    assert ticketing.move("C", "u", pending, False, 5) is None
    started = [(E.TRIGGERED, 10, None), (E.SCHEDULED, None, None)]
    move = ticketing.move("C", "u", started, False, 5)
    assert move is not None and move.op is ticketing.Op.UPDATE and move.closure is None
    assert ticketing.move("C", "u", started, True, 5) is None  # already queued
    done = [(E.COMPLETED, 10, 50), (E.FAILED, 20, 40)]
    move = ticketing.move("C", "u", done, True, 60)
    assert move is not None and move.op is ticketing.Op.CLOSE
    assert move.closure is ticketing.Closure.UNSUCCESSFUL
    assert (move.first_dispatch_ms, move.last_completion_ms) == (10, 50)
    cancelled = [(E.CANCELLED, None, None)]
    move = ticketing.move("C", "u", cancelled, False, 60)
    assert move is not None and move.op is ticketing.Op.CANCEL


def test_a_stopped_schedule_holds_until_resumed() -> None:
    s = snap(schedule_status=S.PAUSED, stopped_by="ops (uid 1000)", stopped_why="odd alarms")
    name, answer = gates.decide(s, rules())
    assert name == "stop" and answer == Hold(None, "Paused by ops (uid 1000): odd alarms")
    halted = snap(schedule_status=S.HALTED, stopped_by="cmsod", stopped_why="too many")
    assert gates.decide(halted, rules())[1] == Hold(None, "Halted by cmsod: too many")


def test_freeze_holds_everything_until_its_end() -> None:
    frozen = gates.Freeze(0, "ops", "year-end", until_ms=START + 1000)
    name, answer = gates.decide(snap(freeze=frozen), rules())
    assert name == "freeze" and isinstance(answer, Hold) and answer.until_ms == START + 1000
    assert "year-end" in answer.why and "ops" in answer.why
    assert gates.decide(snap(START + 1000, freeze=frozen), rules()) == ("", GO)
    forever = gates.Freeze(0, "ops", "incident")
    assert gates.decide(snap(freeze=forever), rules())[1] == Hold(None, "freeze by ops: incident")


@given(
    failed=st.integers(0, 20),
    total=st.integers(1, 20),
    max_failures=st.none() | st.integers(0, 5),
    ratio=st.none() | st.floats(0, 1),
)
def test_failure_threshold(
    failed: int, total: int, max_failures: int | None, ratio: float | None
) -> None:
    s = snap(failures=gates.Failures(failed, total, max_failures, ratio))
    crossed = (max_failures is not None and failed > max_failures) or (
        ratio is not None and failed > ratio * total
    )
    name, answer = gates.decide(s, rules())
    if crossed:
        assert name == "failures" and isinstance(answer, Hold) and answer.until_ms is None
    else:
        assert answer == GO


def test_a_blackout_over_the_run_holds_past_its_end() -> None:
    hour = 3_600_000
    inside = ((START + hour // 2, START + 2 * hour, "blackout BO1"),)
    s = snap(duration_ms=hour, unavailable=inside)
    name, answer = gates.decide(s, rules())
    assert name == "blackout" and answer == Hold(START + 2 * hour, answer.why)  # type: ignore[union-attr]
    assert "blackout BO1" in answer.why  # type: ignore[union-attr]
    after = ((START + hour, START + 2 * hour, "blackout BO1"),)  # touching is no overlap
    assert gates.decide(snap(duration_ms=hour, unavailable=after), rules()) == ("", GO)


def test_next_free_slot() -> None:
    step = 10
    windows = [(0, 50), (100, 130)]
    assert gates.next_free_slot(windows, 0, step, 0, [], {}, 1) == 0
    assert gates.next_free_slot(windows, 0, step, 1, [], {}, 1) == 10  # slots on the grid
    assert gates.next_free_slot(windows, 0, step, 0, [(0, 25)], {}, 1) == 30  # past the span
    assert gates.next_free_slot(windows, 0, step, 0, [], {0: 2, 10: 1}, 2) == 10  # room left
    assert gates.next_free_slot(windows, 0, step, 45, [], {}, 1) == 100  # the next window
    assert gates.next_free_slot(windows, 0, step, 121, [], {}, 1) is None  # none left
    assert gates.next_free_slot(windows, 0, step, 0, [(0, 200)], {}, 1) is None


@given(
    not_before=st.integers(0, 300),
    blocked=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 60)), max_size=4),
    taken=st.dictionaries(st.integers(0, 30).map(lambda k: k * 10), st.integers(0, 3)),
)
def test_a_free_slot_is_free(
    not_before: int, blocked: list[tuple[int, int]], taken: dict[int, int]
) -> None:
    spans = [(a, a + n) for a, n in blocked]
    windows = [(0, 120), (150, 310)]
    slot = gates.next_free_slot(windows, 0, 10, not_before, spans, taken, 2)
    free = [
        k * 10
        for k in range(31)
        if any(a <= k * 10 and k * 10 + 10 <= b for a, b in windows)
        and k * 10 >= not_before
        and not any(a < k * 10 + 10 and b > k * 10 for a, b in spans)
        and taken.get(k * 10, 0) < 2
    ]
    assert slot == (free[0] if free else None)
