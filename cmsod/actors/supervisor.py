"""One-for-one supervision: a crashed actor is restarted with backoff; more than
`max_restarts` crashes within `window_s` and the supervisor gives up, which ends the daemon
(systemd's Restart=on-failure takes it from there).

Also here: the watchdog, which pings systemd only while every actor's loop keeps turning.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from cmsod import log, systemd
from cmsod.actors.context import Context

Actor = Callable[..., Awaitable[None]]
# An actor whose loop has not turned for this long is wedged: the watchdog stops pinging and
# `cmsoctl status` says unhealthy. Every loop turns at least every clock.MAX_STEP_S.
STALL_S = 120.0


async def supervise(
    name: str,
    actor: Actor,
    ctx: Context,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    crashes: deque[float] = deque()
    started = False
    while True:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(actor, ctx)
                if not started:
                    started = True
                    log.info("actor.started", actor=name)
                    task_status.started()
            return
        except Exception as exc:  # never BaseException: Cancelled must pass
            if not started:
                raise  # failed before it was ever ready: the daemon cannot start
            figures = ctx.beat(name)
            figures.restarts += 1
            figures.last_error = repr(_cause(exc))[:500]
            now = trio.current_time()
            crashes.append(now)
            sup = ctx.config.supervisor
            while crashes and crashes[0] < now - sup.window_s:
                crashes.popleft()
            if len(crashes) > sup.max_restarts:
                log.error(
                    "supervisor.giving_up", actor=name, crashes=len(crashes), window_s=sup.window_s
                )
                raise
            backoff = min(sup.backoff_max_s, 0.1 * 2 ** (len(crashes) - 1)) * random.uniform(
                0.8, 1.2
            )
            log.error("actor.crashed", exc_info=True, actor=name, restart_in_s=round(backoff, 2))
            await trio.sleep(backoff)
            log.warning("actor.restarted", actor=name, restarts=figures.restarts)


def _cause(exc: BaseException) -> BaseException:
    """The one exception inside the nursery's ExceptionGroup wrapping, for the operator."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def stalled_actors(ctx: Context, now: float, stall_s: float) -> list[str]:
    return [name for name, f in ctx.figures.items() if now - f.heartbeat > stall_s]


async def watchdog(ctx: Context, interval_s: float, stall_s: float) -> None:
    """Ping WATCHDOG=1 every `interval_s` while no actor has been silent for `stall_s`."""
    while True:
        stalled = stalled_actors(ctx, trio.current_time(), stall_s)
        if stalled:
            log.error("watchdog.missed", stalled=",".join(sorted(stalled)))
        else:
            systemd.notify("WATCHDOG=1")
        await trio.sleep(interval_s)
