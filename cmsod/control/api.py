"""The method table of the control socket and the replies' shapes.

Errors: a CMSO rule broken is `io.cmsod.RequestError` with CMSO's HTTP-like `status` and its
`requestError`; a message that does not decode is `org.varlink.service.InvalidParameter`
naming the field; an unknown method `org.varlink.service.MethodNotFound`.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from cmsod import __version__, explain, lifecycle, log
from cmsod.actors.context import WATCH_QUEUE, Context, Watcher
from cmsod.actors.supervisor import STALL_S, stalled_actors
from cmsod.control.metrics import exposition
from cmsod.errors import (
    ConfigError,
    ControlError,
    InvalidParameter,
    MethodNotFound,
    PeerError,
    PermissionDenied,
    RequestError,
)
from cmsod.optimize.planner import optimizer_response
from cmsod.optimize.problem import problem_for
from cmsod.store import ops, views
from cmsod.ticketing import NewTicket, Opened
from cmsod.wire import control as w
from cmsod.wire.events import EVENT_TYPES

INTERFACES = [
    "io.cmsod.Schedules",
    "io.cmsod.Availability",
    "io.cmsod.Tickets",
    "io.cmsod.Events",
    "io.cmsod.Manager",
    "org.varlink.service",
]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


# User and group look-ups (NSS) may go to LDAP or sssd and stall for seconds: they run in
# worker threads, at most this many at once (their own limiter, so a stall cannot starve other
# thread users such as DNS), abandoned if the call is cancelled. Nothing is cached, so a change
# of group membership counts from the next call.
NSS_THREADS = 8
_nss_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("nss_limiter")


def in_group(group: str, uid: int, gid: int) -> bool:
    """Blocking: is `uid` (primary group `gid`) a member of `group`? Unknown user or group: no."""
    try:
        wanted = grp.getgrnam(group).gr_gid
        name = pwd.getpwuid(uid).pw_name
        return wanted in os.getgrouplist(name, gid)
    except (KeyError, OSError):
        return False


async def may_change_state(ctx: Context, peer: Peer) -> bool:
    if peer.uid in (0, os.getuid()):
        return True
    group = ctx.config.control.operator_group
    if group:
        try:
            limiter = _nss_limiter.get()
        except LookupError:
            limiter = trio.CapacityLimiter(NSS_THREADS)
            _nss_limiter.set(limiter)
        if await trio.to_thread.run_sync(
            in_group, group, peer.uid, peer.gid, limiter=limiter, abandon_on_cancel=True
        ):
            return True
    return ctx.config.control.others == "operator"


@dataclass(frozen=True)
class Method:
    parameters: type
    # a coroutine; an async iterator when it streams; with `pages`, an async iterator of
    # replies called with `more` (without it, it yields one reply)
    handler: Callable[..., Any]
    changes_state: bool
    streams: bool = False  # only with more: true (Events.Watch)
    pages: bool = False  # with more: true its replies are streamed, else one reply
    with_peer: bool = False  # the handler also takes the caller's peer credentials


# -- handlers ---------------------------------------------------------------------------------


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
            await ctx.store.tx(ops.abandon_tickets, opened, user_id)
        raise


async def create(ctx: Context, p: w.CreateParameters) -> dict[str, Any]:
    new = lifecycle.validate_request(p.schedule, ctx.config.optimizer.max_elements)
    if new.immediate:  # accepted as it is stored: its tickets first, nothing kept if refused
        await ctx.store.read(ops.schedule_exists, new.schedule_id)
        cfg = ctx.config.tickets
        tickets = ops.tickets_for_immediate(
            new, ctx.clock.now_ms(), cfg.vnfs_per_ticket, cfg.template
        )
        opened = await open_tickets(ctx, new.schedule_id, new.user_id, tickets)
        status = await store_with_tickets(
            ctx, new.schedule_id, new.user_id, opened, ops.create_schedule, new
        )
    else:
        status = await ctx.store.tx(ops.create_schedule, new)
    log.info(
        "schedule.created",
        schedule_id=new.schedule_id,
        status=status.value,
        elements=sum(len(g.elements) for g in new.groups),
        immediate=new.immediate,
    )
    (ctx.bells.dispatcher if new.immediate else ctx.bells.optimizer).ring()
    return {"scheduleId": new.schedule_id, "status": status.value}


# Replies that may hold many rows: a call with `more: true` gets them streamed, STREAM_CHUNK
# rows a reply (bounded memory whatever the size); a plain call gets one reply of at most
# MAX_REPLY_ROWS rows, or io.cmsod.TooManyRows saying how to get them (docs/control.md).
STREAM_CHUNK = 1000
MAX_REPLY_ROWS = 10_000


def too_many(what: str) -> ControlError:
    return ControlError(
        f"more than {MAX_REPLY_ROWS} {what}: call with more: true to have them streamed "
        f"({STREAM_CHUNK} a reply, as cmsoctl does), or narrow the search",
        name="io.cmsod.TooManyRows",
        limit=MAX_REPLY_ROWS,
    )


async def get(
    ctx: Context, p: w.ScheduleIdParameters, more: bool
) -> AsyncGenerator[dict[str, Any], None]:
    """Streamed: the schedule (each group's `changeManagementSchedules` empty, `elements` its
    count), then replies of `elements`, each with its `groupId`; all from one snapshot."""
    if not more:
        head = await ctx.store.read(views.schedule_head, p.scheduleId)
        if head["elements"] > MAX_REPLY_ROWS:
            raise too_many("elements in this schedule")
        yield {"schedule": await ctx.store.read(views.get_schedule, p.scheduleId)}
        return
    stream = ctx.store.stream(views.schedule_stream, p.scheduleId, chunk=STREAM_CHUNK)
    async with contextlib.aclosing(stream) as chunks:
        async for items in chunks:
            if "groups" in items[0]:
                head, items = items[0], items[1:]
                yield {"schedule": head}
            if items:
                yield {"elements": items}


async def list_(
    ctx: Context, p: w.ListParameters, more: bool
) -> AsyncGenerator[dict[str, Any], None]:
    """One page (`next`: the cursor for the page after); streamed: every page after `after`."""
    after = p.after
    while True:
        page, after = await ctx.store.read(views.list_schedules, p.status, p.limit, after)
        yield {"schedules": page, "next": after}
        if not more or after is None:
            return


async def details(
    ctx: Context, p: w.DetailsParameters, more: bool
) -> AsyncGenerator[dict[str, Any], None]:
    chunk = STREAM_CHUNK if more else MAX_REPLY_ROWS + 1
    async with contextlib.aclosing(ctx.store.stream(views.details, p.filters, chunk=chunk)) as rows:
        async for batch in rows:
            if not more and len(batch) > MAX_REPLY_ROWS:
                raise too_many("elements match")
            yield {"details": batch}


async def one_reply(replies: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
    """The single reply of a paged handler called without `more` (a front door that answers in
    one body); it is bounded by the handler (io.cmsod.TooManyRows beyond MAX_REPLY_ROWS)."""
    async with contextlib.aclosing(replies) as pages:
        async for page in pages:
            return page
    return {}


async def why(ctx: Context, p: w.WhyParameters) -> dict[str, Any]:
    """What an element waits for, or why it ended, as a list of reasons (cmsod.explain)."""
    now_ms = ctx.clock.now_ms()
    facts = await ctx.store.read(views.why_facts, p.element, p.scheduleId, now_ms)
    cfg = ctx.config
    rules = explain.Rules(
        now_ms=now_ms,
        lead_ms=int(cfg.dispatcher.lead_time_s * 1000),
        misfire_grace_ms=int(cfg.dispatcher.misfire_grace_s * 1000),
        dispatch_immediate=cfg.dispatcher.dispatch_immediate,
        ticket_check=cfg.tickets.mode,
        dispatch_allowed=cfg.tickets.dispatch_allowed,
    )
    return {
        "element": facts.element,
        "scheduleId": facts.schedule_id,
        "scheduleStatus": facts.schedule_status,
        "status": facts.status,
        "currentTime": lifecycle.format_time(now_ms),
        "reasons": explain.explain(facts, rules),
    }


async def plan(ctx: Context, p: w.PlanParameters) -> dict[str, Any]:
    """Plan a request as the optimizer would now, counting work already scheduled; store nothing."""
    new = lifecycle.validate_request(p.schedule, ctx.config.optimizer.max_elements)
    if new.immediate:
        raise RequestError(400, "MISSING_REQUIRED_ATTRIBUTE", "changeWindow")
    names = [e.name for g in new.groups for e in g.elements]
    data = {e.name: e.data for g in new.groups for e in g.elements}
    busy = ops.merge_busy(
        await ctx.store.read(ops.other_work, None, names),
        await ctx.store.read(ops.book_busy, names, {**ctx.planning.inventory, **data}),
    )
    problem = problem_for(new, ctx.clock.now_ms(), busy)
    result = await ctx.compute(functools.partial(ctx.planning.plan, problem))
    return {"optimizer": optimizer_response(problem, result)}


async def approve(ctx: Context, p: w.ApproveParameters, peer: Peer) -> dict[str, Any]:
    return await approve_as(ctx, p, f"uid {peer.uid} pid {peer.pid}")


async def approve_as(ctx: Context, p: w.ApproveParameters, caller: str) -> dict[str, Any]:
    """The approval, recorded with who sent it (`caller`: the socket's peer credentials, or the
    REST API's authenticated user) beside the name it gives."""
    cfg = ctx.config.tickets
    needed = await ctx.store.read(
        ops.tickets_for_approval, p.scheduleId, p.approval, cfg.vnfs_per_ticket, cfg.template
    )
    if needed is None:  # recorded, but does not accept the schedule (or rejects it)
        status = await ctx.store.tx(ops.approve, p.scheduleId, p.approval, caller)
    else:
        user_id, tickets = needed
        opened = await open_tickets(ctx, p.scheduleId, user_id, tickets)
        status = await store_with_tickets(
            ctx, p.scheduleId, user_id, opened, ops.approve, p.scheduleId, p.approval, caller
        )
    log.info(
        "schedule.approval",
        schedule_id=p.scheduleId,
        approval=p.approval.approvalStatus,
        by=p.approval.approvalUserId,
        caller=caller,
        status=status.value,
    )
    ctx.bells.dispatcher.ring()
    return {"scheduleId": p.scheduleId, "status": status.value}


async def delete(ctx: Context, p: w.ScheduleIdParameters) -> dict[str, Any]:
    status = await ctx.store.tx(ops.delete_schedule, p.scheduleId)
    log.info("schedule.deleted", schedule_id=p.scheduleId, status=status.value)
    return {"scheduleId": p.scheduleId, "status": status.value}


async def status(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    now = trio.current_time()
    try:
        counts = await ctx.store.read(views.status_counts)
        db_ok = True
    except Exception as exc:  # the health report must answer even when the store cannot
        counts, db_ok = {"error": str(exc)}, False
    stalled = stalled_actors(ctx, now, STALL_S)

    def component(name: str, url: str, ok: bool) -> dict[str, Any]:
        return {"name": name, "url": url, "status": "OK" if ok else "FAILED", "healthy": ok}

    def peer_ok(*actors: str) -> bool:  # healthy unless the last call to it failed
        return not any(a in ctx.figures and ctx.figures[a].peer_failing for a in actors)

    components = [
        component("Scheduler Database", str(ctx.config.store_path), db_ok),
        component(
            "SO Interface",
            ctx.config.so.url or ctx.config.so.mode,
            peer_ok("dispatcher", "poller"),
        ),
        component("TM Interface", ctx.config.tickets.mode, peer_ok("tickets")),
        component(
            "Event Sink", ctx.config.events.url or ctx.config.events.sink, peer_ok("emitter")
        ),
    ]
    # Healthy only when every part is: a daemon that cannot reach its orchestrator is degraded
    # (and `cmsoctl status` exits 3), whatever else works.
    problems = [f"{c['name']} {c['status']}" for c in components if not c["healthy"]]
    problems += [f"actor {name} stalled" for name in sorted(stalled)]
    return {
        "healthy": not problems,
        "problems": problems,
        "buildInfo": f"cmsod {__version__}",
        "currentTime": lifecycle.format_time(ctx.clock.now_ms()),
        "hostname": socket.gethostname(),
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
    }


async def metrics(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    """What a Prometheus scrape of /metrics gets, with or without the listener."""
    return {"text": (await exposition(ctx)).decode()}


async def reload(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    if ctx.reload is None:
        raise ControlError("reload is not available")
    try:
        changed = ctx.reload()
    except ConfigError as exc:
        raise ControlError(str(exc)) from None
    return {"reloaded": True, "changed": changed}


async def watch(ctx: Context, p: w.WatchParameters) -> AsyncIterator[dict[str, Any]]:
    """Every CM event from now on (of one schedule, of one eventType), as it is read."""
    if p.eventType is not None and p.eventType not in EVENT_TYPES:
        raise InvalidParameter(
            "eventType", f"cmsod emits no {p.eventType!r}; it emits {', '.join(EVENT_TYPES)}"
        )
    watcher = Watcher(p.scheduleId, p.eventType)
    ctx.watchers.add(watcher)
    log.info(
        "watch.started",
        schedule_id=p.scheduleId,
        event_type=p.eventType,
        watchers=len(ctx.watchers),
    )
    try:
        async with watcher.receive:
            async for body in watcher.receive:
                yield {"event": msgspec.Raw(body)}
    finally:
        ctx.watchers.discard(watcher)
    if watcher.dropped:
        raise ControlError(
            f"dropped: fell {WATCH_QUEUE} events behind", name="io.cmsod.WatchDropped"
        )


async def availability_add(ctx: Context, p: w.AvailabilityAddParameters) -> dict[str, Any]:
    times = []
    for field, text in (("startTime", p.startTime), ("endTime", p.endTime)):
        try:
            times.append(lifecycle.parse_zoned_time_ms(text))
        except ValueError as exc:
            raise InvalidParameter(field, f"{text!r}: {exc}") from None
    start, end = times
    if end <= start:
        raise InvalidParameter(
            "endTime", f"the {p.kind} must end after it starts ({p.startTime} .. {p.endTime})"
        )
    entry, touched = await ctx.store.tx(
        ops.add_unavailability, p.kind, p.element, start, end, p.reason, p.by, p.id
    )
    log.info(
        "availability.added", id=entry.id, element=p.element, touches=",".join(touched) or None
    )
    ctx.bells.optimizer.ring()
    return {"entry": entry, "touches": touched}


async def availability_list(ctx: Context, p: w.AvailabilityListParameters) -> dict[str, Any]:
    return {"entries": await ctx.store.read(ops.list_unavailability, p.element)}


async def availability_remove(ctx: Context, p: w.IdParameters) -> dict[str, Any]:
    if not await ctx.store.tx(ops.remove_unavailability, p.id):
        raise ControlError(f"no such entry {p.id!r}", name="io.cmsod.Availability.NoSuchEntry")
    log.info("availability.removed", id=p.id)
    return {"id": p.id, "removed": True}


async def tickets_list(ctx: Context, p: w.TicketsListParameters) -> dict[str, Any]:
    page, after = await ctx.store.read(views.list_tickets, p.scheduleId, p.limit, p.after)
    return {"tickets": page, "next": after}


async def tickets_get(ctx: Context, p: w.IdParameters) -> dict[str, Any]:
    ticket = await ctx.store.read(views.get_ticket, p.id)
    if ticket is None:
        raise ControlError(f"no such change ticket {p.id!r}", name="io.cmsod.Tickets.NoSuchTicket")
    return {"ticket": ticket}


async def get_info(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    return {
        "vendor": "cmsod",
        "product": "cmsod",
        "version": __version__,
        "url": "https://github.com/onap/archive2-optf-cmso (re-implemented)",
        "interfaces": INTERFACES,
    }


METHODS: dict[str, Method] = {
    "io.cmsod.Schedules.Create": Method(w.CreateParameters, create, True),
    "io.cmsod.Schedules.Get": Method(w.ScheduleIdParameters, get, False, pages=True),
    "io.cmsod.Schedules.List": Method(w.ListParameters, list_, False, pages=True),
    "io.cmsod.Schedules.Details": Method(w.DetailsParameters, details, False, pages=True),
    "io.cmsod.Schedules.Approve": Method(w.ApproveParameters, approve, True, with_peer=True),
    "io.cmsod.Schedules.Delete": Method(w.ScheduleIdParameters, delete, True),
    "io.cmsod.Schedules.Plan": Method(w.PlanParameters, plan, False),
    "io.cmsod.Schedules.Why": Method(w.WhyParameters, why, False),
    "io.cmsod.Manager.Status": Method(w.NoParameters, status, False),
    "io.cmsod.Manager.Reload": Method(w.NoParameters, reload, True),
    "io.cmsod.Manager.Metrics": Method(w.NoParameters, metrics, False),
    "io.cmsod.Availability.Add": Method(w.AvailabilityAddParameters, availability_add, True),
    "io.cmsod.Availability.List": Method(w.AvailabilityListParameters, availability_list, False),
    "io.cmsod.Availability.Remove": Method(w.IdParameters, availability_remove, True),
    "io.cmsod.Tickets.List": Method(w.TicketsListParameters, tickets_list, False),
    "io.cmsod.Tickets.Get": Method(w.IdParameters, tickets_get, False),
    "io.cmsod.Events.Watch": Method(w.WatchParameters, watch, False, streams=True),
    "org.varlink.service.GetInfo": Method(w.NoParameters, get_info, False),
}

# -- one message in, replies out -------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def _reply(parameters: dict[str, Any]) -> bytes:
    return _encoder.encode({"parameters": parameters})


def _error(name: str, parameters: dict[str, Any]) -> bytes:
    return _encoder.encode({"error": name, "parameters": parameters})


def _field_path(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    _, _, path = text.rpartition(" - at `$")
    return path.rstrip("`").lstrip(".") if path else ""


async def handle_message(ctx: Context, peer: Peer, message: bytes) -> AsyncGenerator[bytes, None]:
    try:
        call = msgspec.json.decode(message, type=w.Call)
    except msgspec.ValidationError as exc:
        yield _error(InvalidParameter.name, {"parameter": _field_path(exc), "message": str(exc)})
        return
    except msgspec.DecodeError as exc:
        yield _error("io.cmsod.InvalidMessage", {"message": f"not a JSON object: {exc}"})
        return
    except RecursionError:  # msgspec's own depth guard
        yield _error("io.cmsod.InvalidMessage", {"message": "JSON nested too deeply"})
        return
    method = METHODS.get(call.method)
    try:
        if method is None:
            raise MethodNotFound(call.method)
        if call.more and not (method.streams or method.pages):
            raise InvalidParameter("more", f"{call.method} does not stream replies")
        if method.streams and not call.more:
            raise InvalidParameter(
                "more", f"{call.method} streams replies: call it with more: true"
            )
        parameters: Any
        try:
            parameters = msgspec.json.decode(call.parameters, type=method.parameters)
        except msgspec.ValidationError as exc:
            raise InvalidParameter(_field_path(exc) or "parameters", str(exc)) from None
        except msgspec.DecodeError as exc:
            raise InvalidParameter("parameters", str(exc)) from None
        except RecursionError:
            raise InvalidParameter("parameters", "JSON nested too deeply") from None
        if method.changes_state:
            if not await may_change_state(ctx, peer):
                log.warning("control.denied", method=call.method, uid=peer.uid, pid=peer.pid)
                raise PermissionDenied(f"uid {peer.uid} may not call {call.method}")
            log.info("control.call", method=call.method, uid=peer.uid, pid=peer.pid)
        if method.streams:
            async with contextlib.aclosing(method.handler(ctx, parameters)) as stream:
                async for item in stream:
                    yield _encoder.encode({"parameters": item, "continues": True})
            return
        if method.pages:  # every reply but the last says it continues
            result = None
            async with contextlib.aclosing(method.handler(ctx, parameters, call.more)) as pages:
                async for page in pages:
                    if result is not None:
                        yield _encoder.encode({"parameters": result, "continues": True})
                    result = page
            assert result is not None, "a paged method yields at least one reply"
        elif method.with_peer:
            result = await method.handler(ctx, parameters, peer)
        else:
            result = await method.handler(ctx, parameters)
    except RequestError as exc:
        yield _error("io.cmsod.RequestError", exc.to_parameters())
        return
    except ControlError as exc:
        yield _error(exc.name, exc.parameters)
        return
    except Exception as exc:  # a bug or a store failure: answer, log, keep serving
        log.error("control.failed", exc_info=True, method=call.method)
        yield _error("io.cmsod.InternalError", {"message": f"{type(exc).__name__}: {exc}"})
        return
    if not call.oneway:
        yield _reply(result)
