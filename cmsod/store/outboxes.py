"""The outboxes: CM events for the emitter, ticket operations for the tickets actor. Rows are
written by the transaction whose change causes them (`Tx.finish`); these read and mark them."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import msgspec

from cmsod import ticketing
from cmsod.store import backend
from cmsod.store.store import Tx
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
    """Where a reader of the stored events stands: every event up to `top` was read, except
    the `gaps`. Live watchers read the log, not the outbox: on PostgreSQL another daemon may
    publish an event (and mark it sent) before this one ever looks at the outbox.

    Seqs are handed out as events are inserted, and write transactions need not commit in
    that order (PostgreSQL): an event may be seen before one of a lower seq, which is then a
    gap, looked for again at every read. A gap that never comes was rolled back; that is
    known once no transaction that could hold it is running any more: the snapshot's xmin has
    reached the xmax of the snapshot that found the gap (the transaction had its xid then: a
    transaction updates its schedule's row before it inserts its events, Tx.finish). The
    events of one schedule commit in their seq order (that row's lock), so handing out what
    each read finds in seq order keeps every schedule's order. SQLite (one writer, commits in
    seq order) has no gaps."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.gaps: dict[int, int] = {}  # seq -> xid all running transactions must reach

    def advance(self, found: TailRead) -> list[tuple[int, str, bytes]]:
        """What a `read_tail` found that was not read before, in seq order; moves on."""
        fresh = []
        for row in found.rows:
            seq = row[0]
            if self.gaps.pop(seq, None) is not None:
                fresh.append(row)
            elif seq > self.top:
                if found.xmax is not None:
                    self.gaps.update(dict.fromkeys(range(self.top + 1, seq), found.xmax))
                self.top = seq
                fresh.append(row)
        if found.xmin is not None:  # gaps whose every possible writer has ended
            self.gaps = {seq: xid for seq, xid in self.gaps.items() if xid > found.xmin}
        return fresh


class TailRead(NamedTuple):
    rows: list[tuple[int, str, bytes]]  # (seq, schedule id, body) in seq order
    complete: bool  # every event after `top` there is (not cut by the limit)
    xmin: int | None  # PostgreSQL: the snapshot's oldest running xid and next xid (Tail)
    xmax: int | None


def read_tail(conn: Any, top: int, gaps: list[int], limit: int) -> TailRead:
    """The events of `gaps` that are there now, then up to `limit` after `top`, in seq order,
    from one snapshot. (Two queries: `seq > ? OR seq IN (...)` would scan the whole log.)"""
    columns = "SELECT seq, schedule_id, body FROM events"
    rows = (
        conn.execute(
            f"{columns} WHERE seq IN (SELECT CAST(value AS BIGINT) FROM json_each(?)) ORDER BY seq",
            (json.dumps(gaps),),
        ).fetchall()
        if gaps
        else []
    )
    after = conn.execute(f"{columns} WHERE seq > ? ORDER BY seq LIMIT ?", (top, limit)).fetchall()
    if not isinstance(conn, backend.PgConnection):
        return TailRead(rows + after, len(after) < limit, None, None)
    xmin, xmax = conn.execute(  # of the snapshot the rows were read in (REPEATABLE READ)
        "SELECT CAST(CAST(pg_snapshot_xmin(s) AS TEXT) AS BIGINT),"
        " CAST(CAST(pg_snapshot_xmax(s) AS TEXT) AS BIGINT) FROM pg_current_snapshot() AS s"
    ).fetchone()
    return TailRead(rows + after, len(after) < limit, xmin, xmax)


def refuse_event(tx: Tx, seq: int, reason: str) -> None:
    tx.execute("UPDATE events SET refused = ? WHERE seq = ?", (reason[:1000], seq))


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


def record_ticket_ops(
    tx: Tx, sent: list[TicketOp], failed: list[tuple[TicketOp, str, int]]
) -> None:
    """TM took these operations (our record of the ticket follows) or refused these (each
    with why and when to try again)."""
    if tx.owner is not None and not holds_lease(tx, "tickets"):
        tx.note("tickets.not_ours", count=len(sent) + len(failed))  # another daemon sends now
        return
    for op in sent:
        tx.execute(
            "UPDATE ticket_ops SET sent_ms = ?, attempts = attempts + 1 WHERE id = ?",
            (tx.now_ms, op.id),
        )
        if op.op is ticketing.Op.RESCHEDULE:
            continue  # the planned dates were recorded when the element was carried over
        status = ticketing.WORK_IN_PROGRESS if op.op is ticketing.Op.UPDATE else ticketing.CLOSED
        tx.execute(
            "UPDATE change_tickets SET status = ?, updated_ms = ? WHERE change_id = ?",
            (status, tx.now_ms, op.change_id),
        )
        if status == ticketing.CLOSED:  # CMSO: the elements' tmStatus once closed
            tx.execute(
                "UPDATE elements SET tm_status = ? WHERE tm_change_id = ?",
                (ticketing.CLOSED, op.change_id),
            )
    for op, error, due_ms in failed:
        tx.execute(
            "UPDATE ticket_ops SET attempts = attempts + 1, last_error = ?, due_ms = ?"
            " WHERE id = ?",
            (error[:2000], due_ms, op.id),
        )
