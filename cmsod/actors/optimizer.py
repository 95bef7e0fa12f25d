"""The optimizer actor: plans schedules in `Pending Schedule` (and, after a restart, those left
`Optimization In Progress`) with the exact planner, and records each plan in one transaction.
Solving runs off the trio thread (`ctx.compute`), so a 100,000-element plan never stalls the
control socket or a dispatch."""

from __future__ import annotations

import functools

import trio

from cmsod import log
from cmsod.actors.context import Context
from cmsod.store import ops

BATCH = 16


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        figures = ctx.beat("optimizer")
        problems = await ctx.store.tx(ops.claim_for_optimization, BATCH, ctx.planning.inventory)
        for problem in problems:
            plan = await ctx.compute(functools.partial(ctx.planning.plan, problem))
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
                    objective=plan.objective,
                    solve_ms=round(plan.solve_ms, 1),
                )
        if len(problems) < BATCH:
            await ctx.bells.optimizer.wait(ctx.config.optimizer.interval_s)
