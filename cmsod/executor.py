"""Where blocking work runs: a worker thread (production) or inline (MockClock tests).

A task blocked in `trio.to_thread.run_sync` counts as blocked for the autojump clock, so virtual
time races ahead while the thread works (trio issue 456); time-travel tests run blocking work
inline instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


class ThreadExecutor:
    """One worker thread at a time: serial use of what it guards (an SQLite connection)."""

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(1)

    async def __call__(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)


class InlineExecutor:
    async def __call__(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        return fn()


Executor = ThreadExecutor | InlineExecutor
