"""The pure core, tested directly: state tables, delete and verdict rules, SO answers, time
formats, and the loop-back placement (hypothesis property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmsod import lifecycle
from cmsod.errors import RequestError, TransitionError
from cmsod.model import ELEMENT_FINAL, ELEMENT_NOT_PART, SCHEDULE_FINAL
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.problem import merge


def test_status_texts_are_cmsos() -> None:
    assert [s.value for s in S] == [
        "Pending Schedule",
        "Optimization In Progress",
        "Optimization Failed",
        "Schedule Failed",
        "Pending Approval",
        "Accepted",
        "Rejected",
        "Scheduled",
        "Notifications Initiated",
        "Completed",
        "Completed with error(s)",
        "Cancelled",
        "Deleted",
        "Paused",  # cmsod's own: a rollout stopped by an operator or its failure threshold
        "Halted",
        "Expired",  # cmsod's own: left pending approval past its timeout
    ]
    assert E.EXPIRED.value == "Expired"
    assert E.NOT_SCHEDULED.value == "Not scheduled by optimizer"
    assert E.PAST_DUE.value == "Past due"


def reachable(table: dict) -> set:
    seen, todo = set(), [None]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_status_is_reachable_and_final_ones_only_lead_to_deletion() -> None:
    assert reachable(lifecycle.SCHEDULE_TRANSITIONS) == set(S)
    assert reachable(lifecycle.ELEMENT_TRANSITIONS) == set(E)
    for status in SCHEDULE_FINAL:
        assert lifecycle.SCHEDULE_TRANSITIONS[status] <= {S.DELETED}
    for status in ELEMENT_FINAL - ELEMENT_NOT_PART:
        assert lifecycle.ELEMENT_TRANSITIONS[status] <= {E.DELETED}


def test_illegal_transitions_raise() -> None:
    with pytest.raises(TransitionError):
        lifecycle.check_schedule(S.COMPLETED, S.SCHEDULED)
    with pytest.raises(TransitionError):
        lifecycle.check_element(E.NOT_SCHEDULED, E.SCHEDULED)  # bug 5: never dispatched
    lifecycle.check_schedule(S.SCHEDULED, S.NOTIFICATIONS_INITIATED)


def test_delete_plan() -> None:
    assert lifecycle.delete_plan(S.SCHEDULED, [E.SCHEDULED]) == (
        S.CANCELLED,
        {E.SCHEDULED: E.CANCELLED},
    )
    assert lifecycle.delete_plan(S.PENDING_APPROVAL, [E.PENDING_APPROVAL, E.NOT_SCHEDULED]) == (
        S.DELETED,
        {E.PENDING_APPROVAL: E.DELETED, E.NOT_SCHEDULED: E.DELETED},
    )
    assert lifecycle.delete_plan(S.COMPLETED, [E.COMPLETED, E.FAILED]) == (S.DELETED, {})
    with pytest.raises(RequestError) as info:
        lifecycle.delete_plan(S.NOTIFICATIONS_INITIATED, [E.TRIGGERED])
    assert info.value.status == 406
    for status in set(S) - {S.DELETED, S.CANCELLED}:  # (the store answers those as they are)
        try:  # a refusal CMSO's way, or a transition the table allows: never an internal error
            new, _ = lifecycle.delete_plan(status, [E.SCHEDULED])
        except RequestError as exc:
            assert exc.status == 406, status
        else:
            lifecycle.check_schedule(status, new)


@given(st.lists(st.sampled_from(list(E)), min_size=1, max_size=20))
def test_verdict_only_when_nothing_is_left_to_run(elements: list[E]) -> None:
    verdict = lifecycle.completion_verdict(elements)
    if any(e not in ELEMENT_FINAL for e in elements):
        assert verdict is None
    elif all(e in ELEMENT_NOT_PART | {E.COMPLETED} for e in elements) and E.COMPLETED in elements:
        assert verdict == S.COMPLETED
    else:
        assert verdict == S.COMPLETED_WITH_ERRORS


def test_one_failed_group_spoils_the_whole_schedule() -> None:  # bug 14
    assert (
        lifecycle.completion_verdict([E.COMPLETED, E.COMPLETED, E.FAILED])
        == S.COMPLETED_WITH_ERRORS
    )


@pytest.mark.parametrize(
    "http,state,status",
    [
        (200, "COMPLETE", E.COMPLETED),
        (200, "COMPLETED", E.COMPLETED),
        (200, "FAILED", E.FAILED),
        (200, "ABORTED", E.FAILED),
        (200, "TIMEOUT", E.FAILED),
        (200, "ROLLED_BACK_TO_ASSIGNED", E.FAILED),
        (200, "UNLOCKED", E.FAILED),
        (200, "IN_PROGRESS", None),
        (200, None, E.ERROR),
        (404, None, E.FAILED),
        (400, None, E.ERROR),
        (500, None, E.ERROR),
    ],
)
def test_so_answers(http: int, state: str | None, status: E | None) -> None:
    assert lifecycle.poll_outcome(http, state, None, None).status == status


def test_so_finish_time_is_read() -> None:
    outcome = lifecycle.poll_outcome(200, "COMPLETE", "Done.", "Fri, 05 Apr 2019 12:30:00 GMT")
    assert lifecycle.format_time(outcome.completed_ms) == "2019-04-05T12:30:00Z"
    assert lifecycle.poll_outcome(200, "COMPLETE", None, "garbage").completed_ms is None


def test_times() -> None:
    assert lifecycle.parse_time_ms("2019-04-05T12:00:00Z") == 1554465600000
    assert lifecycle.parse_time_ms("2019-04-05T08:00:00-04:00") == 1554465600000
    assert lifecycle.parse_time_ms("2019-04-05T12:00:00") == 1554465600000  # no offset: UTC
    assert lifecycle.format_time(1554465600999) == "2019-04-05T12:00:00Z"
    for bad in ["", "2019-13-01T00:00:00Z", "tomorrow", "x" * 100]:
        with pytest.raises(ValueError):
            lifecycle.parse_time_ms(bad)


def test_merge_windows() -> None:
    assert merge([(5, 9), (0, 3), (3, 4), (8, 12)]) == [(0, 4), (5, 12)]
