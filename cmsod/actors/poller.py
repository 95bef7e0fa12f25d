"""The poller: asks the orchestrator about every triggered element every `interval_s` (with
jitter, so thousands do not poll in step), backs off per element on connection errors (state
unchanged, errors counted and shown), ends a work flow that runs past `execution_timeout_s` as
`Failed`, and records only what changed. The transaction that ends a schedule's last element
also closes the schedule."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import trio

from cmsod import lifecycle, log
from cmsod.actors.context import ActorFigures, Context
from cmsod.errors import PeerError
from cmsod.model import ElementStatus as E
from cmsod.model import PollOutcome
from cmsod.store import dispatch

RECORD_BATCH = 1000  # polled elements whose changes are committed in one transaction


@dataclass
class Watch:
    schedule_id: str
    name: str
    request_id: str
    dispatch_ms: int | None
    errors: int = 0
    last_state: str | None = None


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    watches: dict[int, Watch] = {}
    due: list[tuple[float, int]] = []  # (trio time of the next poll, element)
    refresh = True
    while True:
        figures = ctx.beat("poller")
        cfg = ctx.config.poller
        # Polls go out in batches down one connection each (so.pipeline_depth); at most
        # max_concurrent polls are in flight.
        batch_size = max(1, min(ctx.config.so.pipeline_depth, cfg.max_concurrent))
        limiter = trio.CapacityLimiter(max(1, cfg.max_concurrent // batch_size))
        if refresh:  # a dispatch was recorded (or first turn): learn the new ones
            now = trio.current_time()
            current = {
                e: (s, n, r, d)
                for e, s, n, r, d in await ctx.store.read(dispatch.in_flight, ctx.store.owner)
            }
            for element in list(watches):
                if element not in current:
                    del watches[element]
            for element, (schedule_id, name, request_id, dispatched) in current.items():
                if element not in watches:
                    watches[element] = Watch(schedule_id, name, request_id, dispatched)
                    heapq.heappush(due, (now + _jittered(cfg.interval_s, cfg.jitter), element))
        # Everything due within half the jitter band is polled now, together: one round of
        # full batches instead of a wake-up (and a near-empty batch) per element.
        until = trio.current_time() + cfg.interval_s * max(cfg.jitter, 0.02) / 2
        ready = []
        while due and due[0][0] <= until:
            _, element = heapq.heappop(due)
            if element in watches:
                ready.append(element)
        if ready:
            outcomes: list[tuple[int, PollOutcome]] = []
            async with trio.open_nursery() as polls:
                for i in range(0, len(ready), batch_size):
                    batch = ready[i : i + batch_size]
                    polls.start_soon(poll_batch, ctx, limiter, figures, batch, watches, outcomes)
            await settle(ctx, figures, outcomes, watches, due)
        wait_s = (due[0][0] - trio.current_time()) if due else 3600.0
        refresh = await ctx.bells.poller.wait(wait_s)


def _jittered(interval: float, jitter: float) -> float:
    return interval * (1 + random.uniform(-jitter, jitter))


async def poll_batch(
    ctx: Context,
    limiter: trio.CapacityLimiter,
    figures: ActorFigures,
    elements: list[int],
    watches: dict[int, Watch],
    outcomes: list[tuple[int, PollOutcome]],
) -> None:
    async with limiter:
        with ctx.metrics.call("so", "status"):
            answers = await ctx.so.statuses([watches[e].request_id for e in elements])
    for element, answer in zip(elements, answers, strict=True):
        if isinstance(answer, PeerError):  # connection trouble: counted and shown, unchanged
            ctx.metrics.peer_failed("so", "status", answer)
            figures.errors += 1
            figures.last_error = str(answer)
            figures.peer_failing = True
            outcome = PollOutcome("ConnectionException", str(answer)[:500], connection_error=True)
        else:
            figures.peer_failing = False
            outcome = lifecycle.poll_outcome(
                answer.http_status, answer.request_state, answer.message, answer.finish_time
            )
        outcomes.append((element, outcome))


async def settle(
    ctx: Context,
    figures: ActorFigures,
    outcomes: list[tuple[int, PollOutcome]],
    watches: dict[int, Watch],
    due: list[tuple[float, int]],
) -> None:
    """Record what a round changed (or an execution timeout), RECORD_BATCH elements per
    transaction (an SO outage must not cost one synced commit per element per round), then
    when to ask each again."""
    cfg = ctx.config.poller
    timeout_ms = int(cfg.execution_timeout_s * 1000)
    now_ms = ctx.clock.now_ms()
    changes: list[tuple[int, PollOutcome]] = []
    for n, (element, outcome) in enumerate(outcomes):
        watch = watches[element]
        if (
            outcome.status is None
            and timeout_ms
            and watch.dispatch_ms is not None
            and now_ms - watch.dispatch_ms > timeout_ms
        ):
            outcome = PollOutcome(
                "Timeout",
                f"no end state from the orchestrator within {cfg.execution_timeout_s:g} s of "
                f"dispatch (last state: {outcome.so_status})",
                E.FAILED,
            )
            outcomes[n] = element, outcome
        changed = outcome.status is not None or outcome.so_status != watch.last_state
        if changed or outcome.connection_error:
            changes.append((element, outcome))
    for i in range(0, len(changes), RECORD_BATCH):
        chunk = changes[i : i + RECORD_BATCH]
        statuses = await ctx.store.tx(dispatch.record_polls, chunk)
        for (element, outcome), status in zip(chunk, statuses, strict=True):
            if status is not None:
                figures.done += 1
                finished(watches[element], status, outcome)
    for element, outcome in outcomes:
        watch = watches[element]
        if outcome.status is not None:
            del watches[element]
            continue
        watch.last_state = outcome.so_status
        if outcome.connection_error:
            watch.errors += 1
            delay = min(cfg.interval_s * 2**watch.errors, cfg.error_backoff_max_s)
        else:
            watch.errors = 0
            delay = _jittered(cfg.interval_s, cfg.jitter)
        heapq.heappush(due, (trio.current_time() + delay, element))


def finished(watch: Watch, status: E, outcome: PollOutcome) -> None:
    """A work flow that failed is a warning an operator must be able to act on: which
    schedule, and what the orchestrator said."""
    fields = dict(
        schedule_id=watch.schedule_id,
        vnf=watch.name,
        status=status.value,
        so_request_id=watch.request_id,
        so_status=outcome.so_status,
    )
    if status is E.COMPLETED:
        log.info("element.finished", **fields)
    else:
        log.warning("element.finished", **fields, so_message=outcome.so_message)
