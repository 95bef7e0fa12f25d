"""The method table of the control socket and the replies' shapes.

Errors: a CMSO rule broken is `io.cmsod.RequestError` with CMSO's HTTP-like `status` and its
`requestError`; a message that does not decode is `org.varlink.service.InvalidParameter`
naming the field; an unknown method `org.varlink.service.MethodNotFound`.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from cmsod import __version__, log, usecases
from cmsod.control.metrics import exposition
from cmsod.errors import (
    ControlError,
    InvalidParameter,
    MethodNotFound,
    PermissionDenied,
    RequestError,
)
from cmsod.usecases import Context
from cmsod.wire import control as w

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


def who(peer: Peer, claimed: str) -> str:
    """Who did it, as recorded: the name cmsoctl gave, with the uid the socket vouches for."""
    return f"{claimed} (uid {peer.uid})" if claimed else f"uid {peer.uid}"


# -- handlers: each decodes nothing and decides nothing; it calls one use case ---------------


async def create(ctx: Context, p: w.CreateParameters) -> dict[str, Any]:
    schedule_id, status = await usecases.create(ctx, p.schedule)
    return {"scheduleId": schedule_id, "status": status.value}


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
    if not more:  # one read: the view, or its head when it is too large for one reply
        view = await usecases.get_schedule(ctx, p.scheduleId, MAX_REPLY_ROWS)
        if view["elements"] > MAX_REPLY_ROWS:
            raise too_many("elements in this schedule")
        yield {"schedule": view}
        return
    stream = usecases.schedule_stream(ctx, p.scheduleId, STREAM_CHUNK)
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
        page, after = await usecases.list_schedules(ctx, p.status, p.limit, after)
        yield {"schedules": page, "next": after}
        if not more or after is None:
            return


async def details(
    ctx: Context, p: w.DetailsParameters, more: bool
) -> AsyncGenerator[dict[str, Any], None]:
    chunk = STREAM_CHUNK if more else MAX_REPLY_ROWS + 1
    async with contextlib.aclosing(usecases.details(ctx, p.filters, chunk)) as rows:
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
    return await usecases.why(ctx, p.element, p.scheduleId)


async def plan(ctx: Context, p: w.PlanParameters) -> dict[str, Any]:
    response, fingerprint = await usecases.plan(ctx, p.schedule)
    return {"optimizer": response, "planFingerprint": fingerprint}


async def approve(ctx: Context, p: w.ApproveParameters, peer: Peer) -> dict[str, Any]:
    return await approve_as(ctx, p, f"uid {peer.uid} pid {peer.pid}")


async def approve_as(ctx: Context, p: w.ApproveParameters, caller: str) -> dict[str, Any]:
    """The approval, recorded with who sent it (`caller`: the socket's peer credentials, or the
    REST API's authenticated user) beside the name it gives."""
    done = await usecases.approve(ctx, p.scheduleId, p.approval, caller, p.plan, p.replan)
    reply: dict[str, Any] = {
        "scheduleId": p.scheduleId,
        "status": done.status.value,
        "planFingerprint": done.plan,
    }
    if done.replanned is not None:  # the difference from the plan seen, and the new plan
        reply["replanned"] = {
            "seenFingerprint": done.replanned.seen,
            "changes": [c.to_view() for c in done.replanned.changes],
        }
    return reply


async def delete(ctx: Context, p: w.ScheduleIdParameters) -> dict[str, Any]:
    status = await usecases.delete(ctx, p.scheduleId)
    return {"scheduleId": p.scheduleId, "status": status.value}


async def pause(ctx: Context, p: w.StopParameters, peer: Peer) -> dict[str, Any]:
    status = await usecases.pause(ctx, p.scheduleId, who(peer, p.by), p.reason)
    return {"scheduleId": p.scheduleId, "status": status.value}


async def resume(ctx: Context, p: w.StopParameters, peer: Peer) -> dict[str, Any]:
    return await usecases.resume(ctx, p.scheduleId, who(peer, p.by), p.reason)


async def abort(ctx: Context, p: w.StopParameters, peer: Peer) -> dict[str, Any]:
    return await usecases.abort(ctx, p.scheduleId, who(peer, p.by), p.reason)


async def freeze(ctx: Context, p: w.FreezeParameters, peer: Peer) -> dict[str, Any]:
    return {"freeze": await usecases.freeze(ctx, p.on, who(peer, p.by), p.reason, p.until)}


async def status(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    return await usecases.health(ctx, socket.gethostname())


async def metrics(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    """What a Prometheus scrape of /metrics gets, with or without the listener."""
    return {"text": (await exposition(ctx)).decode()}


async def reload(ctx: Context, p: w.NoParameters) -> dict[str, Any]:
    return {"reloaded": True, "changed": usecases.reload(ctx)}


async def watch(ctx: Context, p: w.WatchParameters) -> AsyncIterator[dict[str, Any]]:
    async with contextlib.aclosing(usecases.watch(ctx, p.scheduleId, p.eventType)) as events:
        async for body in events:
            yield {"event": msgspec.Raw(body)}


async def availability_add(ctx: Context, p: w.AvailabilityAddParameters) -> dict[str, Any]:
    entry, touched = await usecases.availability_add(
        ctx, p.kind, p.element, p.startTime, p.endTime, p.reason, p.by, p.id
    )
    return {"entry": entry, "touches": touched}


async def availability_list(ctx: Context, p: w.AvailabilityListParameters) -> dict[str, Any]:
    return {"entries": await usecases.availability_list(ctx, p.element)}


async def availability_remove(ctx: Context, p: w.IdParameters) -> dict[str, Any]:
    await usecases.availability_remove(ctx, p.id)
    return {"id": p.id, "removed": True}


async def tickets_list(ctx: Context, p: w.TicketsListParameters) -> dict[str, Any]:
    page, after = await usecases.tickets_list(ctx, p.scheduleId, p.limit, p.after)
    return {"tickets": page, "next": after}


async def tickets_get(ctx: Context, p: w.IdParameters) -> dict[str, Any]:
    return {"ticket": await usecases.ticket(ctx, p.id)}


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
    "io.cmsod.Schedules.Pause": Method(w.StopParameters, pause, True, with_peer=True),
    "io.cmsod.Schedules.Resume": Method(w.StopParameters, resume, True, with_peer=True),
    "io.cmsod.Schedules.Abort": Method(w.StopParameters, abort, True, with_peer=True),
    "io.cmsod.Manager.Freeze": Method(w.FreezeParameters, freeze, True, with_peer=True),
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
