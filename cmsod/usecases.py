"""The use cases: what an operator or a client can ask of cmsod, as plain async functions over
the store and the actors' request/reply channels (DESIGN.md §6).

Every front door (the control socket today, a CMSO REST facade later) is a thin adapter over
these: it decodes its own wire format, calls one function here and renders the answer. No rule
is written twice, and no front door imports an actor or calls a peer.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import trio

from cmsod import __version__, explain, gates, lifecycle, log, plans
from cmsod.actors.context import WATCH_QUEUE, Context, Watcher
from cmsod.actors.supervisor import STALL_S, stalled_actors
from cmsod.config import shown_url
from cmsod.errors import ConfigError, ControlError, InvalidParameter, PeerError, RequestError
from cmsod.model import APPROVAL_TYPE
from cmsod.model import ScheduleStatus as S
from cmsod.optimize.planner import optimizer_response
from cmsod.optimize.problem import problem_for
from cmsod.store import book, dispatch, fleet, outboxes, schedules, views
from cmsod.ticketing import NewTicket, Opened
from cmsod.wire.cmso import Approval, ScheduleRequest
from cmsod.wire.events import EVENT_TYPES

__all__ = ["WATCH_QUEUE", "Context"]

# -- change tickets opened before a change is stored ------------------------------------------


async def open_tickets(
    ctx: Context, schedule_id: str, user_id: str, tickets: list[NewTicket]
) -> Opened:
    """Ask the tickets actor to open them; CMSO's 417 when it cannot."""
    if ctx.ticket_desk is None:
        raise RequestError(417, "UNABLE_TO_CREATE_CHANGE_TICKET", schedule_id, "not started")
    try:
        return await ctx.ticket_desk.open(
            schedule_id, user_id, tickets, ctx.config.tickets.create_timeout_s
        )
    except PeerError as exc:
        log.warning("tickets.refused", schedule_id=schedule_id, reason=str(exc))
        raise RequestError(417, "UNABLE_TO_CREATE_CHANGE_TICKET", schedule_id, exc) from None


async def store_with_tickets(
    ctx: Context, schedule_id: str, user_id: str, opened: Opened, fn: Any, *args: Any
) -> Any:
    """Store the change that the opened tickets are for; if it cannot be stored (the
    schedule changed meanwhile, the store failed), cancel them."""
    try:
        return await ctx.store.tx(fn, *args, opened)
    except Exception:
        if opened:
            await ctx.store.tx(outboxes.abandon_tickets, opened, user_id)
        raise


# -- schedules --------------------------------------------------------------------------------


async def create(ctx: Context, request: ScheduleRequest) -> tuple[str, S]:
    new = lifecycle.validate_request(request, ctx.config.optimizer.max_elements)
    if new.max_failures is None and new.max_failure_ratio is None:  # the configured default
        limits = ctx.config.dispatcher
        new.max_failures = limits.max_failures if limits.max_failures >= 0 else None
        new.max_failure_ratio = limits.max_failure_ratio if limits.max_failure_ratio < 1.0 else None
    if new.immediate:  # accepted as it is stored: its tickets first, nothing kept if refused
        await ctx.store.read(schedules.schedule_exists, new.schedule_id)
        cfg = ctx.config.tickets
        tickets = schedules.tickets_for_immediate(
            new, ctx.clock.now_ms(), cfg.vnfs_per_ticket, cfg.template
        )
        opened = await open_tickets(ctx, new.schedule_id, new.user_id, tickets)
        status = await store_with_tickets(
            ctx, new.schedule_id, new.user_id, opened, schedules.create_schedule, new
        )
    else:
        status = await ctx.store.tx(schedules.create_schedule, new)
    log.info(
        "schedule.created",
        schedule_id=new.schedule_id,
        status=status.value,
        elements=sum(len(g.elements) for g in new.groups),
        immediate=new.immediate,
    )
    (ctx.bells.dispatcher if new.immediate else ctx.bells.optimizer).ring()
    return new.schedule_id, status


async def get_schedule(
    ctx: Context, schedule_id: str, max_elements: int | None = None
) -> dict[str, Any]:
    """The whole view, in one read; only its head past `max_elements` elements."""
    return await ctx.store.read(views.get_schedule, schedule_id, max_elements)


