"""Several daemons on one database: who is alive, who holds what, and taking over the work of
one that died or stalled.

Each daemon has a row in `daemons` (id, host, pid, started, heartbeat, lease expiry) that its
fleet task renews every `store.lease_s / 3`. Work is claimed, not owned for ever: an element's
`owner` is the daemon that committed its dispatch intent and polls it since; a schedule's
`optimizer_owner` the one planning it; the `leases` rows name the one publisher of CM events
("events", so they keep their order per schedule) and the one sender of ticket operations
("tickets", in their order per ticket).

A daemon's lease lapses when it is not renewed in time (killed, frozen, cut off). Any other
daemon then takes its work over (`take_over`), in one transaction: its intents caught between
dispatch and answer are reconciled exactly as after a crash (`dispatch.reconcile_dispatches`,
never blindly re-sent), its running work flows are polled by the taker, its schedules planned
again, its named leases freed, and its row deleted.

Fencing: the row is the token. Every write transaction of a daemon first checks that its row
still exists and holds it FOR SHARE until its commit (`Store.tx`); once another daemon took its
work over, the row is gone, the write is refused (`LeaseLost`) and the daemon stops. Taking over
runs under the exclusive write lock and deletes the row, so it waits for any write of the
daemon already under way (which completes, and is reconciled as the daemon's) and no write
begins meanwhile. A lapsed daemon that wakes up before anyone took over may simply renew:
nothing it held was given away.

What is claimed how: a due batch by its schedules' rows, locked FOR UPDATE SKIP LOCKED for the
claiming transaction (`dispatch.begin_dispatches`), so daemons claiming at once take disjoint
work; the elements dispatched, by `owner` (the lease: polled by that daemon until they end, or
taken over); events and ticket operations by the named leases (one sender each, in order).

Lease times are the daemons' own clocks (keep them in sync: NTP; a lease of 15 s tolerates
seconds of skew). On SQLite there is one daemon (the state directory's lock): it takes over
whatever a previous process left at start, and the same paths run with a single owner.
"""

from __future__ import annotations

import json
from typing import Any

from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.store import dispatch
from cmsod.store.store import LeaseLost, Tx

LEASES = ("events", "tickets")


def register(tx: Tx, me: str, host: str, pid: int, lease_ms: int, home: str = "") -> None:
    """`home`: host and state directory. The directory's lock says that the daemon that had it
    before is gone (killed, restarted by systemd): it is taken over at this start, not after
    its lease."""
    tx.execute(
        "INSERT INTO daemons (id, host, home, pid, started_ms, heartbeat_ms, lease_expiry_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (me, host, home or me, pid, tx.now_ms, tx.now_ms, tx.now_ms + lease_ms),
    )


class Round:
    """What one heartbeat did: the leases this daemon holds, the daemons it took over and the
    elements it reconciled or now polls for them."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.gone: list[str] = []
        self.reconciled: list[str] = []
        self.polls = 0
        self.plans = 0
        self.next_lapse_ms: int | None = None  # when the first other daemon's lease ends


def heartbeat(tx: Tx, me: str, lease_ms: int, resend: bool, others_dead: bool = False) -> Round:
    """Renew this daemon's lease, take over the work of lapsed daemons (all others, with
    `others_dead`: SQLite's start), take the named leases nobody alive holds."""
    renewed = tx.execute(
        "UPDATE daemons SET heartbeat_ms = ?, lease_expiry_ms = ? WHERE id = ?",
        (tx.now_ms, tx.now_ms + lease_ms, me),
    ).rowcount
    if not renewed:
        raise LeaseLost(f"daemon {me}: its work was taken over by another daemon")
    done = Round()
    done.gone = [
        d
        for (d,) in tx.execute(
            "SELECT id FROM daemons WHERE id != ? AND (? = 1 OR lease_expiry_ms <= ?"
            " OR home = (SELECT home FROM daemons WHERE id = ?)) ORDER BY id",
            (me, int(others_dead), tx.now_ms, me),
        )
    ]
    take_over(tx, me, done, resend)
    for name in LEASES:
        tx.execute(
            "INSERT INTO leases (name, owner, taken_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
            " taken_ms = excluded.taken_ms"
            " WHERE NOT EXISTS (SELECT 1 FROM daemons d WHERE d.id = leases.owner)",
            (name, me, tx.now_ms),
        )
    done.held = {
        name
        for (name,) in tx.execute("SELECT name FROM leases WHERE owner = ?", (me,))
        if name in LEASES
    }
    (done.next_lapse_ms,) = tx.execute(
        "SELECT min(lease_expiry_ms) FROM daemons WHERE id != ?", (me,)
    ).fetchone()
    return done


