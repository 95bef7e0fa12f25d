"""The tickets actor: every call cmsod makes to the change-ticket system (TM).

- Opening: an approval that accepts a schedule, or an immediate request, asks the desk
  (`Context.ticket_desk`) for its tickets before anything is stored; if TM cannot open them
  all, the request is refused with CMSO's 417 and the ones it did open are cancelled.
- Checking: just before dispatch the dispatcher asks `gate_for` what TM says of the due
  elements' tickets (http mode; builtin mode checks our own record in the same transaction).
- The outbox: WorkInProgress, close and cancel are queued by the transaction whose change
  causes them (`Tx._move_tickets`); here they are sent, a ticket's in order, each retried with
  a growing delay for as long as TM refuses, so a TM outage delays tickets and loses none.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from cmsod import gates, lifecycle, log, ticketing
from cmsod.actors.context import ActorFigures, Context, TicketDesk
from cmsod.errors import NotDelivered, PeerError, Unavailable, Unconfirmed
from cmsod.optimize.problem import Busy, Problem, blocking, requirements
from cmsod.store import outboxes
from cmsod.ticketing import NewTicket, Opened
from cmsod.wire.cmso import ChangeWindow, ElementInfo, NameValue
from cmsod.wire.tm import ActiveTicketsRequest

BATCH = 100
RETRY_BASE_S = 0.25  # between attempts to connect, for a call someone is waiting on
HOLD_S = 5.0  # an element whose ticket TM did not tell us about is checked again after this
T = TypeVar("T")


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    requests_in, requests_out = trio.open_memory_channel[TicketDesk.Request](0)
    ctx.ticket_desk = TicketDesk(requests_in)
    task_status.started()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_desk, ctx, requests_out)
        await drain_outbox(ctx)


async def with_retries(ctx: Context, operation: str, call: Callable[[], Awaitable[T]]) -> T:
    """A call someone waits on: tried again while it did not reach TM (nothing was sent)."""
    attempt = 0
    while True:
        try:
            with ctx.metrics.call("tickets", operation):
                return await call()
        except NotDelivered:
            attempt += 1
            if attempt > ctx.config.tickets.connect_retries:
                raise
            await trio.sleep(RETRY_BASE_S * 2 ** (attempt - 1))


def _peer(ctx: Context, error: PeerError | None) -> None:
    """Whether TM answered the last call, for `cmsoctl status`."""
    figures = ctx.figures.setdefault("tickets", ActorFigures())
    figures.peer_failing = error is not None
    if error is not None:
        figures.errors += 1
        figures.last_error = str(error)


# -- opening ----------------------------------------------------------------------------------


async def serve_desk(ctx: Context, requests: trio.MemoryReceiveChannel[TicketDesk.Request]) -> None:
    async with requests, trio.open_nursery() as nursery:
        async for request in requests:
            nursery.start_soon(open_tickets, ctx, *request)


async def open_tickets(
    ctx: Context,
    schedule_id: str,
    user_id: str,
    tickets: list[NewTicket],
    reply: trio.MemorySendChannel[Opened | PeerError],
) -> None:
    opened: dict[int, str] = {}
    failures: list[PeerError] = []
    limiter = trio.CapacityLimiter(ctx.config.tickets.max_concurrent)

    async def one(index: int, ticket: NewTicket) -> None:
        async with limiter:
            if failures:
                return  # one failed: the request is refused, open no more
            try:
                opened[index] = await with_retries(
                    ctx, "create", lambda: ctx.tm.create(ticket.body)
                )
            except PeerError as exc:
                failures.append(exc)

    async with trio.open_nursery() as nursery:
        for index, ticket in enumerate(tickets):
            nursery.start_soon(one, index, ticket)
    done = [(opened[i], tickets[i]) for i in sorted(opened)]
    _peer(ctx, failures[0] if failures else None)
    handed_over = False
    async with reply:
        try:
            reply.send_nowait(failures[0] if failures else done)
            handed_over = not failures  # the approval records them
        except (trio.BrokenResourceError, trio.WouldBlock):
            pass  # the approver gave up waiting
    if handed_over:
        log.info("tickets.opened", schedule_id=schedule_id, tickets=len(done))
    elif done:  # refused or abandoned: TM must not keep tickets nobody will work
        await ctx.store.tx(outboxes.abandon_tickets, done, user_id)
        log.warning(
            "tickets.abandoned",
            schedule_id=schedule_id,
            tickets=len(done),
            reason=str(failures[0]) if failures else "the approval gave up waiting",
        )


# -- checking before dispatch -----------------------------------------------------------------


async def gate_for(ctx: Context, change_ids: set[str]) -> gates.TicketGate:
    cfg = ctx.config.tickets
    if cfg.mode == "loopback":
        return gates.TicketGate(None)
    if cfg.mode == "builtin" or not change_ids:
        return gates.TicketGate(cfg.dispatch_allowed)
    remote: dict[str, str] = {}
    unknown: dict[str, str] = {}  # TM answered, but not with the ticket
    unreachable: dict[str, str] = {}  # no answer: the element waits and is checked again
    limiter = trio.CapacityLimiter(cfg.max_concurrent)

    async def one(change_id: str) -> None:
        async with limiter:
            try:
                state = await with_retries(ctx, "get", lambda: ctx.tm.get(change_id))
                remote[change_id] = ticketing.state_text(*state)
            except (NotDelivered, Unconfirmed, Unavailable) as exc:
                unreachable[change_id] = str(exc)
            except PeerError as exc:
                unknown[change_id] = str(exc)

    async with trio.open_nursery() as nursery:
        for change_id in sorted(change_ids):
            nursery.start_soon(one, change_id)
    failures = list(unreachable.values()) + list(unknown.values())
    _peer(ctx, PeerError(failures[0]) if failures else None)
    return gates.TicketGate(cfg.dispatch_allowed, remote, unknown, unreachable, int(HOLD_S * 1000))


# -- unavailability (http mode) ----------------------------------------------------------------


async def unavailability(ctx: Context, problem: Problem) -> dict[str, list[Busy]]:
    """CMSO's ActiveTicketsRequest for a schedule's elements and those they require; TM's
    tickets on them as Busy times (a ticket whose availability is "full" blocks nothing)."""
    names = [n for g in problem.groups for n in g.elements]
    inventory = ctx.planning.inventory
    data = {n: {**inventory.get(n, {}), **problem.element_data.get(n, {})} for n in names}
    wanted = requirements(names, data)
    request = ActiveTicketsRequest(
        requestId=str(uuid.uuid4()),
        commonData={},
        changeWindows=[
            ChangeWindow(lifecycle.format_time(start), lifecycle.format_time(end))
            for g in problem.groups
            for start, end in g.windows
        ],
        elements=[
            ElementInfo(e, [NameValue(k, v) for k, v in data.get(e, inventory.get(e, {})).items()])
            for e in wanted
        ],
    )
    found = await with_retries(ctx, "active_tickets", lambda: ctx.tm.active_tickets(request))
    _peer(ctx, None)
    entries = []
    for ticket in found:
        if ticket.availability == "full":
            continue
        try:
            start = lifecycle.parse_time_ms(ticket.startTime)
            end = lifecycle.parse_time_ms(ticket.endTime)
        except ValueError:
            raise PeerError(
                f"active tickets: ticket {ticket.id} has a bad startTime/endTime"
            ) from None
        entries += [(e, start, end, f"ticket {ticket.id}", "") for e in ticket.elementIds]
    return blocking(entries, wanted)


# -- the outbox -------------------------------------------------------------------------------


async def drain_outbox(ctx: Context) -> None:
    while True:
        figures = ctx.beat("tickets")
        if "tickets" not in ctx.store.held_leases:  # another daemon sends them (fleet.py)
            await ctx.bells.tickets.wait(10.0)
            continue
        due = await ctx.store.read(outboxes.due_ticket_ops, ctx.clock.now_ms(), BATCH)
        sent, failed = await send_ops(ctx, due)
        if due:
            await ctx.store.tx(outboxes.record_ticket_ops, sent, failed)
            figures.done += len(sent)
            _peer(ctx, PeerError(failed[-1][1]) if failed else None)
        if len(due) == BATCH or sent:
            continue  # a ticket's next operation may be due now that this one went
        next_ms = await ctx.store.read(outboxes.next_ticket_op_ms)
        wait_s = 3600.0 if next_ms is None else (next_ms - ctx.clock.now_ms()) / 1000
        await ctx.bells.tickets.wait(wait_s)


async def send_ops(
    ctx: Context, due: list[outboxes.TicketOp]
) -> tuple[list[outboxes.TicketOp], list[tuple[outboxes.TicketOp, str, int]]]:
    """Send each (concurrently: they are of different tickets); say which TM took, and for
    the others why not and when to try again."""
    cfg = ctx.config.tickets
    sent: list[outboxes.TicketOp] = []
    failed: list[tuple[outboxes.TicketOp, str, int]] = []
    limiter = trio.CapacityLimiter(cfg.max_concurrent)

    async def one(op: outboxes.TicketOp) -> None:
        async with limiter:
            try:
                with ctx.metrics.call("tickets", op.op.value):
                    await ctx.tm.send(op.op, op.body)
            except PeerError as exc:
                delay_s = min(cfg.retry_max_s, cfg.retry_base_s * 2**op.attempts)
                failed.append((op, str(exc), ctx.clock.now_ms() + int(delay_s * 1000)))
                log.warning(
                    "ticket.retry",
                    change_id=op.change_id,
                    op=op.op.value,
                    attempt=op.attempts + 1,
                    retry_in_s=delay_s,
                    reason=str(exc),
                )
                return
            sent.append(op)
            if op.op is ticketing.Op.UPDATE:  # per element dispatch: chatter
                log.debug("ticket.updated", change_id=op.change_id)
            else:
                log.info("ticket.closed", change_id=op.change_id, op=op.op.value)

    async with trio.open_nursery() as nursery:
        for op in due:
            nursery.start_soon(one, op)
    return sent, failed
