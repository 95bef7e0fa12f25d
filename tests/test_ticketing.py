"""The pure ticket rules: chunks, CMSO's template filling, closure, TM's already-closed answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cmsod import ticketing
from cmsod.model import ELEMENT_FINAL
from cmsod.model import ElementStatus as E
from cmsod.ticketing import Closure, TicketGroup
from cmsod.wire.tm import already_closed


@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5), per_ticket=st.integers(1, 7))
def test_every_element_is_in_exactly_one_ticket_of_its_group(
    sizes: list[int], per_ticket: int
) -> None:
    groups = [
        TicketGroup(f"g{g}", [f"g{g}-e{i}" for i in range(n)], 1000 * g, 2000 * g + 5000)
        for g, n in enumerate(sizes)
    ]
    tickets = ticketing.plan_tickets("u", groups, per_ticket, {}, {})
    assert sum(-(-n // per_ticket) for n in sizes) == len(tickets)
    covered = [v for t in tickets for v in t.vnfs]
    assert sorted(covered) == sorted(v for g in groups for v in g.vnfs)
    for t in tickets:
        assert 1 <= len(t.vnfs) <= per_ticket
        assert all(v.startswith(t.group_id + "-") for v in t.vnfs)
        assert t.body["VNF"] == t.vnfs[0]


def test_the_create_body_fills_cmsos_template_and_domain_data_overrides_it() -> None:
    group = TicketGroup("g", ["vnf-a", "vnf-b"], 1_764_576_000_999, 1_764_579_600_000)
    (ticket,) = ticketing.plan_tickets(
        "u" * 60,
        [group],
        2,
        {"reason": "quarterly ${dd.kind}"},
        {"WorkflowName": "Upgrade", "kind": "patching", "category": "Emergency"},
    )
    assert ticket.body == {
        "category": "Emergency",
        "type": "Maintenance",
        "VNF": "vnf-a",
        "summary": "",
        "description": "Execute workflow Upgrade for VNF(s)",
        "requesterId": "u" * 50,
        "plannedStartDate": 1_764_576_000,
        "plannedEndDate": 1_764_579_600,
        "reason": "quarterly patching",
        "assetList": "[vnf-a, vnf-b]",
    }
    assert ticketing.fill("${dd.unknown} stays", {}) == "${dd.unknown} stays"
    many = ticketing.plan_tickets(
        "u", [TicketGroup("g", [f"n{i:03d}" for i in range(60)], 0, 1)], 60, {}, {}
    )
    assert len(many[0].body["assetList"]) == ticketing.ASSET_LIST_MAX


def test_closure_waits_for_every_element_then_says_how() -> None:
    assert ticketing.closure([E.COMPLETED, E.TRIGGERED]) is None
    assert ticketing.closure([E.COMPLETED, E.SCHEDULED]) is None
    assert ticketing.closure([E.COMPLETED, E.COMPLETED]) is Closure.SUCCESSFUL
    assert ticketing.closure([E.COMPLETED, E.CANCELLED]) is Closure.SUCCESSFUL
    assert ticketing.closure([E.CANCELLED, E.CANCELLED]) is Closure.CANCELLED
    assert ticketing.closure([E.COMPLETED, E.FAILED]) is Closure.UNSUCCESSFUL
    assert ticketing.closure([E.SCHEDULING_FAILED]) is Closure.UNSUCCESSFUL
    for status in E:
        assert (ticketing.closure([status]) is None) == (status not in ELEMENT_FINAL)


def test_close_bodies_carry_cmsos_dates_and_cancel_none() -> None:
    ok = ticketing.close_body("C1", "u", Closure.SUCCESSFUL, 10_500, 70_900, 99_000)
    assert (ok["actualStartDate"], ok["actualEndDate"]) == (10, 70)
    failed = ticketing.close_body("C1", "u", Closure.UNSUCCESSFUL, None, None, 99_000)
    assert (failed["actualStartDate"], failed["actualEndDate"]) == (98, 99)  # now-1s, now
    cancel = ticketing.close_body("C1", "u", Closure.CANCELLED, None, None, 99_000)
    assert "actualStartDate" not in cancel and cancel["closureCode"] == "Cancelled"


def test_already_closed_is_cmsos_svc40006_only() -> None:
    closed = (
        b'{"serviceException": [{"messageId": "SVC40006", "text": "CHG1 is in Closed status"}]}'
    )
    assert already_closed(closed)
    assert not already_closed(b'{"serviceException": [{"messageId": "SVC40006", "text": "other"}]}')
    assert not already_closed(
        b'{"serviceException": [{"messageId": "SVC4003", "text": "is in Closed status"}]}'
    )
    assert not already_closed(b"not json")
    assert not already_closed(b'{"serviceException": "wrong shape"}')
