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


def connect_postgres(url: str, streaming: bool = False, application: str = "cmsod") -> PgConnection:
    import psycopg  # only when a PostgreSQL URL is configured

    raw = psycopg.connect(
        url,
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
        application_name=application,
        connect_timeout=10,
    )
    return PgConnection(raw, streaming)
