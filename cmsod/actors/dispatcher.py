"""The dispatcher: sends each element's work flow to the orchestrator at `start - lead_time`,
once the gates let it go (`cmsod.gates`: its change ticket, as `tickets.gate_for` found it, the
misfire grace, ...). It also keeps the other deadline of a plan: a schedule left pending
approval past its approval timeout expires (`expire_approvals`).

At most once: the intents of a due batch (each with its X-TransactionId key) are committed in
one transaction before any call, and the answers are committed after, in batches, by the
recorder task. On start-up, elements caught between the two are reconciled
(`dispatch.reconcile_dispatches`), never blindly re-sent. A call that never reached the
orchestrator (`NotDelivered`) is retried until the element's misfire grace ends; one that was
sent but got no answer (`Unconfirmed`) is re-sent with the same key only where the
configuration says the orchestrator de-duplicates, else it fails with a message saying the
work may have started.
"""

from __future__ import annotations

import msgspec
import trio
import trio.lowlevel

from cmsod import alarms, gates, lifecycle, log
from cmsod.actors import tickets
from cmsod.actors.context import ActorFigures, Context
from cmsod.calendars import merged_attributes
from cmsod.errors import NotDelivered, PeerError, Unconfirmed
from cmsod.peers.alerts import AlertSourceUnreachable
from cmsod.store import dispatch, schedules

BATCH = 1000
# PostgreSQL: a due batch another daemon holds now (its schedules' rows, locked while it
# claims them) is looked at again when a commit rings or after this, not in a busy loop.
CLAIM_RETRY_S = 0.05
RETRY_BASE_S = 0.25
# element, SO request id, failure message; neither: released (stopping, nothing was sent)
Result = tuple[int, str | None, str | None]


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    # (What a previous process or a lapsed daemon left between intent and answer was
    # reconciled by the daemon's fleet round before this starts: cmsod/store/fleet.py.)
    limiter = trio.CapacityLimiter(ctx.config.dispatcher.max_concurrent)
    figures = ctx.beat("dispatcher")
    results_in, results_out = trio.open_memory_channel[tuple[dispatch.DispatchJob, Result]](BATCH)
    task_status.started()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, ctx, results_out, figures)
        async with results_in, trio.open_nursery() as calls:
            while not ctx.stopping.is_set():
                figures = ctx.beat("dispatcher")
                if ctx.calendars_reloaded:
                    ctx.calendars_reloaded = False
                    released = await ctx.store.tx(dispatch.release_holds, "calendar")
                    log.info("calendar.holds_released", released=released)
                cfg = ctx.config.dispatcher
                limiter.total_tokens = cfg.max_concurrent
                lead_ms = int(cfg.lead_time_s * 1000)
                # Several daemons on one PostgreSQL: each claims what it can send now, so the
                # others take their share of a burst.
                claim = min(BATCH, cfg.max_concurrent) if ctx.store.postgres else BATCH
                due, jobs, full = await claim_due(ctx, claim)
                for job in jobs:
                    calls.start_soon(send, ctx, job, limiter, results_in.clone())
                if full and (jobs or not ctx.store.postgres):
                    if claim < BATCH:  # let the calls just started take their seats
                        await trio.lowlevel.checkpoint()
                    continue
                expiry_ms = await expire_approvals(ctx)
                next_ms = await ctx.store.read(dispatch.next_due_ms)
                wait_s = (
                    3600.0 if next_ms is None else (next_ms - lead_ms - ctx.clock.now_ms()) / 1000
                )
                if expiry_ms is not None:
                    wait_s = min(wait_s, (expiry_ms - ctx.clock.now_ms()) / 1000)
                if due and not jobs and ctx.store.postgres:
                    wait_s = max(wait_s, CLAIM_RETRY_S)
                await ctx.bells.dispatcher.wait(wait_s)
            log.info("dispatcher.draining", in_flight=len(calls.child_tasks))
    ctx.drained.set()
    await trio.sleep_forever()  # stopped, not crashed: wait to be cancelled with the rest


