"""The poller: asks the orchestrator about every triggered element each `interval_s` and
records what changed; the transaction that ends the last element also closes the schedule."""

from __future__ import annotations

import trio

from cmsod import lifecycle, log
from cmsod.actors.context import Context
from cmsod.errors import PeerError
from cmsod.model import PollOutcome
from cmsod.store import ops

CONCURRENT_POLLS = 20


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    limiter = trio.CapacityLimiter(CONCURRENT_POLLS)
    while True:
        figures = ctx.beat("poller")
        started = trio.current_time()
        elements = await ctx.store.read(ops.in_flight)
        async with trio.open_nursery() as polls:
            for element, name, request_id in elements:
                polls.start_soon(poll_one, ctx, limiter, figures, element, name, request_id)
        interval = ctx.config.poller.interval_s
        await ctx.bells.poller.wait(interval - (trio.current_time() - started))


async def poll_one(
    ctx: Context, limiter, figures, element: int, name: str, request_id: str
) -> None:
    async with limiter:
        try:
            answer = await ctx.so.status(request_id)
        except PeerError as exc:  # connection trouble: counted and shown, state unchanged
            figures.errors += 1
            figures.last_error = str(exc)
            outcome = PollOutcome("ConnectionException", str(exc)[:500], connection_error=True)
        else:
            outcome = lifecycle.poll_outcome(
                answer.http_status, answer.request_state, answer.message, answer.finish_time
            )
    status = await ctx.store.tx(ops.record_poll, element, outcome)
    if status is not None:
        figures.done += 1
        log.info("element.finished", vnf=name, status=status.value, so_status=outcome.so_status)