def take_over(tx: Tx, me: str, done: Round, resend: bool) -> None:
    """The work of the daemons in `done.gone` (and work nobody owns: left by a daemon of an
    older version, or released at a clean stop) becomes this daemon's."""
    gone = json.dumps(done.gone)
    orphan = "(owner IS NULL OR owner IN (SELECT value FROM json_each(?)))"
    done.reconciled = dispatch.reconcile_dispatches(tx, resend, done.gone, me)
    done.polls = tx.execute(
        f"UPDATE elements SET owner = ? WHERE status = ? AND {orphan}",
        (me, E.TRIGGERED.value, gone),
    ).rowcount
    done.plans = tx.execute(
        "UPDATE schedules SET optimizer_owner = NULL WHERE optimizer_owner IN"
        " (SELECT value FROM json_each(?)) AND status IN (?, ?)",
        (gone, S.PENDING_SCHEDULE.value, S.OPTIMIZATION_IN_PROGRESS.value),
    ).rowcount
    tx.execute("DELETE FROM leases WHERE owner IN (SELECT value FROM json_each(?))", (gone,))
    tx.execute("DELETE FROM daemons WHERE id IN (SELECT value FROM json_each(?))", (gone,))


def leave(tx: Tx, me: str) -> None:
    """A clean stop: what this daemon still polls and its leases are released for the others
    at once (its dispatches were answered or released before), and its row goes."""
    # (an intent still unanswered, the daemon cancelled mid-call, is reconciled by the next
    # heartbeat of any daemon: work nobody owns)
    tx.execute("UPDATE elements SET owner = NULL WHERE owner = ?", (me,))
    tx.execute("UPDATE schedules SET optimizer_owner = NULL WHERE optimizer_owner = ?", (me,))
    tx.execute("DELETE FROM leases WHERE owner = ?", (me,))
    tx.execute("DELETE FROM daemons WHERE id = ?", (me,))


def daemons(conn: Any, now_ms: int) -> list[dict[str, Any]]:
    """Every daemon sharing the store, with its lease and what it holds (`cmsoctl status`)."""
    leases: dict[str, list[str]] = {}
    for name, owner in conn.execute("SELECT name, owner FROM leases ORDER BY name"):
        leases.setdefault(owner, []).append(name)
    counts: dict[tuple[str, str], int] = {}
    for owner, running, n in conn.execute(
        "SELECT owner, status = ?, count(*) FROM elements WHERE owner IS NOT NULL"
        " AND (status = ? OR (status IN (?, ?) AND dispatch_started_ms IS NOT NULL))"
        " GROUP BY owner, status = ?",
        (E.TRIGGERED.value, E.TRIGGERED.value, E.SCHEDULED.value, E.SCHEDULED_IMMEDIATE.value)
        + (E.TRIGGERED.value,),
    ):
        counts[(owner, "running" if running else "dispatching")] = n
    plans = dict(
        conn.execute(
            "SELECT optimizer_owner, count(*) FROM schedules WHERE optimizer_owner IS NOT NULL"
            " AND status = ? GROUP BY optimizer_owner",
            (S.OPTIMIZATION_IN_PROGRESS.value,),
        ).fetchall()
    )
    return [
        {
            "id": d,
            "host": host,
            "pid": pid,
            "startedMs": started,
            "heartbeatMs": beat,
            "leaseExpiryMs": expiry,
            "silentMs": now_ms - beat,  # by this daemon's clock: the reader's may differ
            "alive": expiry > now_ms,
            "leases": leases.get(d, []),
            "dispatching": counts.get((d, "dispatching"), 0),
            "running": counts.get((d, "running"), 0),
            "planning": plans.get(d, 0),
        }
        for d, host, pid, started, beat, expiry in conn.execute(
            "SELECT id, host, pid, started_ms, heartbeat_ms, lease_expiry_ms FROM daemons"
            " ORDER BY started_ms, id"
        )
    ]