async def claim_due(
    ctx: Context, claim: int
) -> tuple[list[dispatch.Due], list[dispatch.DispatchJob], bool]:
    """The due work this daemon takes now: at most `claim` elements, earliest first, through
    the gates, their intents committed. Answers what was due, the jobs to send, and whether
    the last read was full (more may be due now).

    PostgreSQL: the schedules another daemon is claiming at this moment are skipped (theirs to
    do). The earliest `claim` due elements may all be theirs while other schedules' are due
    too: then those are read and claimed at once (one more read, only when some were skipped),
    not after a doorbell or CLAIM_RETRY_S."""
    cfg = ctx.config.dispatcher
    lead_ms = int(cfg.lead_time_s * 1000)
    due: list[dispatch.Due] = []
    jobs: list[dispatch.DispatchJob] = []
    skipped: list[int] = []
    full = False
    for _ in range(2):
        limit = claim - len(jobs)
        batch = await ctx.store.read(
            dispatch.due_elements, ctx.clock.now_ms() + lead_ms, limit, skipped
        )
        full = len(batch) == limit
        if not batch:
            break
        due += batch
        ticket = await tickets.gate_for(
            ctx, {d.change_id for d in batch if d.change_id is not None}
        )
        rules = gates.standard(
            ticket,
            int(cfg.misfire_grace_s * 1000),
            cfg.dispatch_immediate,
            gates.CalendarGate(ctx.planning.calendars, ctx.planning.inventory),
            await alarm_gate(ctx, batch),
        )
        claimed = await ctx.store.tx(dispatch.begin_dispatches, [d.element for d in batch], rules)
        jobs += claimed.jobs
        if not claimed.skipped or len(jobs) == claim:
            break
        skipped += claimed.skipped
    return due, jobs, full


async def alarm_gate(ctx: Context, due: list[dispatch.Due]) -> gates.AlarmGate:
    """Ask the alert source about the due batch: each distinct query once (the batch's
    elements share their sites' queries), all at once within `alarms.max_concurrent`."""
    cfg = ctx.config.alarms
    source = ctx.alerts
    if source is None or not cfg.queries:
        return gates.AlarmGate()
    inventory = ctx.planning.inventory
    wanted: set[alarms.Query] = set()
    for d in due:
        data = msgspec.json.decode(d.data, type=dict[str, str]) if d.data else {}
        attributes = merged_attributes(d.name, data, inventory)
        wanted.update(alarms.queries(cfg.queries, d.name, attributes))
    firing: dict[alarms.Query, str] = {}
    failed: dict[alarms.Query, str] = {}
    answered: set[alarms.Query] = set()
    unreachable: list[str] = []

    async def ask(query: alarms.Query, scope: trio.CancelScope) -> None:
        try:
            with ctx.metrics.call("alertmanager", "alerts"):
                found = await source.alerts(query)
        except AlertSourceUnreachable as exc:
            # no connection: the rest would wait for theirs in vain; they fail with this
            failed[query] = str(exc)
            unreachable.append(str(exc))
            scope.cancel()
            return
        except PeerError as exc:
            failed[query] = str(exc)
            return
        answered.add(query)
        what = alarms.firing(found)
        if what is not None:
            firing[query] = what

    # One deadline for the whole batch (one query's worth: a connect and a read), however
    # many queries it has: a burst against an Alertmanager that does not answer is decided
    # within it (by alarms.on_error), not one timeout per max_concurrent queries after another.
    deadline_s = cfg.connect_timeout_s + cfg.read_timeout_s
    with trio.move_on_after(deadline_s) as scope:
        async with trio.open_nursery() as nursery:
            for query in wanted:
                nursery.start_soon(ask, query, scope)
    if scope.cancelled_caught or unreachable:
        why = (
            unreachable[0]
            if unreachable
            else f"Alertmanager at {source.where}: no answer within {deadline_s:g} s"
        )
        for query in wanted:
            if query not in answered and query not in failed:
                failed[query] = why
    state = ctx.alert_source
    if wanted:
        ok = not failed
        if ok != state.ok:
            if ok:
                log.info("alarms.source_ok", url=source.where)
            else:
                log.warning(
                    "alarms.source_failed",
                    reason=next(iter(failed.values())),
                    on_error=cfg.on_error,
                )
        state.ok, state.asked_ms = ok, ctx.clock.now_ms()
        state.last_error = next(iter(failed.values()), state.last_error)
        state.queries += len(wanted)
        state.firing += len(firing)
    return gates.AlarmGate(
        cfg.queries,
        inventory,
        firing,
        failed,
        fail_open=cfg.on_error == "go",
        recheck_ms=int(cfg.recheck_s * 1000),
    )


