"""The optimizer actor: plans schedules in `Pending Schedule` (and, after a restart, those left
`Optimization In Progress`) and records each plan in one transaction."""

from __future__ import annotations

import time

import trio

from cmsod import log
from cmsod.actors.context import Context
from cmsod.optimize.loopback import place_earliest
from cmsod.store import ops

BATCH = 16


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        figures = ctx.beat("optimizer")
        problems = await ctx.store.tx(ops.claim_for_optimization, BATCH)
        for problem in problems:
            began = time.perf_counter()
            plan = place_earliest(problem)
            solve_ms = (time.perf_counter() - began) * 1000
            status = await ctx.store.tx(
                ops.record_plan, problem.key, plan, ctx.config.optimizer.allow_partial
            )
            figures.done += 1
            if status is not None:
                log.info(
                    "schedule.optimized",
                    schedule_id=problem.schedule_id,
                    status=status.value,
                    scheduled=len(plan.placed),
                    not_scheduled=len(plan.unplaced),
                    solve_ms=round(solve_ms, 1),
                )
        if len(problems) < BATCH:
            await ctx.bells.optimizer.wait(ctx.config.optimizer.interval_s)
