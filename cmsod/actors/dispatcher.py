"""The dispatcher: sends each element's work flow to the orchestrator at `start - lead_time`.

At most once: the intent (with its X-TransactionId key) is committed before the call and the
orchestrator's request id after it. On start-up, elements caught between the two are
reconciled (`ops.reconcile_dispatches`), never blindly re-sent.
"""

from __future__ import annotations

import trio

from cmsod import log
from cmsod.actors.context import Context
from cmsod.errors import PeerError
from cmsod.store import ops

BATCH = 500


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    caught = await ctx.store.tx(ops.reconcile_dispatches, ctx.config.so.resend_unconfirmed)
    for name in caught:
        log.warning(
            "element.reconciled",
            vnf=name,
            action="resend" if ctx.config.so.resend_unconfirmed else "marked Error",
        )
    limiter = trio.CapacityLimiter(ctx.config.dispatcher.max_concurrent)
    task_status.started()
    async with trio.open_nursery() as calls:
        while not ctx.stopping.is_set():
            figures = ctx.beat("dispatcher")
            cfg = ctx.config.dispatcher
            limiter.total_tokens = cfg.max_concurrent
            lead_ms = int(cfg.lead_time_s * 1000)
            due = await ctx.store.read(ops.due_elements, ctx.clock.now_ms() + lead_ms, BATCH)
            for element in due:
                job = await ctx.store.tx(
                    ops.begin_dispatch,
                    element,
                    int(cfg.misfire_grace_s * 1000),
                    cfg.dispatch_immediate,
                )
                if job is not None:
                    calls.start_soon(send, ctx, job, limiter, figures)
            if len(due) == BATCH:
                continue
            next_ms = await ctx.store.read(ops.next_due_ms)
            wait_s = 3600.0 if next_ms is None else (next_ms - lead_ms - ctx.clock.now_ms()) / 1000
            await ctx.bells.dispatcher.wait(wait_s)
        log.info("dispatcher.draining", in_flight=len(calls.child_tasks))
    ctx.drained.set()
    await trio.sleep_forever()  # stopped, not crashed: wait to be cancelled with the rest


async def send(ctx: Context, job: ops.DispatchJob, limiter: trio.CapacityLimiter, figures) -> None:
    async with limiter:
        try:
            request_id = await ctx.so.dispatch(job.name, job.request, job.key)
        except PeerError as exc:
            figures.errors += 1
            figures.last_error = str(exc)
            await ctx.store.tx(ops.record_dispatch_failed, job.element, str(exc))
            log.warning(
                "element.dispatch_failed",
                schedule_id=job.schedule_id,
                vnf=job.name,
                reason=str(exc),
            )
            return
    await ctx.store.tx(ops.record_dispatched, job.element, request_id)
    figures.done += 1
    log.info(
        "element.dispatched",
        schedule_id=job.schedule_id,
        vnf=job.name,
        so_request_id=request_id,
        key=job.key,
        attempt=job.attempt,
    )
    ctx.bells.poller.ring()
