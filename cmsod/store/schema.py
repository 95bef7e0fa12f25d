"""The schema, versioned: PRAGMA user_version on SQLite, the one row of `schema_version` on
PostgreSQL. Each migration runs once, in order, in one transaction; a database newer than this
code is refused rather than misread.

One list of migrations for both backends. Each is written in SQLite's DDL and read by
PostgreSQL through `to_postgres` (INTEGER -> BIGINT, since ms timestamps exceed 32 bits; an
INTEGER PRIMARY KEY -> a BIGINT identity; BLOB -> BYTEA; REAL -> DOUBLE PRECISION). Where a
step must differ, POSTGRES_VARIANTS holds PostgreSQL's own text for it.

On PostgreSQL several daemons may start at once: each holds an advisory lock (MIGRATION_LOCK)
across all the migrations and reads the version under it, so the first migrates all and the
others find the work done.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

MIGRATIONS: list[str] = [
    # 1: schedules, groups, windows, elements, approvals, the event outbox.
    """
    CREATE TABLE schedules (
        id INTEGER PRIMARY KEY,
        schedule_id TEXT NOT NULL UNIQUE,
        domain TEXT NOT NULL,
        user_id TEXT NOT NULL,
        status TEXT NOT NULL,
        immediate INTEGER NOT NULL,
        normal_s INTEGER NOT NULL,
        additional_s INTEGER NOT NULL,
        concurrency INTEGER,
        policy_id TEXT,
        schedule_info BLOB NOT NULL,
        create_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        optimizer_status TEXT,
        optimizer_message TEXT,
        optimizer_ms INTEGER,
        optimizer_return_ms INTEGER,
        optimizer_attempts INTEGER NOT NULL DEFAULT 0,
        delete_ms INTEGER,
        event_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX schedules_status ON schedules(status);
    CREATE TABLE domain_data (
        schedule INTEGER NOT NULL REFERENCES schedules(id),
        name TEXT NOT NULL,
        value TEXT NOT NULL
    );
    CREATE INDEX domain_data_schedule ON domain_data(schedule);
    CREATE TABLE cm_groups (
        id INTEGER PRIMARY KEY,
        schedule INTEGER NOT NULL REFERENCES schedules(id),
        group_id TEXT NOT NULL,
        start_ms INTEGER,
        finish_ms INTEGER,
        last_instance_ms INTEGER,
        UNIQUE (schedule, group_id)
    );
    CREATE TABLE windows (
        grp INTEGER NOT NULL REFERENCES cm_groups(id),
        start_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL
    );
    CREATE INDEX windows_grp ON windows(grp);
    CREATE TABLE elements (
        id INTEGER PRIMARY KEY,
        schedule INTEGER NOT NULL REFERENCES schedules(id),
        grp INTEGER NOT NULL REFERENCES cm_groups(id),
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        request BLOB NOT NULL,
        start_ms INTEGER,
        finish_ms INTEGER,
        status_message TEXT,
        tm_change_id TEXT,
        tm_status TEXT,
        tm_approval_status TEXT,
        dispatch_key TEXT,
        dispatch_attempts INTEGER NOT NULL DEFAULT 0,
        dispatch_started_ms INTEGER,
        dispatch_ms INTEGER,
        completed_ms INTEGER,
        so_request_id TEXT,
        so_status TEXT,
        so_message TEXT,
        so_ms INTEGER,
        poll_errors INTEGER NOT NULL DEFAULT 0,
        UNIQUE (schedule, name)
    );
    CREATE INDEX elements_status_start ON elements(status, start_ms);
    CREATE INDEX elements_name ON elements(name);
    CREATE TABLE approvals (
        schedule INTEGER NOT NULL REFERENCES schedules(id),
        user_id TEXT NOT NULL,
        approval_type TEXT NOT NULL,
        status TEXT NOT NULL,
        approval_ms INTEGER NOT NULL,
        UNIQUE (schedule, user_id, approval_type)
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        schedule_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        body BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        sent_ms INTEGER
    );
    CREATE INDEX events_unsent ON events(seq) WHERE sent_ms IS NULL;
    """,
    # 2: per-element data (time zone, attributes such as the site) for the optimizer.
    """
    ALTER TABLE elements ADD COLUMN data BLOB;
    """,
    # 3: events the emitter refused to publish (unknown schema) are kept, with the reason.
    """
    ALTER TABLE events ADD COLUMN refused TEXT;
    DROP INDEX events_unsent;
    CREATE INDEX events_unsent ON events(seq) WHERE sent_ms IS NULL AND refused IS NULL;
    """,
    # 4: the built-in ticket book: times an element is unavailable (blackouts, outside tickets).
    """
    CREATE TABLE availability (
        id INTEGER PRIMARY KEY,
        ref TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        element TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE INDEX availability_element ON availability(element, start_ms);
    """,
    # 5: the change tickets cmsod opened (in built-in mode, the ticket system itself) and the
    # outbox of ticket operations, written in the transaction of the change that causes them.
    """
    CREATE TABLE change_tickets (
        change_id TEXT PRIMARY KEY,
        schedule INTEGER NOT NULL REFERENCES schedules(id),
        group_id TEXT NOT NULL,
        vnfs TEXT NOT NULL,
        planned_start_ms INTEGER NOT NULL,
        planned_end_ms INTEGER NOT NULL,
        approval_status TEXT NOT NULL,
        status TEXT NOT NULL,
        closure_code TEXT,
        actual_start_ms INTEGER,
        actual_end_ms INTEGER,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX change_tickets_schedule ON change_tickets(schedule);
    ALTER TABLE elements ADD COLUMN hold_ms INTEGER;  -- its ticket could not be checked: retry then
    CREATE INDEX elements_ticket ON elements(tm_change_id) WHERE tm_change_id IS NOT NULL;
    CREATE TABLE ticket_ops (
        id INTEGER PRIMARY KEY,
        change_id TEXT NOT NULL,  -- no foreign key: a ticket TM opened for a request that
        --  then failed to be stored has no record here, yet must be cancelled
        op TEXT NOT NULL,
        body BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        due_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        sent_ms INTEGER
    );
    CREATE INDEX ticket_ops_unsent ON ticket_ops(change_id, id) WHERE sent_ms IS NULL;
    """,
    # 6: ticket-book ids are never reused (AUTOINCREMENT keeps the highest ever handed out),
    # and an approval records who sent it (peer credentials) beside the name it gives.
    """
    CREATE TABLE availability_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ref TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        element TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL
    );
    INSERT INTO availability_new SELECT * FROM availability;
    DROP TABLE availability;
    ALTER TABLE availability_new RENAME TO availability;
    CREATE INDEX availability_element ON availability(element, start_ms);
    ALTER TABLE approvals ADD COLUMN caller TEXT;
    """,
    # 7: a schedule's elements in group order (its view, the list's counts) without a full scan
    """
    CREATE INDEX IF NOT EXISTS elements_schedule ON elements(schedule, grp, id);
    """,
    # 8: stopping and holding a rollout. Who paused, halted or aborted a schedule, when and
    # why; its failure threshold and the failures already acknowledged by a resume; why an
    # element is held (and by which gate); the global freeze (one row, with its own event
    # sequence).
    """
    ALTER TABLE schedules ADD COLUMN control_action TEXT;
    ALTER TABLE schedules ADD COLUMN control_by TEXT;
    ALTER TABLE schedules ADD COLUMN control_why TEXT;
    ALTER TABLE schedules ADD COLUMN control_ms INTEGER;
    ALTER TABLE schedules ADD COLUMN max_failures INTEGER;
    ALTER TABLE schedules ADD COLUMN max_failure_ratio REAL;
    ALTER TABLE schedules ADD COLUMN failures_acknowledged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE elements ADD COLUMN hold_gate TEXT;
    ALTER TABLE elements ADD COLUMN hold_why TEXT;
    CREATE TABLE "freeze" (  -- quoted: a keyword in PostgreSQL
        id INTEGER PRIMARY KEY CHECK (id = 1),
        active INTEGER NOT NULL DEFAULT 0,
        since_ms INTEGER,
        until_ms INTEGER,
        "by" TEXT,  -- quoted: a keyword in PostgreSQL
        why TEXT,
        event_seq INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO "freeze" (id) VALUES (1);
    """,
    # 9: approval bound to the plan. Each plan cmsod made for a schedule (by the optimizer, or
    # re-planned at an approval) with its fingerprint and slots, so a refusal can name what
    # moved since the plan an approver saw; the plan an approval approved.
    """
    CREATE TABLE plans (
        schedule INTEGER NOT NULL REFERENCES schedules(id),
        fingerprint TEXT NOT NULL,
        slots TEXT NOT NULL,
        made_ms INTEGER NOT NULL,
        made_by TEXT NOT NULL,
        PRIMARY KEY (schedule, fingerprint)
    );
    ALTER TABLE approvals ADD COLUMN plan TEXT;
    ALTER TABLE schedules ADD COLUMN approved_plan TEXT;
    """,
    # 10: several daemons on one database (cmsod/store/fleet.py): who is alive (a lease each,
    # renewed), the named leases (one events publisher, one ticket sender), the daemon whose
    # dispatch or poll an element is, the one planning a schedule.
    """
    CREATE TABLE daemons (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        home TEXT NOT NULL,  -- host and state directory: one daemon at a time (its lock)
        pid INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        heartbeat_ms INTEGER NOT NULL,
        lease_expiry_ms INTEGER NOT NULL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        taken_ms INTEGER NOT NULL
    );
    ALTER TABLE elements ADD COLUMN owner TEXT;
    ALTER TABLE schedules ADD COLUMN optimizer_owner TEXT;
    CREATE INDEX elements_owner ON elements(owner, status) WHERE owner IS NOT NULL;
    """,
    # 11: the fingerprint of a schedule's plan as it stands, kept by the transaction that moves
    # its slots (Tx.finish), so that a view need not hash 100,000 slots; NULL: not known (a
    # carry-over moved a slot, or the schedule was planned before this column), recomputed.
    """
    ALTER TABLE schedules ADD COLUMN plan_fingerprint TEXT;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_LOCK = 0x636D736F_6D696772  # pg_advisory_lock key: "cmsomigr"

_PG_TYPES = [
    (
        re.compile(r"\bINTEGER PRIMARY KEY( AUTOINCREMENT)?"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
]


def to_postgres(ddl: str) -> str:
    for pattern, replacement in _PG_TYPES:
        ddl = pattern.sub(replacement, ddl)
    return ddl


POSTGRES_VARIANTS: dict[int, str] = {
    # domain_data is shown in insertion order (ORDER BY rowid): PostgreSQL has no rowid, so
    # the table gets a column of that name.
    1: to_postgres(MIGRATIONS[0]).replace(
        "CREATE TABLE domain_data (",
        "CREATE TABLE domain_data (\n        rowid BIGINT GENERATED ALWAYS AS IDENTITY,",
    ),
    # An identity never hands an id out twice: only the approval's caller is new.
    6: "ALTER TABLE approvals ADD COLUMN caller TEXT;",
}


def postgres_migration(number: int) -> str:
    return POSTGRES_VARIANTS.get(number) or to_postgres(MIGRATIONS[number - 1])


class SchemaTooNew(RuntimeError):
    pass


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Bring the database to SCHEMA_VERSION; returns the versions applied."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"database schema {version} is newer than this cmsod ({SCHEMA_VERSION})")
    applied = []
    for number in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")  # an int we own, not input
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied


def migrate_postgres(conn: Any) -> list[int]:
    """`migrate` for PostgreSQL (a backend.PgConnection); several daemons may run it at once.
    The lock is held for all the migrations, not taken by each: daemons waiting on it would
    otherwise take turns, each applying some (1 to 10 here, 11 there). It is the session's,
    so it goes with the connection if the daemon dies."""
    raw = conn.raw  # DDL has no parameters: straight to psycopg, untranslated
    raw.execute(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
    try:
        return _migrate_postgres_locked(raw)
    finally:
        if not raw.closed:
            raw.execute(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")


def _migrate_postgres_locked(raw: Any) -> list[int]:
    applied = []
    for number in range(1, SCHEMA_VERSION + 1):
        raw.execute("BEGIN")
        try:
            raw.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            row = raw.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else row[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"database schema {version} is newer than this cmsod ({SCHEMA_VERSION})"
                )
            if version >= number:
                raw.execute("COMMIT")
                continue
            for statement in postgres_migration(number).split(";"):
                if statement.strip():
                    raw.execute(statement)
            if row is None:
                raw.execute(f"INSERT INTO schema_version (version) VALUES ({number})")
            else:
                raw.execute(f"UPDATE schema_version SET version = {number}")
            raw.execute("COMMIT")
        except BaseException:
            raw.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