async def expire_approvals(ctx: Context) -> int | None:
    """Schedules left pending approval past their timeout expire (schedules.expire_pending);
    answers when the next one would. Driven from the store like the due elements: after a
    restart, the overdue ones expire at once."""
    timeout_ms = int(ctx.config.optimizer.approval_timeout_s * 1000)
    grace_ms = int(ctx.config.dispatcher.misfire_grace_s * 1000)
    expiry_ms = await ctx.store.read(schedules.next_expiry_ms, timeout_ms, grace_ms)
    if expiry_ms is None or expiry_ms > ctx.clock.now_ms():
        return expiry_ms
    await ctx.store.tx(schedules.expire_pending, timeout_ms, grace_ms)
    return await ctx.store.read(schedules.next_expiry_ms, timeout_ms, grace_ms)


async def send(
    ctx: Context,
    job: dispatch.DispatchJob,
    limiter: trio.CapacityLimiter,
    results: trio.MemorySendChannel[tuple[dispatch.DispatchJob, Result]],
) -> None:
    """Call the orchestrator for one element. A call that never reached it is tried again
    with backoff until the element's misfire grace ends (a short outage must not fail a whole
    slot); stopping meanwhile releases the element (nothing was sent), it is not failed."""
    async with results:
        late_ms = max(0, ctx.clock.now_ms() - job.planned_ms)
        ctx.metrics.dispatch_lateness.observe(late_ms / 1000)
        so_cfg = ctx.config.so
        attempt = resends = 0
        while True:
            attempt += 1
            try:
                async with limiter:  # not held while waiting to try again
                    if ctx.store.lease_lapsed():
                        # Frozen past its lease: another daemon may be taking this element
                        # over. Send nothing; release it (a fenced write: refused if it was
                        # taken, so the taker's reconciliation stands; else it goes again).
                        log.warning("element.not_sent", vnf=job.name, reason="lease lapsed")
                        await results.send((job, (job.element, None, None)))
                        return
                    with ctx.metrics.call("so", "dispatch"):
                        request_id = await ctx.so.dispatch(job.name, job.request, job.key)
            except NotDelivered as exc:
                figures = ctx.beat("dispatcher")
                figures.peer_failing, figures.last_error = True, str(exc)
                if attempt == 1:
                    log.warning(
                        "element.dispatch_retrying",
                        schedule_id=job.schedule_id,
                        vnf=job.name,
                        reason=str(exc),
                        until=lifecycle.format_time(job.deadline_ms),
                    )
                left_s = (job.deadline_ms - ctx.clock.now_ms()) / 1000
                if left_s <= 0:
                    failure = f"not dispatched within the misfire grace ({attempt} attempts): {exc}"
                    break
                with trio.move_on_after(
                    min(RETRY_BASE_S * 2 ** min(attempt - 1, 20), so_cfg.retry_max_s, left_s)
                ):
                    await ctx.stopping.wait()
                if ctx.stopping.is_set():
                    await results.send((job, (job.element, None, None)))
                    return
                continue
            except Unconfirmed as exc:
                resends += 1
                if so_cfg.resend_unconfirmed and resends <= so_cfg.connect_retries:
                    continue  # same X-TransactionId: the orchestrator de-duplicates
                failure = (
                    f"{exc}; it may have started the work flow (X-TransactionId {job.key}), "
                    "not re-sent (so.resend_unconfirmed = false): check the orchestrator"
                )
                break
            except PeerError as exc:
                failure = str(exc)
                break
            await results.send((job, (job.element, request_id, None)))
            return
        await results.send((job, (job.element, None, failure)))


async def record(
    ctx: Context,
    results: trio.MemoryReceiveChannel[tuple[dispatch.DispatchJob, Result]],
    figures: ActorFigures,
) -> None:
    """Commit the answers in batches: whatever has arrived goes in one transaction."""
    async with results:
        async for first in results:
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(results.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            released = [job.element for job, (_, r, f) in batch if r is None and f is None]
            answered = [result for _, result in batch if result[1:] != (None, None)]
            if released:
                await ctx.store.tx(dispatch.release_dispatches, released)
            await ctx.store.tx(dispatch.record_dispatch_results, answered)
            for job, (_, request_id, failure) in batch:
                if request_id is None and failure is None:
                    log.info("element.released", schedule_id=job.schedule_id, vnf=job.name)
                elif request_id is not None:
                    figures.done += 1
                    figures.peer_failing = False
                    log.info(
                        "element.dispatched",
                        schedule_id=job.schedule_id,
                        vnf=job.name,
                        so_request_id=request_id,
                        key=job.key,
                        attempt=job.attempt,
                    )
                else:
                    figures.errors += 1
                    figures.last_error = failure
                    figures.peer_failing = True
                    log.warning(
                        "element.dispatch_failed",
                        schedule_id=job.schedule_id,
                        vnf=job.name,
                        reason=failure,
                    )
            ctx.bells.poller.ring()
