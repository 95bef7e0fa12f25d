"""The event emitter: drains the event outbox to the sink in commit order, one schedule's run
of events at a time (so never reordered within a schedule), marking sent exactly what the
sink confirmed: at least once. A failing sink is retried with backoff; the outbox keeps
everything meanwhile and no other actor waits for it.

An event whose eventSchema/eventSchemaVersion the emitter does not know raises
`UnknownEventSchema`, is logged as an error with its id and kept, refused, in the outbox
(seed decision 3): never published half-formed, never silently dropped.

Live watchers (`io.cmsod.Events.Watch`) get each new event as it is read, without waiting.
"""

from __future__ import annotations

from itertools import groupby

import msgspec
import trio

from cmsod import cmevents, log
from cmsod.actors.context import Context
from cmsod.cmevents import UnknownEventSchema
from cmsod.errors import PeerError
from cmsod.peers.sinks import PartialDelivery
from cmsod.store import ops

BACKOFF_MAX_S = 60.0


class Head(msgspec.Struct):
    eventId: str
    eventCorrelationId: str
    eventType: str
    eventSchema: str
    eventSchemaVersion: str


def check_schema(head: Head) -> None:
    if (head.eventSchema, head.eventSchemaVersion) not in cmevents.KNOWN_SCHEMAS:
        raise UnknownEventSchema(
            f"event {head.eventId}: unknown eventSchema {head.eventSchema!r} "
            f"version {head.eventSchemaVersion!r}; known: {sorted(cmevents.KNOWN_SCHEMAS)}"
        )


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    watched = await ctx.store.read(ops.last_event_seq)  # watchers see what comes from now on
    task_status.started()
    backoff = 0.5
    while True:
        figures = ctx.beat("emitter")
        batch = ctx.config.events.batch_size
        pass_began = trio.current_time()
        rows = await ctx.store.read(ops.pending_events, batch * 10)
        if not rows and ctx.flush_asked_at is not None and pass_began >= ctx.flush_asked_at:
            ctx.flushed.set()  # stopping, and everything committed before the ask is out
        heads = {}
        for seq, _, _, body in rows:
            try:
                heads[seq] = msgspec.json.decode(body, type=Head)
                check_schema(heads[seq])
            except (UnknownEventSchema, msgspec.DecodeError) as exc:
                heads.pop(seq, None)
                figures.errors += 1
                log.error("events.refused", seq=seq, reason=str(exc))
                await ctx.store.tx(ops.refuse_event, seq, str(exc))
        rows = [r for r in rows if r[0] in heads]
        watched = fan_out(ctx, rows, heads, watched)
        try:
            for (topic, schedule_id), group in groupby(rows, key=lambda r: (r[2], r[1])):
                run_rows = list(group)
                for i in range(0, len(run_rows), batch):
                    chunk = run_rows[i : i + batch]
                    try:
                        with ctx.metrics.call("sink", "publish"):
                            delivered = await ctx.sink.publish(
                                topic, schedule_id, [bytes(r[3]) for r in chunk]
                            )
                    except PartialDelivery as exc:
                        delivered = exc.delivered
                        if delivered:
                            await ctx.store.tx(
                                ops.mark_events_sent, [r[0] for r in chunk[:delivered]]
                            )
                            figures.done += delivered
                        raise
                    await ctx.store.tx(ops.mark_events_sent, [r[0] for r in chunk[:delivered]])
                    figures.done += delivered
                    figures.peer_failing = False
        except PeerError as exc:
            figures.errors += 1
            figures.last_error = str(exc)
            figures.peer_failing = True
            log.warning("events.publish_failed", reason=str(exc), retry_in_s=backoff)
            await trio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)
            continue
        backoff = 0.5
        if len(rows) < batch * 10:
            await ctx.bells.emitter.wait(10.0)


def fan_out(ctx: Context, rows: list, heads: dict[int, Head], watched: int) -> int:
    """Offer events newer than `watched` to every watcher; drop one that is too far behind."""
    for seq, _, _, body in rows:
        if seq <= watched:
            continue
        watched = seq
        head = heads[seq]
        for watcher in list(ctx.watchers):
            if not watcher.wants(head.eventCorrelationId, head.eventType):
                continue
            try:
                watcher.send.send_nowait(bytes(body))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                ctx.watchers.discard(watcher)  # its client went away
            except trio.WouldBlock:
                ctx.watchers.discard(watcher)
                ctx.watchers_dropped += 1
                watcher.dropped = True
                watcher.send.close()
                log.warning("watch.dropped", reason="too slow: its queue of events was full")
    return watched
