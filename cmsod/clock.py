"""Wall-clock time for persisted timestamps and schedules, injectable for tests.

trio's clock (what MockClock fakes) is monotonic and has no epoch; schedules are in wall time.
Actors sleep on trio time in steps of at most MAX_STEP_S and re-read `now()`, so a wall-clock
step (NTP) is noticed within one step. `TrioWallClock` maps wall time onto trio time, so a test
under `MockClock(autojump_threshold=0)` runs hours of schedule in milliseconds.
"""

from __future__ import annotations

import time

import trio

MAX_STEP_S = 10.0


class WallClock:
    def now(self) -> float:
        return time.time()

    def now_ms(self) -> int:
        return int(self.now() * 1000)


class TrioWallClock(WallClock):
    """Wall time = the given epoch at creation + elapsed trio time. Create inside `trio.run`."""

    def __init__(self, epoch_s: float) -> None:
        self.offset_s = epoch_s - trio.current_time()

    def now(self) -> float:
        return self.offset_s + trio.current_time()
