"""Accepting connections whatever the process's descriptor budget, shared by the control
socket and the metrics listener: as `trio.serve_listeners` does, running out of descriptors (or
kernel memory) pauses the accept loop briefly instead of ending the server."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

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
