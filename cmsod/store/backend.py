"""The two backends: SQLite (embedded, the default) and PostgreSQL (`[store] url`, several
daemons on one database).

The store modules' SQL is written once, in the subset both understand: `?` placeholders,
`INSERT ... ON CONFLICT`, `RETURNING`, `count(*) FILTER (WHERE ...)`, `IS DISTINCT FROM`.
What PostgreSQL spells otherwise is translated here, once per statement text (cached):

- `?` -> `%s` (and a literal `%` -> `%%`), bound client-side by psycopg's ClientCursor: values
  are sent as literals, typed by their context like SQLite's, so `? IS NULL` or a bare `?`
  in a select list need no casts;
- `json_each(?)` (a JSON array as a parameter: a list of names or ids of any length) ->
  `jsonb_array_elements_text(?::jsonb) AS je(value)`; ids are read as `CAST(value AS BIGINT)`
  on both;
- `LIKE` -> `ILIKE` (SQLite's LIKE ignores ASCII case; the queries' patterns keep doing so).

Driver: psycopg 3, its synchronous API, each connection driven from one worker thread of the
Store exactly as an SQLite connection is. (psycopg's async API runs on asyncio only; cmsod runs
on trio, so it hops to a thread itself, as for SQLite.)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")

_JSON_EACH = re.compile(r"json_each\(\?\)")
_LIKE = re.compile(r"\bLIKE\b")


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def redact(url: str) -> str:
    """The URL as it may be logged or shown: the password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable store url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[1]}"))


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """One statement in the shared dialect, as PostgreSQL reads it."""
    sql = sql.replace("%", "%%")
    sql = _JSON_EACH.sub("jsonb_array_elements_text(?::jsonb) AS je(value)", sql)
    sql = _LIKE.sub("ILIKE", sql)
    return sql.replace("?", "%s")


def _params(params: Sequence[Any] | None) -> Sequence[Any] | None:
    if not params:
        return None
    # SQLite stores a bool as 0/1 in an INTEGER column; PostgreSQL would refuse `true` there.
    return [int(p) if isinstance(p, bool) else p for p in params]


class PgConnection:
    """A psycopg connection that takes the shared dialect (the sqlite3.Connection calls the
    store modules use: execute, executemany, in_transaction, close).

    Autocommit as SQLite's isolation_level=None: the Store says BEGIN and COMMIT itself. With
    `streaming`, a SELECT reads through a server-side cursor, a chunk per fetch, so a 100,000-
    row search holds one chunk in memory (the stream connection is in a transaction)."""

    def __init__(self, raw: Any, streaming: bool = False) -> None:
        self.raw = raw
        self.streaming = streaming
        self._cursors = 0

    def execute(self, sql: str, params: Sequence[Any] | None = ()) -> Any:
        text = translate(sql)
        if self.streaming and sql.lstrip().upper().startswith("SELECT"):
            literal = self.raw.cursor().mogrify(text, _params(params))
            self._cursors += 1
            cursor = self.raw.cursor(name=f"cmsod_stream_{self._cursors}")
            cursor.itersize = 500
            cursor.execute(literal.replace("%", "%%"))
            return cursor
        return self.raw.execute(text, _params(params))

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Any:
        cursor = self.raw.cursor()
        rows = [_params(p) for p in seq]
        if rows:
            cursor.executemany(translate(sql), rows)
        return cursor

    @property
    def in_transaction(self) -> bool:
        import psycopg.pq

        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


def connect_postgres(
    url: str,
    streaming: bool = False,
    application: str = "cmsod",
    lease_s: float = 15.0,
    idle_timeout: bool = True,
) -> PgConnection:
    """A connection that cannot hold the other daemons up past a third of `lease_s`.

    A daemon frozen (SIGSTOP) or cut off inside a write transaction holds the write lock and
    its rows: every other daemon's exclusive transaction (heartbeat, take-over) and, queued
    behind that, every claim would wait for it, until TCP gave up (hours). So the server ends
    a session left idle in a transaction for lease/3 (`idle_in_transaction_session_timeout`:
    rolled back, locks released; `timed_out` tells it on the client), and both ends probe the
    connection (keepalives, tcp_user_timeout) so a peer cut off is dropped within about
    lease/3. `idle_timeout=False` for a streamed search: a slow HTTP client legitimately
    leaves its read idle between chunks, and a read holds no lock another daemon's reads or
    writes wait for."""
    import psycopg  # only when a PostgreSQL URL is configured
    from psycopg.conninfo import conninfo_to_dict

    probe_s = max(1, round(lease_s / 9))  # dead after idle + 3 probes: ~4/9 of the lease
    user_timeout_ms = int(lease_s * 1000 / 3)
    idle_ms = user_timeout_ms if idle_timeout else 0
    options = " ".join(
        [
            str(conninfo_to_dict(url).get("options", "")),  # the URL's own: ours, after, win
            f"-c idle_in_transaction_session_timeout={idle_ms}",
            f"-c tcp_keepalives_idle={probe_s} -c tcp_keepalives_interval={probe_s}",
            f"-c tcp_keepalives_count=3 -c tcp_user_timeout={user_timeout_ms}",
        ]
    ).strip()
    raw = psycopg.connect(
        url,
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
        application_name=application,
        connect_timeout=10,
        options=options,
        keepalives=1,
        keepalives_idle=probe_s,
        keepalives_interval=probe_s,
        keepalives_count=3,
        tcp_user_timeout=user_timeout_ms,
    )
    return PgConnection(raw, streaming)


def rolled_back(exc: BaseException, conn: PgConnection | None, committing: bool) -> bool:
    """`exc` ended a transaction that certainly did not commit, so it may simply run again on
    a new connection: the server ended it (idle past its timeout: the daemon was frozen or
    starved in it), which it says even when the statement that found out was the COMMIT; or
    the connection was lost before the COMMIT was sent. (psycopg says "connection lost" with
    no SQLSTATE for the former too when the statement was pipelined: `executemany`.)"""
    import psycopg

    if getattr(exc, "sqlstate", None) == "25P03":
        return True
    lost = conn is not None and conn.raw.broken
    return isinstance(exc, psycopg.OperationalError) and lost and not committing
