"""Fixtures: an in-process daemon on a real SQLite file and a real Unix socket.

Under `autojump_clock` (MockClock, autojump_threshold=0) the daemon's wall clock follows trio
time and the store runs inline (a worker thread would let virtual time race ahead, trio issue
456), so hours of schedule pass in milliseconds of real time.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import trio
import trio.testing

from cmsod import config, daemon
from cmsod.actors.context import Context
from cmsod.clock import TrioWallClock
from cmsod.executor import InlineExecutor
from cmsod.peers.so import Orchestrator
from tests import pg

EPOCH = datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
# Virtual seconds between looks at a schedule in `wait_for` (costs no real time under MockClock).
LOOK_EVERY_S = 1.0


# Under the real clock (tests of threads and PostgreSQL sessions, where nothing rings): a short
# look, bounded, instead of a virtual second that would be a real one.
REAL_LOOK_EVERY_S = 0.02
REAL_WAIT_MAX_S = 30.0


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, within_s: float | None = None
) -> None:
    """Look at `condition` until it holds: every LOOK_EVERY_S of virtual time under MockClock
    (a week at most unless `within_s`), every REAL_LOOK_EVERY_S under the real clock
    (REAL_WAIT_MAX_S at most unless `within_s`)."""
    virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
    if within_s is None:
        within_s = 7 * 86400 if virtual else REAL_WAIT_MAX_S
    deadline = trio.current_time() + within_s
    while True:
        if await condition():
            return
        assert trio.current_time() < deadline, f"never: {what}"
        await trio.sleep(LOOK_EVERY_S if virtual else REAL_LOOK_EVERY_S)


class ControlClient:
    """A trio client of the control socket: one connection, requests one after another."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_raw(self) -> bytes | None:
        """The next NUL-terminated message, or None if the daemon closed the connection."""
        while b"\0" not in self.buffer:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                return None
            self.buffer += data
        end = self.buffer.index(b"\0")
        message = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return message

    async def call(self, method: str, **parameters: Any) -> dict[str, Any]:
        await self.send_raw(
            msgspec.json.encode({"method": method, "parameters": parameters}) + b"\0"
        )
        reply = await self.receive_raw()
        assert reply is not None, "daemon closed the connection"
        return msgspec.json.decode(reply)

    async def ok(self, method: str, **parameters: Any) -> dict[str, Any]:
        reply = await self.call(method, **parameters)
        assert "error" not in reply, reply
        return reply["parameters"]

    async def schedule(self, schedule_id: str) -> dict[str, Any]:
        return (await self.ok("io.cmsod.Schedules.Get", scheduleId=schedule_id))["schedule"]

    async def wait_for(self, schedule_id: str, *statuses: str) -> dict[str, Any]:
        """The schedule's view once it is in one of `statuses`."""
        views: list[dict[str, Any]] = []

        async def reached() -> bool:
            views.append(await self.schedule(schedule_id))
            return views[-1]["status"] in statuses

        await wait_until(reached, f"{schedule_id} in {statuses}")
        return views[-1]

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Daemon:
    ctx: Context
    socket: Path
    cancel: trio.CancelScope

    async def connect(self) -> ControlClient:
        return ControlClient(await trio.open_unix_socket(str(self.socket)))

    def element_statuses(self, view: dict[str, Any]) -> dict[str, str]:
        return {
            e["vnfName"]: e["status"]
            for g in view["groups"]
            for e in g["changeManagementSchedules"]
        }


def daemon_config(state_dir: Path, **overrides: Any) -> config.Config:
    env = {
        "CMSOD_POLLER__INTERVAL_S": "30",
        "CMSOD_SO__SIMULATED_DURATION_S": "120",
        "CMSOD_CONTROL__IDLE_TIMEOUT_S": "60",
        # PostgreSQL: a heartbeat (a write) every 20 virtual min, not every 5 s of days
        "CMSOD_STORE__LEASE_S": "3600",
    }
    if os.environ.get("CMSOD_STORE__URL"):  # the `backend` fixture's PostgreSQL schema
        env["CMSOD_STORE__URL"] = os.environ["CMSOD_STORE__URL"]
    env.update({f"CMSOD_{k.upper()}": str(v) for k, v in overrides.items()})
    return config.load(None, env=env, state_dir=str(state_dir))


async def start_daemon(
    nursery: trio.Nursery,
    state_dir: Path,
    so: Orchestrator | None = None,
    clock: TrioWallClock | None = None,
    **overrides: Any,
) -> Daemon:
    """A daemon on `state_dir`; config keys as `section__key=value`, e.g. `poller__interval_s=5`.
    Its wall clock starts at EPOCH, unless it shares another daemon's `clock` (hosts in sync)."""
    cfg = daemon_config(state_dir, **overrides)
    ctx = daemon.build_context(cfg, clock or TrioWallClock(EPOCH.timestamp()), InlineExecutor())
    if so is not None:
        ctx.so = so
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await daemon.run(ctx, task_status=task_status)

    began = trio.current_time()
    path = await nursery.start(run)
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        # Start-up must not wait on a worker thread: under autojump that lets virtual time
        # race ahead (trio issue 456) and every "now" in the test shifts.
        assert trio.current_time() == began, (
            f"start-up took {trio.current_time() - began} virtual s"
        )
    return Daemon(ctx, path, scope)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on each store: SQLite in its tmp_path, and PostgreSQL (a fresh schema of
    the session's database, tests/pg.py) through CMSOD_STORE__URL, which the in-process
    daemons (daemon_config) and the real daemon processes (tests/procs.py) both read.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("backend")`."""
    if request.param == "postgres":
        try:
            url = pg.server().fresh()
        except pg.Unavailable as exc:
            if os.environ.get("CMSOD_REQUIRE_POSTGRES"):  # .ci/run: a skip would hide it
                pytest.fail(str(exc))
            pytest.skip(str(exc))
        monkeypatch.setenv("CMSOD_STORE__URL", url)
    else:
        monkeypatch.delenv("CMSOD_STORE__URL", raising=False)
    return request.param


@pytest.fixture
async def cmsod(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start_daemon(nursery, tmp_path)
    yield d
    d.cancel.cancel()


@pytest.fixture
async def client(cmsod: Daemon) -> AsyncIterator[ControlClient]:
    c = await cmsod.connect()
    yield c
    await c.aclose()


# -- every CM event the suite causes must follow the shipped schema -------------------------

SCHEMA_PATH = Path(__file__).parent.parent / "docs" / "schemas" / "cm-event-1.0.schema.json"
EVENT_SCHEMA = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
validated = {"events": 0}


def validate_event(event: dict[str, Any]) -> None:
    EVENT_SCHEMA.validate(event)
    validated["events"] += 1


@pytest.fixture(autouse=True)
def events_follow_the_schema(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is None:
        return
    for path in sorted(Path(tmp).rglob("*.jsonl*")):
        for line in path.read_text().splitlines():
            validate_event(json.loads(line))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"{validated['events']} CM events validated against {SCHEMA_PATH.name}"
    )


def store_rows(state_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a query (in the shared dialect) on the store a test's daemon used: its SQLite
    file, or the PostgreSQL schema of the `backend` fixture."""
    url = os.environ.get("CMSOD_STORE__URL")
    if not url:
        import sqlite3

        with sqlite3.connect(state_dir / "cmsod.sqlite3") as db:
            return db.execute(sql, params).fetchall()
    from cmsod.store.backend import connect_postgres

    conn = connect_postgres(url)
    try:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()
