"""Accepting and serving connections, shared by the control socket and the metrics listener:
as `trio.serve_listeners` does, running out of descriptors (or kernel memory) pauses the accept
loop briefly instead of ending the server; and a connection's failure, a client going away or a
bug, costs that connection only."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from cmsod import log

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE_S = 0.1


async def accepted(listener: trio.SocketListener, name: str) -> AsyncIterator[trio.SocketStream]:
    """Every connection `listener` accepts; a burst of capacity failures is logged once as
    `<name>.accept_failed`, and its end as `<name>.accept_recovered` with their count."""
    failed = 0  # accept() failures in the current burst
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            if not failed:
                log.error(f"{name}.accept_failed", reason=exc.strerror)
            failed += 1
            await trio.sleep(ACCEPT_PAUSE_S)
            continue
        if failed:
            log.warning(f"{name}.accept_recovered", failures=failed)
            failed = 0
        yield stream


class Connections:
    """The connections one server is serving: `active` counts them (for the server's cap), and
    `serve` runs each one's handler so that nothing it raises reaches the server."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = 0

    async def serve(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
        stream: trio.SocketStream,
    ) -> None:
        self.active += 1
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-conversation: nothing to answer
        except Exception:  # a bug must cost one connection, never the server
            log.error(f"{self.name}.connection_failed", exc_info=True)
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)
