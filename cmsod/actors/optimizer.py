"""The optimizer actor: plans schedules in `Pending Schedule` (and, after a restart, those left
`Optimization In Progress`) with the exact planner, and records each plan in one transaction.
Solving runs off the trio thread (`ctx.compute`), so a 100,000-element plan never stalls the
control socket or a dispatch."""

from __future__ import annotations

import functools

import trio

from cmsod import log
from cmsod.actors import tickets
from cmsod.actors.context import ActorFigures, Context
from cmsod.errors import PeerError
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.problem import Plan, Problem
from cmsod.peers.tm import TicketsFailed
from cmsod.store import book, schedules

BATCH = 16


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        figures = ctx.beat("optimizer")
        problems = []
        if await ctx.store.read(schedules.any_to_plan, ctx.store.owner):
            problems = await ctx.store.tx(
                schedules.claim_for_optimization, BATCH, ctx.planning.inventory
            )
        for problem in problems:
            if ctx.config.tickets.mode == "http" and not await add_tm_tickets(
                ctx, figures, problem
            ):
                continue
            plan = await ctx.compute(functools.partial(ctx.planning.plan, problem))
            ctx.metrics.solve_duration.observe(plan.solve_ms / 1000)
            status = await ctx.store.tx(
                schedules.record_plan, problem.key, plan, ctx.config.optimizer.allow_partial
            )
            figures.done += 1
            if status is S.PENDING_APPROVAL:  # a new approval deadline for the dispatcher
                ctx.bells.dispatcher.ring()
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
                log.debug(
                    "schedule.optimizer_detail", schedule_id=problem.schedule_id, detail=plan.detail
                )
        if len(problems) < BATCH:
            await ctx.bells.optimizer.wait(ctx.config.optimizer.interval_s)


async def add_tm_tickets(ctx: Context, figures: ActorFigures, problem: Problem) -> bool:
    """http mode: TM's active tickets block elements too (the ticket book already does).
    False when the problem cannot be planned now: TM said FAILED (recorded as the plan), or
    did not answer (it stays `Optimization In Progress`, planned again at the next sweep)."""
    try:
        found = await tickets.unavailability(ctx, problem)
    except TicketsFailed as exc:
        names = [n for g in problem.groups for n in g.elements]
        why = ("TICKETS_FAILED", str(exc))
        plan = Plan({}, dict.fromkeys(names, why), problem.duration_ms, str(exc))
        await ctx.store.tx(schedules.record_plan, problem.key, plan, False)
        return False
    except PeerError as exc:
        figures.errors += 1
        figures.last_error = str(exc)
        log.warning("schedule.plan_waits", schedule_id=problem.schedule_id, reason=str(exc))
        return False
    problem.busy = book.merge_busy(problem.busy, found)
    return True
