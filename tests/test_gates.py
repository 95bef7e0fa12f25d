"""The dispatch decision, pure: each gate's answer, their order, and the ticket moves."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cmsod import gates, ticketing
from cmsod.gates import GO, End, Hold, Snapshot
from cmsod.model import ElementStatus as E

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
    assert [name for name, _ in answers] == ["ticket", "immediate", "misfire"]
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