def schedule_stream(
    ctx: Context, schedule_id: str, chunk: int
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The head, then every element with its `groupId`, `chunk` at a time, one snapshot."""
    return ctx.store.stream(views.schedule_stream, schedule_id, chunk=chunk)


async def list_schedules(
    ctx: Context, status: list[str] | None, limit: int, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """A word that is no status is refused: it would match nothing, and an empty list reads as
    "none in that status" (`completed` for `Completed`)."""
    for word in status or ():
        if word not in STATUS_WORDS:
            raise InvalidParameter(
                "status",
                f"{word!r} is not a schedule status; they are (exactly): {', '.join(STATUS_WORDS)}",
            )
    return await ctx.store.read(views.list_schedules, status, limit, after)


STATUS_WORDS = tuple(s.value for s in S)


def details(
    ctx: Context, filters: dict[str, list[str]], chunk: int
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The matching elements, `chunk` at a time, from one snapshot."""
    return ctx.store.stream(views.details, filters, chunk=chunk)


async def why(ctx: Context, element: str, schedule_id: str | None) -> dict[str, Any]:
    """What an element waits for, or why it ended, as a list of reasons (cmsod.explain)."""
    now_ms = ctx.clock.now_ms()
    facts = await ctx.store.read(views.why_facts, element, schedule_id, now_ms)
    cfg = ctx.config
    rules = explain.Rules(
        now_ms=now_ms,
        lead_ms=int(cfg.dispatcher.lead_time_s * 1000),
        misfire_grace_ms=int(cfg.dispatcher.misfire_grace_s * 1000),
        dispatch_immediate=cfg.dispatcher.dispatch_immediate,
        ticket_check=cfg.tickets.mode,
        dispatch_allowed=cfg.tickets.dispatch_allowed,
    )
    snap = await ctx.store.read(dispatch.snapshot_now, facts.element, facts.schedule_id, now_ms)
    if snap is not None:  # waiting for a dispatch: ask the gates that need no peer, now
        asked = gates.standard(
            gates.TicketGate(None),
            rules.misfire_grace_ms,
            rules.dispatch_immediate,
            gates.CalendarGate(ctx.planning.calendars, ctx.planning.inventory),
        )
        facts.gates_now = [
            (name, answer.why, answer.until_ms)
            for name, answer in gates.evaluate(snap, asked)
            if name in explain.REASKED and isinstance(answer, gates.Hold)
        ]
    return {
        "element": facts.element,
        "scheduleId": facts.schedule_id,
        "scheduleStatus": facts.schedule_status,
        "status": facts.status,
        "currentTime": lifecycle.format_time(now_ms),
        "reasons": explain.explain(facts, rules),
    }


async def plan(ctx: Context, request: ScheduleRequest) -> tuple[dict[str, Any], str | None]:
    """Plan a request as the optimizer would now, counting work already scheduled; store
    nothing. Answers CMSO's optimizer response, and the plan's fingerprint."""
    new = lifecycle.validate_request(request, ctx.config.optimizer.max_elements)
    if new.immediate:
        raise RequestError(400, "MISSING_REQUIRED_ATTRIBUTE", "changeWindow")
    names = [e.name for g in new.groups for e in g.elements]
    data = {e.name: e.data for g in new.groups for e in g.elements}
    busy = book.merge_busy(
        await ctx.store.read(book.other_work, None, names),
        await ctx.store.read(book.book_busy, names, {**ctx.planning.inventory, **data}),
    )
    problem = problem_for(new, ctx.clock.now_ms(), busy)
    result = await ctx.compute(functools.partial(ctx.planning.plan, problem))
    return optimizer_response(problem, result), plans.of_placement(
        new.schedule_id, result.placed, result.duration_ms
    )


class Approved(msgspec.Struct):
    """What an approval did: the schedule's status, the plan approved (its fingerprint), and
    what a re-plan asked with it changed."""

    status: S
    plan: str | None
    replanned: schedules.Replanned | None = None


async def approve(
    ctx: Context,
    schedule_id: str,
    approval: Approval,
    caller: str,
    plan: str | None = None,
    replan: bool = False,
) -> Approved:
    """Record an approval sent by `caller`, as the front door vouches for it (the socket's peer
    credentials, or the REST API's authenticated user). `plan`: the fingerprint of the plan
    the approver saw; an acceptance is refused if the plan is no longer that one or if slots
    of it have passed (start + misfire grace), unless `replan`: then those are re-placed
    first and the acceptance is of the new plan (README "Approving the plan you saw")."""
    replanned = None
    grace_ms = int(ctx.config.dispatcher.misfire_grace_s * 1000)
    if (
        replan
        and approval.approvalStatus == "Accepted"
        and approval.approvalType == APPROVAL_TYPE
        and approval.approvalUserId
    ):
        by = f"{approval.approvalUserId} ({caller})"
        calendar = gates.CalendarGate(ctx.planning.calendars, ctx.planning.inventory)
        replanned = await ctx.store.tx(schedules.replan, schedule_id, plan, by, grace_ms, calendar)
        plan = replanned.plan
    try:
        return await _approve_plan(ctx, schedule_id, approval, caller, plan, grace_ms, replanned)
    except RequestError as e:
        if replanned is not None and replanned.moved:  # committed on its own: say so
            e.add(
                f"the re-plan was kept, not approved: the plan is now {replanned.plan}"
                f" (was {replanned.seen}; cmsoctl show)"
            )
        raise


async def _approve_plan(
    ctx: Context,
    schedule_id: str,
    approval: Approval,
    caller: str,
    plan: str | None,
    grace_ms: int,
    replanned: schedules.Replanned | None,
) -> Approved:
    cfg = ctx.config.tickets
    needed = await ctx.store.read(
        schedules.tickets_for_approval,
        schedule_id,
        approval,
        cfg.vnfs_per_ticket,
        cfg.template,
        plan,
        ctx.clock.now_ms(),
        grace_ms,
    )
    if needed is None:  # recorded, but does not accept the schedule (or rejects it)
        status, approved = await ctx.store.tx(
            schedules.approve, schedule_id, approval, caller, plan, grace_ms
        )
    else:
        user_id, tickets = needed
        opened = await open_tickets(ctx, schedule_id, user_id, tickets)
        status, approved = await store_with_tickets(
            ctx,
            schedule_id,
            user_id,
            opened,
            schedules.approve,
            schedule_id,
            approval,
            caller,
            plan,
            grace_ms,
        )
    log.info(
        "schedule.approval",
        schedule_id=schedule_id,
        approval=approval.approvalStatus,
        by=approval.approvalUserId,
        caller=caller,
        status=status.value,
        plan=approved,
    )
    ctx.bells.dispatcher.ring()
    return Approved(status, approved, replanned)


async def delete(ctx: Context, schedule_id: str) -> S:
    status = await ctx.store.tx(schedules.delete_schedule, schedule_id)
    log.info("schedule.deleted", schedule_id=schedule_id, status=status.value)
    return status


# -- stopping and holding a rollout -------------------------------------------------------------


async def pause(ctx: Context, schedule_id: str, by: str, why: str) -> S:
    return await ctx.store.tx(schedules.pause, schedule_id, by, why)


async def resume(ctx: Context, schedule_id: str, by: str, why: str) -> dict[str, Any]:
    """Resume a paused or halted rollout; answers its status, the elements carried over to
    later slots (their old and new slots) and its view, which shows the new plan, over both
    front doors."""
    grace_ms = int(ctx.config.dispatcher.misfire_grace_s * 1000)
    calendar = gates.CalendarGate(ctx.planning.calendars, ctx.planning.inventory)
    done = await ctx.store.tx(schedules.resume, schedule_id, by, why, grace_ms, calendar)
    ctx.bells.dispatcher.ring()
    schedule = await get_schedule(ctx, schedule_id)  # the new plan
    return {
        "scheduleId": schedule_id,
        "status": done.status.value,
        "moved": [change.to_view() for change in done.moved],
        "schedule": schedule,
    }


async def abort(ctx: Context, schedule_id: str, by: str, why: str) -> dict[str, Any]:
    """Abort a rollout; answers its status, how many elements it cancelled and how many are
    still running to their end, over both front doors."""
    done = await ctx.store.tx(schedules.abort, schedule_id, by, why)
    ctx.bells.poller.ring()
    return {
        "scheduleId": schedule_id,
        "status": done.status.value,
        "cancelled": done.cancelled,
        "running": done.running,
    }


async def freeze(
    ctx: Context, on: bool, by: str, why: str, until: str | None
) -> dict[str, Any] | None:
    """Turn the global freeze on or off; answers the freeze in force, if any."""
    until_ms = None
    if until is not None:
        try:
            until_ms = lifecycle.parse_zoned_time_ms(until)
        except ValueError as exc:
            raise RequestError(400, "INVALID_ATTRIBUTE", "until", until, detail=str(exc)) from None
        now_ms = ctx.clock.now_ms()
        if until_ms <= now_ms:
            raise RequestError(
                400,
                "INVALID_ATTRIBUTE",
                "until",
                until,
                detail=f"not in the future (it is {lifecycle.format_time(now_ms)})",
            )
    frozen = await ctx.store.tx(dispatch.set_freeze, on, by, why, until_ms)
    ctx.bells.dispatcher.ring()
    return views.freeze_view(frozen)


async def freeze_in_force(ctx: Context) -> dict[str, Any] | None:
    """The global freeze as `status` shows it: None when off or past its end."""
    return await ctx.store.read(views.freeze_in_force, ctx.clock.now_ms())


# -- the daemon -------------------------------------------------------------------------------


async def health(ctx: Context, hostname: str) -> dict[str, Any]:
    """CMSO's health shape, with the actors' figures and the store's counts; the global
    freeze first, when one is on."""
    now = trio.current_time()
    frozen: dict[str, Any] | None = None
    try:
        counts = await ctx.store.read(views.status_counts)
        frozen = await freeze_in_force(ctx)
        # several daemons share a PostgreSQL store; on SQLite there is only this one, whose
        # lease is never renewed (nobody could take its work over): nothing to list
        daemons = (
            await ctx.store.read(fleet.daemons, ctx.clock.now_ms()) if ctx.store.postgres else []
        )
        db_ok = True
    except Exception as exc:  # the health report must answer even when the store cannot
        counts, db_ok, daemons = {"error": str(exc)}, False, []
    stalled = stalled_actors(ctx, now, STALL_S)

    def component(name: str, url: str, ok: bool) -> dict[str, Any]:
        return {"name": name, "url": url, "status": "OK" if ok else "FAILED", "healthy": ok}

    def peer_ok(*actors: str) -> bool:  # healthy unless the last call to it failed
        return not any(a in ctx.figures and ctx.figures[a].peer_failing for a in actors)

    alarms_cfg, source = ctx.config.alarms, ctx.alert_source
    components = [
        component("Scheduler Database", ctx.config.store_shown, db_ok),
        component(
            "SO Interface",
            shown_url(ctx.config.so.url) if ctx.config.so.url else ctx.config.so.mode,
            peer_ok("dispatcher", "poller"),
        ),
        component("TM Interface", ctx.config.tickets.mode, peer_ok("tickets")),
        component(
            "Event Sink",
            shown_url(ctx.config.events.url) if ctx.config.events.url else ctx.config.events.sink,
            peer_ok("emitter"),
        ),
    ]
    if ctx.alerts is not None:  # the alarm gate's Alertmanager: failing holds or lets go
        components.append(
            component("Alert Source", shown_url(alarms_cfg.url), source.ok is not False)
        )
    # Healthy only when every part is: a daemon that cannot reach its orchestrator is degraded
    # (and `cmsoctl status` exits 3), whatever else works.
    problems = [f"{c['name']} {c['status']}" for c in components if not c["healthy"]]
    problems += [f"actor {name} stalled" for name in sorted(stalled)]
    now_ms = ctx.clock.now_ms()
    return {
        "freeze": frozen,
        "calendars": [
            {
                "name": period.name,
                "source": period.source,
                "from": lifecycle.format_time(start),
                "to": lifecycle.format_time(end),
                "inForce": start <= now_ms,
                "period": period.describe(),
                "reason": period.reason,
            }
            for start, end, period in ctx.planning.calendars.next_periods(now_ms)
        ],
        "alarms": None
        if ctx.alerts is None
        else {
            "url": shown_url(alarms_cfg.url),
            "onError": alarms_cfg.on_error,
            "ok": source.ok,
            "lastError": source.last_error,
            "lastAsked": lifecycle.format_time(source.asked_ms),
            "queries": source.queries,
            "firing": source.firing,
        },
        "healthy": not problems,
        "problems": problems,
        "buildInfo": f"cmsod {__version__}",
        "currentTime": lifecycle.format_time(ctx.clock.now_ms()),
        "hostname": hostname,
        "components": components,
        "actors": {
            name: {
                "heartbeatAgeS": round(now - f.heartbeat, 3),
                "restarts": f.restarts,
                "done": f.done,
                "errors": f.errors,
                "lastError": f.last_error,
            }
            for name, f in sorted(ctx.figures.items())
        },
        "counts": counts,
        # every daemon sharing the store (several on PostgreSQL), with what each holds
        "daemon": ctx.store.owner,
        "daemons": daemons,
    }


def reload(ctx: Context) -> list[str]:
    """Read the configuration again; returns what changed."""
    if ctx.reload is None:
        raise ControlError("reload is not available")
    try:
        changed = ctx.reload()
    except ConfigError as exc:
        raise ControlError(str(exc)) from None
    ctx.bells.dispatcher.ring()  # (an approval timeout may have changed)
    return changed


async def watch(
    ctx: Context, schedule_id: str | None, event_type: str | None
) -> AsyncGenerator[bytes, None]:
    """Every CM event stored from now on (of one schedule, of one eventType), by any daemon
    sharing the store, as soon as this daemon sees it committed (emitter.feed)."""
    if event_type is not None and event_type not in EVENT_TYPES:
        raise InvalidParameter(
            "eventType", f"cmsod emits no {event_type!r}; it emits {', '.join(EVENT_TYPES)}"
        )
    watcher = Watcher(schedule_id, event_type)
    if ctx.tail is None:  # nobody watches yet: the feed starts from the events there now
        top = await ctx.store.read(outboxes.last_event_seq)
        if ctx.tail is None:
            ctx.tail = outboxes.Tail(top)
    ctx.watchers.add(watcher)
    ctx.bells.watch.ring()
    log.info(
        "watch.started", schedule_id=schedule_id, event_type=event_type, watchers=len(ctx.watchers)
    )
    try:
        async with watcher.receive:
            async for body in watcher.receive:
                yield body
    finally:
        ctx.watchers.discard(watcher)
    if watcher.dropped:
        raise ControlError(
            f"dropped: fell {WATCH_QUEUE} events behind", name="io.cmsod.WatchDropped"
        )


# -- the availability book and the tickets ------------------------------------------------------


async def availability_add(
    ctx: Context,
    kind: str,
    element: str,
    start_time: str,
    end_time: str,
    reason: str,
    by: str,
    ref: str | None,
) -> tuple[book.Unavailability, list[str]]:
    times = []
    for field, text in (("startTime", start_time), ("endTime", end_time)):
        try:
            times.append(lifecycle.parse_zoned_time_ms(text))
        except ValueError as exc:
            raise InvalidParameter(field, f"{text!r}: {exc}") from None
    start, end = times
    if end <= start:
        raise InvalidParameter(
            "endTime", f"the {kind} must end after it starts ({start_time} .. {end_time})"
        )
    entry, touched = await ctx.store.tx(
        book.add_unavailability, kind, element, start, end, reason, by, ref
    )
    log.info("availability.added", id=entry.id, element=element, touches=",".join(touched) or None)
    ctx.bells.optimizer.ring()
    ctx.bells.dispatcher.ring()
    return entry, touched


async def availability_list(ctx: Context, element: str | None) -> list[book.Unavailability]:
    return await ctx.store.read(book.list_unavailability, element)


async def availability_remove(ctx: Context, ref: str) -> None:
    if not await ctx.store.tx(book.remove_unavailability, ref):
        raise ControlError(f"no such entry {ref!r}", name="io.cmsod.Availability.NoSuchEntry")
    log.info("availability.removed", id=ref)


async def tickets_list(
    ctx: Context, schedule_id: str | None, limit: int, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    return await ctx.store.read(views.list_tickets, schedule_id, limit, after)


async def ticket(ctx: Context, change_id: str) -> dict[str, Any]:
    found = await ctx.store.read(views.get_ticket, change_id)
    if found is None:
        raise ControlError(
            f"no such change ticket {change_id!r}", name="io.cmsod.Tickets.NoSuchTicket"
        )
    return found
