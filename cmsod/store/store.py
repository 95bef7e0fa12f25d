"""The Store: one SQLite connection for writes driven from one worker thread, reads on
connections of their own.

Every transaction is one plain synchronous function `fn(tx, ...)` run whole in the worker, so
no `await` can ever split a transaction and a cancel can never leave one half open.

Reads (`read`) go to a second, query-only connection with a worker thread of its own: in WAL
mode readers and the writer do not block each other, so a large search never holds up a
dispatch commit. A search that may match 100,000 rows is a `stream`: its rows come from one
snapshot on a connection opened for it, a bounded chunk per hop to the thread, so neither
the daemon's memory nor the other reads wait on its size. In the inline mode (MockClock tests)
all of them run inline, one after another.

Durability: WAL with `synchronous=FULL`. NORMAL would already survive `kill -9` (the process
dies, the OS keeps the WAL), but after a power loss or kernel crash it may roll back the last
commits; a rolled-back dispatch intent could let a restarted daemon send a work flow twice.
FULL syncs the WAL on every commit, which costs ~0.2 ms here: far below what change management
needs (reference/reliability.md A2, B2).

(aiosqlite is asyncio-only; under trio we hop to a thread ourselves with a limiter of 1.)

PostgreSQL (`[store] url = "postgresql://..."`, cmsod/store/backend.py) is driven the same way:
psycopg 3's synchronous API (its async API is asyncio-only), one connection per role — the
writer, the reader, one per stream — each used from its worker thread. Within a daemon the
writes stay one at a time; across the daemons sharing the database, a write transaction first
takes a database-wide advisory lock (WRITE_LOCK):

- shared, for the frequent ones marked `shared_lock` (claiming a due batch, recording answers,
  polls, sent events and ticket operations): they run side by side, each locking the rows of
  the schedules it changes first, in id order (`Tx.lock_schedules`; a due batch is claimed
  with SKIP LOCKED, so another daemon's claim is skipped, not waited for), and changing
  nothing outside them: the schedule row is the claim on its elements, tickets and events;
- exclusive, PostgreSQL's BEGIN IMMEDIATE, for everything else (planning, approvals, control
  commands, heartbeats and take-overs, the freeze): the load -> decide -> apply transactions
  written for one writer run alone. A shared one that reaches such a change (a carry-over
  placed around other schedules' work, the freeze expiring) calls `Tx.exclusive()` and is
  run again under the exclusive lock (NeedsExclusive).

Lock order, so no two wait on each other in a circle: the advisory lock, the daemon's own row
(fencing, FOR SHARE), the schedules by id, then their elements, and last EVENTS_LOCK (taken
to insert the events, held to the commit: events are stored in commit order). Each
transaction is short; network calls are never made inside one. One left idle for lease/3 (its
daemon frozen or cut off: its locks would hold up every daemon) is ended by the server and,
rolled back for certain, run once more (`tx`; backend.connect_postgres). Reads are
REPEATABLE READ READ ONLY snapshots and never wait.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from collections.abc import AsyncGenerator, Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from cmsod import cmevents, lifecycle, log, ticketing
from cmsod.clock import WallClock
from cmsod.cmevents import MAX_EDITS_PER_EVENT
from cmsod.executor import Executor, ThreadExecutor
from cmsod.model import ELEMENT_FAILED_RUN, ELEMENT_FINAL, ELEMENT_NOT_COUNTED
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.store import backend
from cmsod.store.schema import migrate, migrate_postgres

T = TypeVar("T")


class LeaseLost(RuntimeError):
    """This daemon's work was taken over by another (its lease lapsed): it must record
    nothing more and stop (cmsod/store/fleet.py)."""


class NeedsExclusive(Exception):
    """A transaction run under the shared write lock reached a change that reads or writes
    beyond the schedules it locked (a carry-over placed around other schedules' work, the
    freeze expiring): `Store.tx` rolls it back and runs it again under the exclusive lock."""


# Write transactions that may run beside other daemons' (PostgreSQL): each locks the rows of
# the schedules it changes before anything else and changes nothing outside them, or calls
# `Tx.exclusive()` first. Marked with `shared_lock`.
SHARED: set[Callable[..., Any]] = set()
F = TypeVar("F", bound=Callable[..., Any])


def shared_lock(fn: F) -> F:
    SHARED.add(fn)
    return fn


MAX_STREAMS = 4  # searches streaming at once (each holds a connection); more wait their turn
NOTIFY_CHANNEL = "cmsod"  # LISTEN/NOTIFY: a commit that stored work wakes the other daemons
WRITE_LOCK = 0x636D736F_77726974  # pg_advisory_xact_lock key of write transactions: "cmsowrit"
# Taken by a transaction just before it inserts its events, held to its commit: events are
# stored (their seqs handed out) in commit order although transactions under the shared write
# lock commit side by side, so a reader of the log never sees an event before one of a lower
# seq that is still to come (outboxes.Tail). What it serialises is the insert and the commit.
EVENTS_LOCK = 0x636D736F_65766E74  # "cmsoevnt"


# Columns a transaction may set by name. SQL identifiers cannot be parameters, so they are
# checked against these lists; values always go as parameters.
SCHEDULE_COLUMNS = frozenset(
    {
        "optimizer_status",
        "optimizer_message",
        "optimizer_ms",
        "optimizer_return_ms",
        "optimizer_attempts",
        "delete_ms",
        "control_action",
        "control_by",
        "control_why",
        "control_ms",
        "failures_acknowledged",
        "approved_plan",
    }
)
ELEMENT_COLUMNS = frozenset(
    {
        "start_ms",
        "finish_ms",
        "status_message",
        "tm_change_id",
        "tm_status",
        "tm_approval_status",
        "dispatch_key",
        "dispatch_started_ms",
        "dispatch_ms",
        "completed_ms",
        "so_request_id",
        "so_status",
        "so_message",
        "so_ms",
        "hold_ms",
        "hold_gate",
        "hold_why",
    }
)
# Internal columns: written, never put in an event.
INTERNAL_COLUMNS = frozenset(
    {"dispatch_key", "hold_ms", "hold_gate", "hold_why", "failures_acknowledged"}
)


def _assignments(columns: dict[str, Any], allowed: frozenset[str]) -> tuple[str, list[Any]]:
    unknown = set(columns) - allowed
    if unknown:
        raise ValueError(f"not a settable column: {sorted(unknown)}")
    return "".join(f", {name} = ?" for name in columns), list(columns.values())


def _event_fields(columns: dict[str, Any]) -> dict[str, Any]:
    """Column values as event fields: start_ms -> "start-time" (ISO-8601), so_status ->
    "so-status"; the dispatch key stays internal."""
    fields = {}
    for key, item in columns.items():
        if item is None or key in INTERNAL_COLUMNS:
            continue
        if key.endswith("_ms"):
            fields[key[:-3].replace("_", "-") + "-time"] = lifecycle.format_time(item)
        else:
            fields[key.replace("_", "-")] = item
    return fields


class Tx:
    """One open transaction. Status changes go through `schedule_to` / `element_to`, which check
    the state machine and collect the CM event edits that `finish` writes to the outbox."""

    def __init__(
        self,
        conn: Any,
        now_ms: int,
        topic: str,
        source: str,
        route_by: str = "",
        owner: str | None = None,
        shared: bool = False,
    ) -> None:
        self._conn = conn
        self.shared = shared  # under the shared write lock (PostgreSQL): see `exclusive`
        self._pending: list[tuple[str, list[tuple | list]]] = []  # deferred writes, in order
        self.owner = owner  # this daemon's id (fleet.py): what it claims is claimed for it
        self.postgres = isinstance(conn, backend.PgConnection)  # the few per-backend statements
        self.now_ms = now_ms
        self.topic = topic
        self.source = source
        self.route_by = route_by
        self._edits: dict[int, list[tuple[str, str, dict]]] = {}
        self._schedule_ids: dict[int, str] = {}
        self._check_verdict: set[int] = set()
        self._check_tickets: list[int] = []  # elements dispatched or ended: their tickets move
        self.verdicts: list[tuple[str, S]] = []  # schedules this transaction closed
        self.notes: list[tuple[str, dict[str, Any]]] = []  # log lines, written after commit
        self.ticket_ops = 0  # ticket operations this transaction queued
        self.freeze_changed = False  # (its event belongs to no schedule: not in _edits)
        self.transitions: list[tuple[str, str]] = []  # ("schedule" | "element", new status)
        # schedules whose slots this transaction moved -> their plan's fingerprint once the
        # last move is done (`plan_kept`), None when not computed: `finish` stores it, and
        # until then it, not the column, is the schedule's (schedules.plan_fingerprint)
        self.moved_plans: dict[int, str | None] = {}

    def lock_schedules(self, among: str, params: tuple, skip: bool = False) -> set[int] | None:
        """PostgreSQL: lock the rows of the schedules `among` (a subquery of their ids) names,
        in id order, and answer which. Every transaction under the shared write lock
        (`shared_lock`) takes its schedules' rows first, in that order, and changes nothing
        outside them: a schedule's row is the claim on its elements, tickets and events, and
        no two such transactions wait on each other in a circle. With `skip` (claiming due
        work), those another daemon holds now are skipped: theirs to do. SQLite: None (its
        one writer holds everything)."""
        if not self.postgres:
            return None
        return {
            schedule
            for (schedule,) in self.execute(
                f"SELECT id FROM schedules WHERE id IN ({among}) ORDER BY id FOR UPDATE"
                + (" SKIP LOCKED" if skip else ""),
                params,
            )
        }

    def exclusive(self) -> None:
        """What follows needs the exclusive write lock (it reads or changes more than the
        schedules this transaction locked): under the shared one, start again under it."""
        if self.shared:
            raise NeedsExclusive

    @property
    def conn(self) -> Any:
        """The connection, the deferred writes flushed first (a read sees them)."""
        self.flush()
        return self._conn

    def execute(self, sql: str, params: tuple | list = (), flush: bool = True) -> Any:
        """`flush=False`: a read of rows no deferred write touches (one element's own row
        while the batch's other elements' writes wait), so they stay batched."""
        if flush:
            self.flush()
        return self._conn.execute(sql, params)

    def defer(self, sql: str, params: tuple | list) -> None:
        """A write whose result nothing reads, sent with the next statement (or at the end):
        a run of the same statement goes as one executemany. On PostgreSQL that is one round
        trip (psycopg's pipeline) instead of one per element of a batch."""
        if self._pending and self._pending[-1][0] == sql:
            self._pending[-1][1].append(params)
        else:
            self._pending.append((sql, [params]))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for sql, rows in pending:
            if len(rows) == 1:
                self._conn.execute(sql, rows[0])
            else:
                self._conn.executemany(sql, rows)

    def edit(self, schedule: int, schedule_id: str, edit: tuple[str, str, dict]) -> None:
        self._schedule_ids[schedule] = schedule_id
        self._edits.setdefault(schedule, []).append(edit)

    def schedule_to(
        self, schedule: int, schedule_id: str, old: S | None, new: S, **columns: Any
    ) -> None:
        lifecycle.check_schedule(old, new)
        sets, values = _assignments(columns, SCHEDULE_COLUMNS)
        self.execute(
            f"UPDATE schedules SET status = ?, updated_ms = ?{sets} WHERE id = ?",
            [new.value, self.now_ms, *values, schedule],
        )
        self.transitions.append(("schedule", new.value))
        value: dict[str, Any] = {"schedule-id": schedule_id, "status": new.value}
        value.update(_event_fields(columns))
        self.edit(schedule, schedule_id, cmevents.schedule_edit(schedule_id, "patch", value))

    def element_to(
        self,
        element: int,
        schedule: int,
        schedule_id: str,
        name: str,
        old: E | None,
        new: E,
        **columns: Any,
    ) -> None:
        lifecycle.check_element(old, new)
        sets, values = _assignments(columns, ELEMENT_COLUMNS)
        self.defer(
            f"UPDATE elements SET status = ?{sets} WHERE id = ?", [new.value, *values, element]
        )
        self._moved(schedule, columns)
        self.transitions.append(("element", new.value))
        value: dict[str, Any] = {"vnf-name": name, "status": new.value}
        value.update(_event_fields(columns))
        self.edit(schedule, schedule_id, cmevents.element_edit(schedule_id, name, value))
        if new in ELEMENT_FINAL:
            self._check_verdict.add(schedule)
        if new in ELEMENT_FINAL or new is E.TRIGGERED:
            self._check_tickets.append(element)

    def schedule_set(self, schedule: int, schedule_id: str, status: S, **columns: Any) -> None:
        """Change a schedule's columns without a status change (an abort while it runs on)."""
        sets, values = _assignments(columns, SCHEDULE_COLUMNS)
        self.execute(
            f"UPDATE schedules SET updated_ms = ?{sets} WHERE id = ?",
            [self.now_ms, *values, schedule],
        )
        value: dict[str, Any] = {"schedule-id": schedule_id, "status": status.value}
        value.update(_event_fields(columns))
        self.edit(schedule, schedule_id, cmevents.schedule_edit(schedule_id, "patch", value))

    def element_set(
        self, element: int, schedule: int, schedule_id: str, name: str, status: E, **columns: Any
    ) -> None:
        """Change an element's columns without a status change (a carry-over's new slot)."""
        sets, values = _assignments(columns, ELEMENT_COLUMNS)
        self.defer(f"UPDATE elements SET status = ?{sets} WHERE id = ?", [status, *values, element])
        self._moved(schedule, columns)
        value: dict[str, Any] = {"vnf-name": name, "status": status.value}
        value.update(_event_fields(columns))
        self.edit(schedule, schedule_id, cmevents.element_edit(schedule_id, name, value))

    def _moved(self, schedule: int, columns: dict[str, Any]) -> None:
        """Every slot change passes here: the schedule's stored fingerprint is no longer known."""
        if "start_ms" in columns or "finish_ms" in columns:
            self.moved_plans[schedule] = None

    def plan_kept(self, schedule: int, fingerprint: str | None) -> None:
        """The fingerprint of the schedule's slots as they now stand (after its last move)."""
        self.moved_plans[schedule] = fingerprint

    def note(self, event: str, **fields: Any) -> None:
        """A log line for after the commit (never for a change that is rolled back)."""
        self.notes.append((event, fields))

    def queue_ticket_op(self, change_id: str, op: ticketing.Op, body: dict[str, Any]) -> None:
        self.defer(
            "INSERT INTO ticket_ops (change_id, op, body, created_ms, due_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            (change_id, op.value, msgspec.json.encode(body), self.now_ms, self.now_ms),
        )
        self.ticket_ops += 1

    def _move_tickets(self) -> None:
        """The ticket operations this transaction's element changes cause, in its commit:
        WorkInProgress when a ticket's first element is dispatched; close (or cancel) once
        all of its elements are done. (Each read is one query for all of the tickets.)"""
        if not self._check_tickets:
            return
        tickets = self.execute(
            "SELECT t.change_id, s.user_id,"
            " EXISTS (SELECT 1 FROM ticket_ops o WHERE o.change_id = t.change_id AND o.op = ?)"
            " FROM change_tickets t JOIN schedules s ON s.id = t.schedule"
            " WHERE t.closure_code IS NULL AND t.change_id IN (SELECT tm_change_id FROM elements"
            " WHERE id IN (SELECT CAST(value AS BIGINT) FROM json_each(?)))",
            (ticketing.Op.UPDATE.value, json.dumps(self._check_tickets)),
        ).fetchall()
        if not tickets:
            return
        elements: dict[str, list[tuple[E, int | None, int | None]]] = {}
        for change_id, status, dispatch_ms, completed_ms in self.execute(
            "SELECT tm_change_id, status, dispatch_ms, completed_ms FROM elements"
            " WHERE tm_change_id IN (SELECT value FROM json_each(?))",
            (json.dumps([t[0] for t in tickets]),),
        ):
            elements.setdefault(change_id, []).append((E(status), dispatch_ms, completed_ms))
        closed = []
        for change_id, user_id, updating in tickets:
            move = ticketing.move(
                change_id, user_id, elements.get(change_id, []), updating, self.now_ms
            )
            if move is None:
                continue
            self.queue_ticket_op(change_id, move.op, move.body)
            if move.closure is not None:
                closed.append(
                    (
                        move.closure.value,
                        move.first_dispatch_ms,
                        move.last_completion_ms,
                        self.now_ms,
                        change_id,
                    )
                )
        for row in closed:  # after the inserts: each statement's run goes in one round trip
            self.defer(
                "UPDATE change_tickets SET closure_code = ?, actual_start_ms = ?,"
                " actual_end_ms = ?, updated_ms = ? WHERE change_id = ?",
                row,
            )

    def finish(self) -> None:
        """Apply the core's rules to what this transaction changed: the ticket operations
        (`ticketing.move`), the verdict of executing schedules whose last element just ended
        (`lifecycle.completion_verdict`); then write the events."""
        for schedule, fingerprint in self.moved_plans.items():
            self.execute(
                "UPDATE schedules SET plan_fingerprint = ? WHERE id = ?", (fingerprint, schedule)
            )
        self._move_tickets()
        for schedule in sorted(self._check_verdict):
            status, schedule_id, max_failures, max_ratio, acked = self.execute(
                "SELECT status, schedule_id, max_failures, max_failure_ratio,"
                " failures_acknowledged FROM schedules WHERE id = ?",
                (schedule,),
            ).fetchone()
            if status not in (S.NOTIFICATIONS_INITIATED, S.PAUSED, S.HALTED):
                continue
            statuses = [
                E(s)
                for (s,) in self.execute(
                    "SELECT status FROM elements WHERE schedule = ?", (schedule,)
                )
            ]
            verdict = lifecycle.completion_verdict(statuses)
            if verdict is not None:
                self.schedule_to(schedule, schedule_id, S(status), verdict)
                self.verdicts.append((schedule_id, verdict))
                continue
            if status != S.NOTIFICATIONS_INITIATED or (max_failures is None and max_ratio is None):
                continue
            failed = sum(s in ELEMENT_FAILED_RUN for s in statuses) - acked
            total = sum(s not in ELEMENT_NOT_COUNTED for s in statuses)
            why = lifecycle.threshold_crossed(failed, total, max_failures, max_ratio)
            if why is not None:
                self.schedule_to(
                    schedule,
                    schedule_id,
                    S.NOTIFICATIONS_INITIATED,
                    S.HALTED,
                    control_action="halt",
                    control_by="cmsod",
                    control_why=f"failure threshold crossed: {why}",
                    control_ms=self.now_ms,
                )
                self.note("schedule.halted", schedule_id=schedule_id, why=why)
        if self._edits and self.postgres:
            self.execute("SELECT pg_advisory_xact_lock(?)", (EVENTS_LOCK,))
        for schedule, edits in self._edits.items():
            schedule_id = self._schedule_ids[schedule]
            topic = self._topic_for(schedule)
            chunks = [
                edits[i : i + MAX_EDITS_PER_EVENT]
                for i in range(0, len(edits), MAX_EDITS_PER_EVENT)
            ]
            (seq,) = self.execute(
                "UPDATE schedules SET event_seq = event_seq + ? WHERE id = ? RETURNING event_seq",
                (len(chunks), schedule),
            ).fetchone()
            for n, chunk in enumerate(chunks):
                event = cmevents.build(
                    schedule_id, seq - len(chunks) + n + 1, chunk, self.now_ms, self.source
                )
                self.execute(
                    "INSERT INTO events (schedule_id, topic, body, created_ms) VALUES (?, ?, ?, ?)",
                    (schedule_id, topic, cmevents.encode(event), self.now_ms),
                )

    def freeze_event(self, value: dict[str, Any]) -> None:
        """The global freeze changed: one event of its own sequence (no schedule owns it)."""
        self.freeze_changed = True
        if self.postgres:
            self.execute("SELECT pg_advisory_xact_lock(?)", (EVENTS_LOCK,))
        (seq,) = self.execute(
            'UPDATE "freeze" SET event_seq = event_seq + 1 WHERE id = 1 RETURNING event_seq'
        ).fetchone()
        event = cmevents.build(
            cmevents.FREEZE_CORRELATION,
            seq,
            [cmevents.freeze_edit(value)],
            self.now_ms,
            self.source,
        )
        self.execute(
            "INSERT INTO events (schedule_id, topic, body, created_ms) VALUES (?, ?, ?, ?)",
            (cmevents.FREEZE_CORRELATION, self.topic, cmevents.encode(event), self.now_ms),
        )

    def _topic_for(self, schedule: int) -> str:
        """<topic>-<target group> when events are routed by a schedule's domain data."""
        if not self.route_by:
            return self.topic
        row = self.execute(
            "SELECT value FROM domain_data WHERE schedule = ? AND name = ?",
            (schedule, self.route_by),
        ).fetchone()
        group = TOPIC_UNSAFE.sub("_", row[0])[:40] if row and row[0] else ""
        return f"{self.topic}-{group}" if group else self.topic


TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Store:
    def __init__(
        self,
        path: Path | str,
        executor: Executor | None = None,
        clock: WallClock | None = None,
        topic: str = "cm-events",
        source: str = "urn:onap:cmsod",
        route_by: str = "",
        on_commit: Callable[[], None] | None = None,
        on_ticket_ops: Callable[[], None] | None = None,
        on_transitions: Callable[[list[tuple[str, str]]], None] | None = None,
        lease_s: float = 15.0,
    ) -> None:
        self.path = str(path)  # an SQLite file, or a postgresql:// URL
        self.postgres = backend.is_postgres(self.path)
        self.executor = executor or ThreadExecutor()
        self.clock = clock or WallClock()
        self.topic = topic
        self.source = source
        self.route_by = route_by
        self.on_commit = on_commit  # rings the event emitter: every commit may carry events
        self.on_ticket_ops = on_ticket_ops  # rings the tickets actor when a commit queued some
        self.on_transitions = on_transitions  # counts the committed transitions (metrics)
        self.conn: Any = None  # sqlite3.Connection | backend.PgConnection
        self.reader: Any = None
        # Reads get a worker thread of their own (in the inline mode: inline, as writes).
        self.read_executor = self._own_executor()
        self.streams = trio.CapacityLimiter(MAX_STREAMS)
        self.migrations_applied: list[int] = []
        # write transactions committed: figures for tests and benches, and what a cached read
        # is valid for (nothing else writes: the state directory is one daemon's)
        self.commits = 0
        self.owner: str | None = None  # this daemon's id once registered (fleet.py)
        self.lease_lost = False
        self.lease_until: float | None = None  # trio time the lease lapses (PostgreSQL)
        self.held_leases: set[str] = {"events", "tickets"}  # fleet.py's named leases held
        self.on_lease_lost: Callable[[], None] | None = None
        # PostgreSQL: a transaction left idle for lease/3 is ended by the server (backend.py)
        self.lease_s = lease_s

    # -- life ------------------------------------------------------------------------------

    def _open(self) -> None:
        if self.postgres:
            pg = self._connect("cmsod writer")
            try:
                self.migrations_applied = migrate_postgres(pg)
            except BaseException:
                pg.close()
                raise
            self.conn = pg
            return
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        self.migrations_applied = migrate(conn)
        self.conn = conn

    def _open_reader(self, streaming: bool = False) -> Any:
        if self.postgres:
            return self._connect("cmsod reader", streaming)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _connect(self, application: str, streaming: bool = False) -> backend.PgConnection:
        return backend.connect_postgres(
            self.path, streaming, application, self.lease_s, idle_timeout=not streaming
        )

    def _own_executor(self) -> Executor:
        return ThreadExecutor() if isinstance(self.executor, ThreadExecutor) else self.executor

    async def open(self) -> None:
        await self.executor(self._open)  # the schema first: the reader opens what it made
        self.reader = await self.read_executor(self._open_reader)

    async def close(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            await self.read_executor(reader.close)
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await self.executor(conn.close)

    # -- calls -----------------------------------------------------------------------------

    async def tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(tx, *args)` as one write transaction; its events are written with it.
        Fenced (PostgreSQL): once another daemon took this one's work over, it raises
        LeaseLost and writes nothing."""
        topic, source, route_by, owner = self.topic, self.source, self.route_by, self.owner
        if self.lease_lost:
            raise LeaseLost(f"daemon {owner}: its work was taken over by another daemon")

        committing = False  # COMMIT sent: a connection lost now leaves the outcome unknown

        def work() -> tuple[T, Tx]:
            shared = self.postgres and fn in SHARED
            again = True
            while True:
                try:
                    return attempt(shared)
                except NeedsExclusive:
                    shared = False
                except Exception as exc:
                    # Rolled back for certain (the daemon frozen past the idle timeout inside
                    # it, the server restarted): once more, on a new connection. Its row still
                    # stands and it commits, or its work was taken over and it is fenced.
                    if not (
                        again and self.postgres and backend.rolled_back(exc, self.conn, committing)
                    ):
                        raise
                    again = False

        def attempt(shared: bool) -> tuple[T, Tx]:
            nonlocal committing
            committing = False
            conn = self._connection()
            if self.postgres:
                conn.execute("BEGIN")
                conn.execute(
                    f"SELECT pg_advisory_xact_lock{'_shared' if shared else ''}(?)", (WRITE_LOCK,)
                )
            else:
                conn.execute("BEGIN IMMEDIATE")
            try:
                if self.postgres and owner is not None:
                    # Fencing: the row is the token. FOR SHARE holds it to the commit, so a
                    # take-over (which deletes it) waits for this write or this write sees
                    # the row gone.
                    if (
                        conn.execute(
                            "SELECT 1 FROM daemons WHERE id = ? FOR SHARE", (owner,)
                        ).fetchone()
                        is None
                    ):
                        raise LeaseLost(
                            f"daemon {owner}: its work was taken over by another daemon"
                        )
                # read once the locks are held: a heartbeat that waited for its lock must not
                # write a lease expiry already stale by the wait
                now_ms = self.clock.now_ms()
                tx = Tx(conn, now_ms, topic, source, route_by, owner, shared)
                result = fn(tx, *args)
                tx.finish()
                tx.flush()
                if self.postgres and (tx._edits or tx.ticket_ops or tx.freeze_changed):
                    # the other daemons' doorbells, delivered at commit (`listen`)
                    conn.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, owner or ""))
                committing = True
                conn.execute("COMMIT")
                # counted here, not after the await: a caller cancelled meanwhile must not
                # leave a commit uncounted (the REST listener's view cache keys on it)
                self.commits += 1
                return result, tx
            except BaseException:
                # After SQLITE_FULL the transaction may already be gone (reliability.md A2).
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except Exception:  # a lost PostgreSQL connection: the server rolled back
                        if not self.postgres:
                            raise
                raise

        try:
            result, tx = await self.executor(work)
        except LeaseLost:
            self.lease_lost = True
            if self.on_lease_lost is not None:
                self.on_lease_lost()
            raise
        for schedule_id, verdict in tx.verdicts:
            log.info("schedule.finished", schedule_id=schedule_id, status=verdict.value)
        for event, fields in tx.notes:
            log.info(event, **fields)
        if tx.transitions and self.on_transitions is not None:
            self.on_transitions(tx.transitions)
        if self.on_commit is not None:
            self.on_commit()
        if tx.ticket_ops and self.on_ticket_ops is not None:
            self.on_ticket_ops()
        return result

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on one consistent snapshot, on the read connection."""

        def work() -> T:
            try:
                return attempt()
            except Exception as exc:
                # the connection lost (frozen past the idle timeout, as in `tx`): once more
                if not (self.postgres and backend.rolled_back(exc, self.reader, False)):
                    raise
                return attempt()

        def attempt() -> T:
            conn = self.reader
            if conn is None:
                raise RuntimeError("store is not open")
            if self.postgres and conn.raw.broken:  # the server restarted: a new connection
                conn = self.reader = self._open_reader()
            conn.execute(READ_BEGIN[self.postgres])
            try:
                return fn(conn, *args)
            finally:
                if not (self.postgres and conn.raw.broken):  # (a broken one ended it)
                    conn.execute("COMMIT")

        return await self.read_executor(work)

    async def stream(
        self, fn: Callable[..., Generator[T, None, None]], *args: Any, chunk: int
    ) -> AsyncGenerator[list[T], None]:
        """The items of `fn(conn, *args)` (a generator reading as it goes), `chunk` at a time,
        all from one snapshot on a connection and worker thread of their own. Memory holds one
        chunk, whatever the number of items. Closing the iterator (or cancelling it) ends the
        read and closes the connection."""
        async with self.streams:
            executor = self._own_executor()

            def start() -> tuple[Any, Generator[T, None, None]]:
                if self.conn is None:
                    raise RuntimeError("store is not open")
                conn = self._open_reader(streaming=True)
                # SQLite: deferred, the snapshot is taken at the first read
                conn.execute(READ_BEGIN[self.postgres])
                return conn, fn(conn, *args)

            def finish() -> None:
                items.close()
                conn.close()  # ends the read transaction

            conn, items = await executor(start)
            try:
                while batch := await executor(lambda: list(itertools.islice(items, chunk))):
                    yield batch
            finally:
                with trio.CancelScope(shield=True):
                    await executor(finish)

    def lease_lapsed(self) -> bool:
        """Past this daemon's lease by its own clock: others may be taking its work over."""
        if self.lease_lost:
            return True
        return self.lease_until is not None and trio.current_time() >= self.lease_until

    async def listen(
        self,
        ring: Callable[[], None],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """PostgreSQL: doorbells across daemons. A connection of its own LISTENs, in a worker
        thread of its own, for the NOTIFY that other daemons' commits send when they store
        work (`tx`), and calls `ring` (in trio) for each batch of them. Started (`nursery.start`)
        once the first LISTEN is on; runs until cancelled; a lost connection is opened again
        (a second later)."""
        me = self.owner or ""
        started = False

        def wait(conn: Any) -> bool:
            return any(n.payload != me for n in conn.raw.notifies(timeout=1.0, stop_after=1))

        while True:
            conn = None
            try:
                conn = await trio.to_thread.run_sync(lambda: self._connect("cmsod listener"))
                await trio.to_thread.run_sync(conn.raw.execute, f"LISTEN {NOTIFY_CHANNEL}")
                if not started:
                    started = True
                    task_status.started()
                while True:
                    if await trio.to_thread.run_sync(wait, conn, abandon_on_cancel=True):
                        ring()
            except Exception as exc:
                log.warning("store.listen_failed", reason=str(exc))
                await trio.sleep(1.0)
            finally:
                if conn is not None:
                    # off the trio thread: an abandoned `wait` may still hold the connection
                    # for up to its 1 s timeout
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.close)

    def _connection(self) -> Any:
        if self.conn is None:
            raise RuntimeError("store is not open")
        if self.postgres and self.conn.raw.broken:  # the server restarted: a new connection
            self.conn.close()
            self.conn = self._connect("cmsod writer")
        return self.conn


READ_BEGIN = {False: "BEGIN", True: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"}
