"""Supervision: a crashed actor is restarted with backoff; too many crashes in the window and
the supervisor gives up, which ends the daemon. The log format is checked here too."""

from __future__ import annotations

import logging

import pytest
import trio

from cmsod import log
from cmsod.actors.supervisor import supervise
from cmsod.config import Config
from cmsod.log import LogfmtFormatter


class Ctx:
    """Just what `supervise` touches."""

    def __init__(self, max_restarts: int = 3) -> None:
        from cmsod.actors.context import ActorFigures

        self.config = Config(
            supervisor=Config().supervisor.__class__(max_restarts=max_restarts, window_s=60)
        )
        self.figures: dict[str, ActorFigures] = {}

    def beat(self, name):
        from cmsod.actors.context import ActorFigures

        return self.figures.setdefault(name, ActorFigures())


async def test_a_crashed_actor_is_restarted(autojump_clock) -> None:
    runs = []
    done = trio.Event()

    async def flaky(ctx, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        runs.append(trio.current_time())
        if len(runs) <= 2:
            raise RuntimeError(f"crash {len(runs)}")
        done.set()
        await trio.sleep_forever()

    ctx = Ctx()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "flaky", flaky, ctx)
        await done.wait()
        nursery.cancel_scope.cancel()
    assert len(runs) == 3
    assert ctx.figures["flaky"].restarts == 2
    assert ctx.figures["flaky"].last_error == "RuntimeError('crash 2')"
    assert runs[2] - runs[1] > runs[1] - runs[0] > 0  # backoff grows


async def test_too_many_crashes_give_up(autojump_clock) -> None:
    async def broken(ctx, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        raise RuntimeError("always")

    with pytest.RaisesGroup(RuntimeError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "broken", broken, Ctx(max_restarts=2))


async def test_a_failure_before_ready_is_fatal_at_once() -> None:
    async def never_ready(ctx, *, task_status=trio.TASK_STATUS_IGNORED):
        raise OSError("cannot bind")

    with pytest.RaisesGroup(OSError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "never", never_ready, Ctx())


def record(event: str, **fields) -> logging.LogRecord:
    r = logging.LogRecord("cmsod", logging.WARNING, __file__, 1, event, None, None)
    r.event, r.fields = event, fields
    return r


def test_logfmt_records() -> None:
    line = LogfmtFormatter(journal=False).format(
        record("element.dispatched", vnf="node 1", n=3, msg='say "hi"')
    )
    assert line.startswith("ts=") and line.endswith(
        ' level=warning event=element.dispatched vnf="node 1" n=3 msg="say \\"hi\\""'
    )
    journal = LogfmtFormatter(journal=True).format(record("watchdog.missed", stalled="poller"))
    assert journal == "<4>level=warning event=watchdog.missed stalled=poller"
    multi = LogfmtFormatter(journal=True).format(record("x.y", text="two\nlines"))
    assert "\n" not in multi


def test_journal_detection(monkeypatch, tmp_path) -> None:
    import os
    import sys

    with open(tmp_path / "err", "w") as err:
        st = os.fstat(err.fileno())
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert log.stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not log.stderr_is_journal()
