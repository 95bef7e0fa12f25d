"""A PostgreSQL for the tests: the server named by CMSOD_TEST_POSTGRES (a DSN), else a
throwaway cluster made with the installed server binaries (initdb, pg_ctl) in a temporary
folder, stopped and removed at the end. With neither, PostgreSQL tests are skipped, saying how
to run them.

Isolation: one database per test session (dropped at its end), one schema per test within it
(search_path in the test's URL). A fresh schema migrated from nothing costs a few tens of ms;
CREATE DATABASE ... TEMPLATE costs more (PostgreSQL 15 copies through its WAL).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

HOW = (
    "PostgreSQL tests need a server: set CMSOD_TEST_POSTGRES=postgresql://user@host:port/db"
    " (a role that may CREATE DATABASE), or install the server binaries (initdb, pg_ctl;"
    " Debian: apt-get install postgresql) for a throwaway cluster"
)


class Unavailable(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def throwaway_cluster() -> str:
    """initdb + pg_ctl start in a temporary folder (as user postgres when we are root: initdb
    refuses root); the cluster is stopped and removed when the interpreter exits."""
    bin_dir = _binaries()
    if bin_dir is None:
        raise Unavailable(HOW)
    folder = Path(tempfile.mkdtemp(prefix="cmsod-pg-"))
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        os.chmod(folder, 0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-N")
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            f"-F -p {port} -k {folder} -c listen_addresses=127.0.0.1",
            "start",
        )
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise Unavailable(f"could not start a throwaway PostgreSQL ({exc}); {HOW}") from None

    def stop() -> None:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def with_schema(dsn: str, schema: str) -> str:
    parts = urlsplit(dsn)
    option = quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&options={option}" if parts.query else f"options={option}"
    return urlunsplit(parts._replace(query=query))


class Server:
    """One database for this session; `fresh()` gives a URL to an empty schema of its own."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.admin_dsn = dsn
        self.database = f"cmsod_test_{os.getpid()}"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.database}")
            conn.execute(f"CREATE DATABASE {self.database}")
        self.dsn = with_database(dsn, self.database)
        self.counter = itertools.count(1)

    def fresh(self) -> str:
        import psycopg

        schema = f"t{next(self.counter)}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return with_schema(self.dsn, schema)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")


_server: Server | None = None
_failure: str | None = None


def server() -> Server:
    """The session's server, started on first use; raises Unavailable (with HOW)."""
    global _server, _failure
    if _server is not None:
        return _server
    if _failure is not None:
        raise Unavailable(_failure)
    try:
        dsn = os.environ.get("CMSOD_TEST_POSTGRES") or throwaway_cluster()
        _server = Server(dsn)
    except Unavailable as exc:
        _failure = str(exc)
        raise
    except Exception as exc:  # a DSN that does not answer
        _failure = f"PostgreSQL at CMSOD_TEST_POSTGRES did not answer ({exc}); {HOW}"
        raise Unavailable(_failure) from None
    atexit.register(_server.drop)
    return _server
