"""The tickets actor: opens the change tickets of accepted schedules (one per group per
`vnfs_per_ticket` elements, as CMSO), then moves the schedule to `Scheduled`."""

from __future__ import annotations

import trio

from cmsod import log
from cmsod.actors.context import Context
from cmsod.errors import PeerError
from cmsod.store import ops

BATCH = 16
RETRY_S = 5.0
SWEEP_S = 10.0  # a safety net: an approval rings the doorbell at once


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        figures = ctx.beat("tickets")
        work = await ctx.store.read(ops.accepted_schedules, BATCH)
        failed = False
        for item in work:
            try:
                change_ids = await open_tickets(ctx, item)
            except PeerError as exc:
                figures.errors += 1
                figures.last_error = str(exc)
                figures.peer_failing = True
                log.warning("ticket.create_failed", schedule_id=item.schedule_id, reason=str(exc))
                failed = True
                continue
            if await ctx.store.tx(ops.record_tickets, item.schedule, change_ids):
                figures.done += 1
                figures.peer_failing = False
                log.info(
                    "schedule.scheduled",
                    schedule_id=item.schedule_id,
                    tickets=len(set(change_ids.values())),
                )
                ctx.bells.dispatcher.ring()
        if failed:
            await trio.sleep(RETRY_S)
        elif len(work) < BATCH:
            await ctx.bells.tickets.wait(SWEEP_S)


async def open_tickets(ctx: Context, item: ops.TicketWork) -> dict[int, str]:
    per_ticket = ctx.config.tickets.vnfs_per_ticket
    change_ids: dict[int, str] = {}
    for group_id, elements in item.groups:
        for i in range(0, len(elements), per_ticket):
            chunk = elements[i : i + per_ticket]
            starts = [e[2] for e in chunk if e[2] is not None]
            ends = [e[3] for e in chunk if e[3] is not None]
            change_id = await ctx.tm.create(
                item.schedule_id,
                group_id,
                [e[1] for e in chunk],
                item.user_id,
                min(starts) if starts else None,
                max(ends) if ends else None,
            )
            log.debug(  # per ticket: chatter; schedule.scheduled gives the count
                "ticket.created", schedule_id=item.schedule_id, change_id=change_id, vnfs=len(chunk)
            )
            change_ids.update({e[0]: change_id for e in chunk})
    return change_ids
