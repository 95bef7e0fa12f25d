"""The control socket server: framing, limits and peer credentials.

Each message is one JSON object followed by NUL. A connection may send several requests one
after another; replies come back in order. Limits: a message over `max_message_bytes` gets an
error and the connection is closed (the framing is lost); no complete message within
`idle_timeout_s` closes it (a NUL-less stream held open cannot pin a slot); at most
`max_connections` at once, further ones are told so and closed. Out of descriptors or memory
(EMFILE, ENFILE, ENOBUFS, ENOMEM on accept), the server logs once per burst, pauses briefly
and keeps serving, as `trio.serve_listeners` does: the waiting clients stay in the kernel's
queue until descriptors come free.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import socket
import struct
from pathlib import Path

import msgspec
import trio

from cmsod import log
from cmsod.control.api import Peer, handle_message
from cmsod.control.listening import Connections, accepted
from cmsod.usecases import Context

REPLY_TIMEOUT_S = 10.0


def peer_credentials(stream: trio.SocketStream) -> Peer:
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError:
        pid, uid, gid = -1, -1, -1
    return Peer(pid=pid, uid=uid, gid=gid)


def _error(name: str, message: str) -> bytes:
    return msgspec.json.encode({"error": name, "parameters": {"message": message}}) + b"\0"


def _claim_path(path: Path) -> None:
    """Remove a stale socket file; refuse to start beside a live daemon. (Start-up only, so
    plain blocking calls on a local file are fine here.)"""
    if not path.exists() and not path.is_symlink():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            path.unlink(missing_ok=True)
            return
    raise RuntimeError(f"another cmsod is listening on {path}")


async def serve(
    ctx: Context, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    path = ctx.config.socket_path
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim_path(path)
    # Bound with the plain socket: trio binds a Unix path in a worker thread, which would let
    # a test's MockClock race ahead (trio issue 456); a one-off local bind needs no thread.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.bind(str(path))
    os.chmod(path, int(ctx.config.control.socket_mode, 8))
    if ctx.config.control.socket_group:
        os.chown(path, -1, grp.getgrnam(ctx.config.control.socket_group).gr_gid)
    raw.listen(1024)  # a burst of clients waits in the kernel, not at EAGAIN
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    connections = Connections("control")
    handle = functools.partial(handle_connection, ctx)

    async def refuse(stream: trio.SocketStream) -> None:
        with trio.move_on_after(1.0):
            await stream.send_all(
                _error("io.cmsod.TooManyConnections", "too many control connections")
            )
        await trio.aclose_forcefully(stream)

    try:
        task_status.started(path)
        async with trio.open_nursery() as nursery:
            async for stream in accepted(listener, "control"):
                if connections.active >= ctx.config.control.max_connections:
                    log.warning(
                        "control.refused", reason="too many connections", active=connections.active
                    )
                    nursery.start_soon(refuse, stream)
                else:
                    nursery.start_soon(connections.serve, handle, stream)
    finally:
        path.unlink(missing_ok=True)
        await listener.aclose()


async def handle_connection(ctx: Context, stream: trio.SocketStream) -> None:
    peer = peer_credentials(stream)
    buffer = bytearray()
    deadline = trio.current_time() + ctx.config.control.idle_timeout_s
    while True:
        data = b""
        with trio.move_on_at(deadline):
            data = await stream.receive_some(65536)
        if trio.current_time() >= deadline:
            log.debug("control.idle_closed", uid=peer.uid, pid=peer.pid)
            return
        if not data:
            return
        buffer += data
        while (end := buffer.find(b"\0")) >= 0:
            message = bytes(buffer[:end])
            del buffer[: end + 1]
            async with contextlib.aclosing(handle_message(ctx, peer, message)) as replies:
                async for reply in replies:
                    with trio.move_on_after(REPLY_TIMEOUT_S) as scope:
                        await stream.send_all(reply + b"\0")
                    if scope.cancelled_caught:
                        log.warning("control.client_stalled", uid=peer.uid, pid=peer.pid)
                        return
            deadline = trio.current_time() + ctx.config.control.idle_timeout_s
        if len(buffer) > ctx.config.control.max_message_bytes:
            log.warning("control.message_too_large", uid=peer.uid, pid=peer.pid, size=len(buffer))
            with trio.move_on_after(1.0):
                await stream.send_all(
                    _error(
                        "io.cmsod.MessageTooLarge",
                        f"message exceeds {ctx.config.control.max_message_bytes} bytes",
                    )
                )
            return
