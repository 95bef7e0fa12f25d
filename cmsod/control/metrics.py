"""`/metrics`: the Prometheus scrape, over HTTP on `[metrics] listen` and through the control
socket (`io.cmsod.Manager.Metrics`, `cmsoctl metrics`).

The HTTP side is a deliberately small server: h11 frames HTTP/1.1 (nothing is parsed by hand),
GET or HEAD of /metrics is all it answers, at most `max_connections` at once (more are closed
at once), and a client gets `timeout_s` to send each request and take its answer. Keep-alive
is honoured, as Prometheus reuses its connection.
"""

from __future__ import annotations

import functools
from http import HTTPStatus

import h11
import trio

from cmsod import log
from cmsod.actors.context import Context
from cmsod.control.listening import Connections, accepted
from cmsod.errors import ConfigError
from cmsod.metrics import CONTENT_TYPE, Outbox, Snapshot
from cmsod.store import figures

MAX_REQUEST_BYTES = 16 * 1024  # request line and headers; a scrape sends a few hundred
MAX_BODY_BYTES = 64 * 1024  # a GET has none; more than this and the connection is closed
RECEIVE_BYTES = 16 * 1024


async def exposition(ctx: Context) -> bytes:
    """The text exposition: the store's figures read in the store's thread (never on the event
    loop), the supervisor's restart counts, and the instruments."""
    schedules, boxes, (held, gates_on) = await ctx.store.read(figures.snapshot)
    now_ms = ctx.clock.now_ms()
    in_force = ctx.planning.calendars.next_periods(now_ms, 1)
    gates_on = {**gates_on, "calendar": bool(in_force and in_force[0][0] <= now_ms)}
    if ctx.alerts is not None and ctx.alert_source.ok is not None:
        ctx.metrics.alert_source_up.set(1 if ctx.alert_source.ok else 0)
    snapshot = Snapshot(
        schedules=schedules,
        outboxes={
            name: Outbox(depth, 0.0 if oldest is None else max(0, now_ms - oldest) / 1000)
            for name, (depth, oldest) in boxes.items()
        },
        restarts={name: f.restarts for name, f in ctx.figures.items()},
        held=held,
        gates_on=gates_on,
    )
    return ctx.metrics.exposition(snapshot)


async def listen(ctx: Context) -> list[trio.SocketListener]:
    """Bind `[metrics] listen` (the daemon does it before its actors start, so that a port in
    use refuses the start as a configuration error); ConfigError naming the key."""
    cfg = ctx.config.metrics
    assert cfg.address is not None
    host, port = cfg.address
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:  # in use, not an address of this host, a port below 1024...
        raise ConfigError(f"metrics.listen = {cfg.listen!r}: {exc.strerror}") from None


async def serve(
    ctx: Context,
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `listeners` (bound by `listen`, here when not given) until cancelled;
    started() with the bound addresses (host:port, the real port when 0 was asked)."""
    if listeners is None:
        listeners = await listen(ctx)
    bound = [_name(listener.socket.getsockname()) for listener in listeners]
    log.info("metrics.listening", address=",".join(bound))
    connections = Connections("metrics")
    handle = functools.partial(handle_connection, ctx)

    async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            async for stream in accepted(listener, "metrics"):
                if connections.active >= ctx.config.metrics.max_connections:
                    log.warning(
                        "metrics.refused", reason="too many connections", active=connections.active
                    )
                    await trio.aclose_forcefully(stream)
                else:
                    nursery.start_soon(connections.serve, handle, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:  # one per address family the host resolves to
            nursery.start_soon(accept, listener, nursery)
        task_status.started(bound)


def _name(sockname: tuple) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def handle_connection(ctx: Context, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    timeout_s = ctx.config.metrics.timeout_s
    while True:
        with trio.move_on_after(timeout_s):
            try:
                request = await _read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(conn, stream, exc.error_status_hint, b"bad request\n")
                return
            if request is None:
                return  # closed by the client, or a body too large to bother with
            path = request.target.split(b"?", 1)[0]
            if path != b"/metrics":
                await _send(conn, stream, 404, b"not found: try /metrics\n")
            elif request.method not in (b"GET", b"HEAD"):
                allow = [(b"Allow", b"GET, HEAD"), (b"Content-Type", b"text/plain; charset=utf-8")]
                await _send(conn, stream, 405, b"GET or HEAD only\n", allow)
            else:
                body = await exposition(ctx)
                await _send(
                    conn,
                    stream,
                    200,
                    b"" if request.method == b"HEAD" else body,
                    [(b"Content-Type", CONTENT_TYPE.encode())],
                    length=len(body),
                )
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # either side asked to close (or the client still sends): done
            conn.start_next_cycle()
            continue
        return  # timed out: the client was too slow sending or taking


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, its body read and dropped; None when the client closed."""
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY_BYTES:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return request
        else:  # ConnectionClosed (or PAUSED, which cannot come before the request ends)
            return None


async def _send(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    length: int | None = None,
) -> None:
    headers = [
        *(headers or [(b"Content-Type", b"text/plain; charset=utf-8")]),
        (b"Content-Length", str(len(body) if length is None else length).encode()),
    ]
    response = h11.Response(
        status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()
    )
    parts = [conn.send(response)]
    if body:
        parts.append(conn.send(h11.Data(data=body)))
    parts.append(conn.send(h11.EndOfMessage()))
    await stream.send_all(b"".join(part for part in parts if part))
