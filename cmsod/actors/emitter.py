"""The event emitter: drains the event outbox to the sink in commit order, in batches of up to
`events.batch_size` events of any schedules, each event with its schedule id as its key. A
batch goes only once the one before it is confirmed, and the sink takes a batch's events in
order, so a schedule's events are never reordered. Exactly what the sink confirmed is marked
sent (at least once): after a partial publish the next batch starts with the first event it
did not take.

A failing sink is retried with backoff (0.5 s doubling up to `events.retry_max_s`), back to
0.5 s as soon as the sink takes any event; the outbox keeps everything meanwhile and no other
actor waits for it. A sink that refuses for good (PartialDelivery.permanent: no such topic,
no permission) is logged as an error and tried again every `retry_max_s`, never dropped;
only that topic waits (events.route_by): the other topics' events go on.

An event whose eventSchema/eventSchemaVersion the emitter does not know raises
`UnknownEventSchema`, is logged as an error with its id and kept, refused, in the outbox
(seed decision 3): never published half-formed, never silently dropped.

Live watchers (`io.cmsod.Events.Watch`) are fed apart (`feed`), from the stored events rather
than the outbox, so that a watcher on any daemon sees every event once, in order per schedule,
whichever daemon publishes: each new event as soon as this daemon commits or another's commit
rings its doorbell (LISTEN/NOTIFY), never waited for.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from cmsod import cmevents, log
from cmsod.actors.context import WATCH_QUEUE, ActorFigures, Context
from cmsod.cmevents import UnknownEventSchema
from cmsod.errors import PeerError
from cmsod.peers.sinks import PartialDelivery
from cmsod.store import outboxes

FIRST_RETRY_S = 0.5


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
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, ctx)
        task_status.started()
        await drain(ctx)


async def drain(ctx: Context) -> None:
    """The outbox to the sink, while this daemon holds the "events" lease."""
    backoff = FIRST_RETRY_S
    refused_until: dict[str, float] = {}  # topics the sink refused for good: when to try again
    while True:
        figures = ctx.beat("emitter")
        if "events" not in ctx.store.held_leases:  # another daemon publishes (fleet.py)
            if ctx.flush_asked_at is not None:
                ctx.flushed.set()  # stopping: that daemon sends what this one committed
            await ctx.bells.emitter.wait(10.0)
            continue
        batch = ctx.config.events.batch_size
        pass_began = trio.current_time()
        rows = await ctx.store.read(outboxes.pending_events, batch * 10)
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
                await ctx.store.tx(outboxes.refuse_event, seq, str(exc))
        rows = [r for r in rows if r[0] in heads]
        by_topic: dict[str, list] = {}  # (order binds within a schedule, so within a topic)
        for row in rows:
            by_topic.setdefault(row[2], []).append(row)
        now = trio.current_time()
        refused_until = {t: until for t, until in refused_until.items() if until > now}
        batches = [  # a topic refused lately waits out its retry_max_s; the others go
            (topic, topic_rows[i : i + batch])
            for topic, topic_rows in by_topic.items()
            if topic not in refused_until
            for i in range(0, len(topic_rows), batch)
        ]
        failure, refused = await publish(ctx, figures, batches)
        for topic, why in refused.items():  # refused until someone acts (a topic, an ACL)
            wait = ctx.config.events.retry_max_s
            refused_until[topic] = now + wait
            figures.errors += 1
            figures.last_error = str(why)
            log.error("events.sink_refused", topic=topic, reason=str(why), retry_in_s=wait)
        figures.peer_failing = bool(refused_until) or failure is not None
        if failure is None:
            backoff = FIRST_RETRY_S
        else:
            if isinstance(failure, PartialDelivery) and failure.delivered:
                backoff = FIRST_RETRY_S  # it took some: the sink is back, retry the rest soon
            figures.errors += 1
            figures.last_error = str(failure)
            log.warning("events.publish_failed", reason=str(failure), retry_in_s=backoff)
            await trio.sleep(backoff)
            backoff = min(ctx.config.events.retry_max_s, backoff * 2)
            continue
        if by_topic and all(topic in refused_until for topic in by_topic):
            # nothing could go: wait for the first refused topic's next try (or new events)
            await ctx.bells.emitter.wait(min(refused_until.values()) - trio.current_time())
        elif len(rows) < batch * 10:
            await ctx.bells.emitter.wait(10.0)


async def publish(
    ctx: Context, figures: ActorFigures, batches: list[tuple[str, list[tuple[int, str, str, Any]]]]
) -> tuple[PeerError | None, dict[str, PeerError]]:
    """The batches to the sink one after another, each event keyed by its schedule id, until
    one is not taken whole; returns that failure, or None, and the topics the sink refused for
    good. Such a refusal stops only its topic (order binds within a topic): its later batches
    are skipped this pass and the other topics' go on. What the sink took (for a partial
    publish, the first n) is marked sent in the store while the next batch is on the wire;
    all of it is committed before this returns, so the next read starts at the first event
    not taken."""
    refused: dict[str, PeerError] = {}
    async with trio.open_nursery() as marking:
        for topic, rows in batches:
            if topic in refused:
                continue
            failure: PeerError | None = None
            try:
                with ctx.metrics.call("sink", "publish"):
                    delivered = await ctx.sink.publish(topic, [(r[1], bytes(r[3])) for r in rows])
            except PartialDelivery as exc:
                delivered, failure = exc.delivered, exc
            except PeerError as exc:
                delivered, failure = 0, exc
            if delivered:
                marking.start_soon(mark_sent, ctx, figures, [r[0] for r in rows[:delivered]])
            if isinstance(failure, PartialDelivery) and failure.permanent:
                refused[topic] = failure
            elif failure is not None:
                return failure, refused
    return None, refused


async def mark_sent(ctx: Context, figures: ActorFigures, seqs: list[int]) -> None:
    await ctx.store.tx(outboxes.mark_events_sent, seqs)
    figures.done += len(seqs)


async def feed(ctx: Context) -> None:
    """The watchers' events: read from the stored events (outboxes.Tail) while anyone watches,
    a bounded chunk at a time, each offered to every watcher that wants it; a watcher too far
    behind is dropped, never waited for."""
    while True:
        tail = ctx.tail
        if not ctx.watchers or tail is None:
            ctx.tail = None  # the next watcher starts where the events are then
            await ctx.bells.watch.wait(10.0)
            continue
        rows = await ctx.store.read(outboxes.read_tail, tail.top, WATCH_QUEUE)
        if rows:
            tail.top = rows[-1][0]
        for _, schedule_id, body in rows:
            try:
                head = msgspec.json.decode(body, type=Head)
                check_schema(head)
            except (UnknownEventSchema, msgspec.DecodeError):
                continue  # refused: never published, never watched (the drain logs it)
            offer(ctx, schedule_id, head.eventType, bytes(body))
        if len(rows) < WATCH_QUEUE:  # all there is read: wait for the next commit
            await ctx.bells.watch.wait(10.0)


def offer(ctx: Context, schedule_id: str, event_type: str, body: bytes) -> None:
    for watcher in list(ctx.watchers):
        if not watcher.wants(schedule_id, event_type):
            continue
        try:
            watcher.send.send_nowait(body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ctx.watchers.discard(watcher)  # its client went away
        except trio.WouldBlock:
            ctx.watchers.discard(watcher)
            ctx.watchers_dropped += 1
            watcher.dropped = True
            watcher.send.close()
            log.warning("watch.dropped", reason="too slow: its queue of events was full")
