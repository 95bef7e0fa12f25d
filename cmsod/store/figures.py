"""What a metrics scrape reads from the store: figures that must be right after a restart,
so they are counted here at scrape time rather than kept in memory."""

from __future__ import annotations

import sqlite3


def schedules_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM schedules GROUP BY status").fetchall())


def outboxes(conn: sqlite3.Connection) -> dict[str, tuple[int, int | None]]:
    """Per outbox, (rows waiting, creation time of the oldest, None when empty): CM events not
    yet published (a refused one is not waiting) and ticket operations TM has not taken yet.
    Each is read through its partial index of unsent rows."""
    (events,) = conn.execute(
        "SELECT count(*) FROM events WHERE sent_ms IS NULL AND refused IS NULL"
    ).fetchone()
    oldest_event = conn.execute(
        "SELECT created_ms FROM events WHERE sent_ms IS NULL AND refused IS NULL"
        " ORDER BY seq LIMIT 1"
    ).fetchone()
    tickets, oldest_ticket = conn.execute(
        "SELECT count(*), min(created_ms) FROM ticket_ops WHERE sent_ms IS NULL"
    ).fetchone()
    return {
        "events": (events, oldest_event[0] if oldest_event else None),
        "tickets": (tickets, oldest_ticket),
    }


def holds(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, bool]]:
    """Elements held back from dispatch now, by the gate that holds each (as the dispatcher
    last recorded it), and the switch-like gates that are on (the global freeze)."""
    held = dict(
        conn.execute(
            "SELECT hold_gate, count(*) FROM elements WHERE hold_gate IS NOT NULL GROUP BY hold_gate"
        ).fetchall()
    )
    (frozen,) = conn.execute('SELECT active FROM "freeze" WHERE id = 1').fetchone() or (0,)
    return held, {"freeze": bool(frozen)}


def snapshot(
    conn: sqlite3.Connection,
) -> tuple[
    dict[str, int], dict[str, tuple[int, int | None]], tuple[dict[str, int], dict[str, bool]]
]:
    """All of them, from one consistent read."""
    return schedules_by_status(conn), outboxes(conn), holds(conn)
