"""The outboxes: CM events for the emitter, ticket operations for the tickets actor. Rows are
written by the transaction whose change causes them (`Tx.finish`); these read and mark them."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from cmsod import ticketing
from cmsod.store.store import Tx, shared_lock
from cmsod.ticketing import Opened


def holds_lease(tx: Tx, name: str) -> bool:
    """Fencing for work done under a named lease (fleet.py): still ours, in this transaction?"""
    row = tx.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
    return row is not None and row[0] == tx.owner


def abandon_tickets(tx: Tx, opened: Opened, user_id: str) -> None:
    """Tickets TM opened for a request that then could not be stored (it changed meanwhile):
    cancel them, through the outbox like any other ticket operation."""
    for change_id, _ in opened:
        body = ticketing.close_body(change_id, user_id, ticketing.Closure.CANCELLED, None, None, 0)
        tx.queue_ticket_op(change_id, ticketing.Op.CANCEL, body)


# -- event outbox ---------------------------------------------------------------------------


def pending_events(conn: Any, limit: int) -> list[tuple[int, str, str, bytes]]:
    return conn.execute(
        "SELECT seq, schedule_id, topic, body FROM events"
        " WHERE sent_ms IS NULL AND refused IS NULL ORDER BY seq LIMIT ?",
        (limit,),
    ).fetchall()


def last_event_seq(conn: Any) -> int:
    return conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]


# -- the event log, tailed (`cmsoctl watch`) -----------------------------------------------


class Tail:
    """Where a reader of the stored events stands: every event up to `top` was read. Live
    watchers read the log, not the outbox: on PostgreSQL another daemon may publish an event
    (and mark it sent) before this one ever looks at the outbox.

    Events are stored in commit order (`Tx.finish` inserts them under EVENTS_LOCK, held to the
    commit, on PostgreSQL; SQLite has one writer): once an event is seen, every event of a
    lower seq is either seen too or was rolled back, and reading on from the highest seq seen
    misses none and reads none twice."""

    def __init__(self, top: int) -> None:
        self.top = top


def read_tail(conn: Any, top: int, limit: int) -> list[tuple[int, str, bytes]]:
    """Up to `limit` events after `top`: (seq, schedule id, body) in seq order."""
    return conn.execute(
        "SELECT seq, schedule_id, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
        (top, limit),
    ).fetchall()


@shared_lock  # the events rows only: beside other daemons' writes
def refuse_event(tx: Tx, seq: int, reason: str) -> None:
    tx.execute("UPDATE events SET refused = ? WHERE seq = ?", (reason[:1000], seq))


@shared_lock
def mark_events_sent(tx: Tx, seqs: list[int]) -> None:
    if tx.owner is not None and not holds_lease(tx, "events"):
        tx.note("events.not_ours", count=len(seqs))  # another daemon publishes now
        return
    tx.conn.executemany(
        "UPDATE events SET sent_ms = ? WHERE seq = ?", [(tx.now_ms, seq) for seq in seqs]
    )


# -- ticket outbox --------------------------------------------------------------------------


class TicketOp(msgspec.Struct):
    id: int
    change_id: str
    op: ticketing.Op
    body: bytes
    attempts: int


_TICKET_HEAD = (
    " o.sent_ms IS NULL AND NOT EXISTS (SELECT 1 FROM ticket_ops p"
    " WHERE p.change_id = o.change_id AND p.sent_ms IS NULL AND p.id < o.id)"
)


def due_ticket_ops(conn: Any, now_ms: int, limit: int) -> list[TicketOp]:
    """The first unsent operation of each ticket, if due: a ticket's operations go in order,
    and one TM keeps refusing holds back only that ticket's."""
    return [
        TicketOp(id, change_id, ticketing.Op(op), body, attempts)
        for id, change_id, op, body, attempts in conn.execute(
            "SELECT o.id, o.change_id, o.op, o.body, o.attempts FROM ticket_ops o"
            f" WHERE o.due_ms <= ? AND{_TICKET_HEAD} ORDER BY o.id LIMIT ?",
            (now_ms, limit),
        )
    ]


def next_ticket_op_ms(conn: Any) -> int | None:
    return conn.execute(f"SELECT min(o.due_ms) FROM ticket_ops o WHERE{_TICKET_HEAD}").fetchone()[0]


@shared_lock
def record_ticket_ops(
    tx: Tx, sent: list[TicketOp], failed: list[tuple[TicketOp, str, int]]
) -> None:
    """TM took these operations (our record of the ticket follows) or refused these (each
    with why and when to try again). Their tickets' schedules are locked first (`shared_lock`):
    a ticket and its elements are its schedule's."""
    tx.lock_schedules(
        "SELECT schedule FROM change_tickets WHERE change_id IN (SELECT value FROM json_each(?))",
        (json.dumps([op.change_id for op in sent] + [op.change_id for op, _, _ in failed]),),
    )
    if tx.owner is not None and not holds_lease(tx, "tickets"):
        tx.note("tickets.not_ours", count=len(sent) + len(failed))  # another daemon sends now
        return
    # Deferred, each statement's run sent as one executemany (one round trip on PostgreSQL).
    for op in sent:
        tx.defer(
            "UPDATE ticket_ops SET sent_ms = ?, attempts = attempts + 1 WHERE id = ?",
            (tx.now_ms, op.id),
        )
    # (the planned dates of a RESCHEDULE were recorded when the element was carried over)
    moved = [op for op in sent if op.op is not ticketing.Op.RESCHEDULE]
    for op in moved:
        status = ticketing.WORK_IN_PROGRESS if op.op is ticketing.Op.UPDATE else ticketing.CLOSED
        tx.defer(
            "UPDATE change_tickets SET status = ?, updated_ms = ? WHERE change_id = ?",
            (status, tx.now_ms, op.change_id),
        )
    for op in moved:
        if op.op is not ticketing.Op.UPDATE:  # CMSO: the elements' tmStatus once closed
            tx.defer(
                "UPDATE elements SET tm_status = ? WHERE tm_change_id = ?",
                (ticketing.CLOSED, op.change_id),
            )
    for op, error, due_ms in failed:
        tx.defer(
            "UPDATE ticket_ops SET attempts = attempts + 1, last_error = ?, due_ms = ?"
            " WHERE id = ?",
            (error[:2000], due_ms, op.id),
        )
