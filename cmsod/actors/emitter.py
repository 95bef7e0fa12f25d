"""The event emitter: drains the event outbox to the sink in commit order (so in order per
schedule), marking rows sent only after the sink confirmed them: at least once."""

from __future__ import annotations

from itertools import groupby

import trio

from cmsod import log
from cmsod.actors.context import Context
from cmsod.errors import PeerError
from cmsod.store import ops

BATCH = 500
BACKOFF_MAX_S = 60.0


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    backoff = 0.5
    while True:
        figures = ctx.beat("emitter")
        rows = await ctx.store.read(ops.pending_events, BATCH)
        try:
            # consecutive rows of one topic go together; order across topics is kept too
            for topic, group in groupby(rows, key=lambda r: r[2]):
                batch = list(group)
                await ctx.sink.publish(topic, [bytes(r[3]) for r in batch])
                await ctx.store.tx(ops.mark_events_sent, [r[0] for r in batch])
                figures.done += len(batch)
        except PeerError as exc:
            figures.errors += 1
            figures.last_error = str(exc)
            log.warning("events.publish_failed", reason=str(exc), retry_in_s=backoff)
            await trio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)
            continue
        backoff = 0.5
        if len(rows) < BATCH:
            await ctx.bells.emitter.wait(10.0)
