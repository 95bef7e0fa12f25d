"""The HTTP listener: hypercorn's trio worker serving `RestApp`, inside the daemon's nursery.

Connections are accepted here and handed to hypercorn's trio connection handler (`TCPServer`,
HTTP/1.1) rather than through `hypercorn.trio.serve`, for two
things that function cannot do: a limit on open connections (one more is answered 503 and
closed), and knowing the client certificate of a connection, whose common name stands for a
user under mutual TLS. On `ctx.stopping` (SIGTERM) no new connection is accepted; idle ones
are closed, requests in progress are answered, within `daemon.shutdown_grace_s`.
"""

from __future__ import annotations

import functools
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from cmsod import log
from cmsod.actors.context import Context
from cmsod.config import HttpConfig
from cmsod.control.metrics import exposition
from cmsod.errors import ConfigError
from cmsod.rest.app import RestApp, Scope
from cmsod.rest.auth import Credentials

BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: 25\r\nconnection: close\r\n\r\ntoo many HTTP connections"
)


def hypercorn_config(cfg: HttpConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.h11_max_incomplete_size = cfg.max_header_bytes  # request line and headers
    # HTTP/1.1 only, also over TLS: CMSO's clients speak it, and hypercorn's HTTP/2 lets an
    # exception out of a connection when an answer comes before the body (a 413, say).
    hc.alpn_protocols = ["http/1.1"]
    hc.keep_alive_timeout = cfg.idle_timeout_s  # also bounds a request's headers (slowloris)
    # No read timeout: it would cut off an answer that takes longer than it to send (a client
    # sends nothing while it reads a streamed scheduleDetails). What it guarded is bounded
    # elsewhere: headers by keep_alive_timeout, a body by the app (408 after
    # request_timeout_s), a client that stops reading by `SendDeadline`.
    hc.read_timeout = None
    hc.ssl_handshake_timeout = cfg.request_timeout_s
    hc.errorlog = None  # cmsod logs what matters itself, in its own format
    hc.accesslog = None
    hc.include_server_header = False
    if cfg.certfile:
        hc.certfile, hc.keyfile = cfg.certfile, cfg.keyfile
        if cfg.client_ca:
            hc.ca_certs = cfg.client_ca
            hc.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return hc


def bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"http.listen = {listen!r}: {exc.strerror}") from None
    sock.listen(1024)
    return sock


class SendDeadline:
    """A connection's stream whose every send must finish within `timeout_s`, else the client
    is cut off (BrokenResourceError, as when it hangs up). hypercorn sends under a shielded
    cancel scope: without this a client that stops reading held its connection, and the
    answer's task, for ever (and SIGTERM's drain with them). Everything else is the stream's."""

    def __init__(self, stream: trio.abc.Stream, timeout_s: float) -> None:
        self._stream = stream
        self._timeout_s = timeout_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not data:  # h11's end of a body of known length: nothing to send (a third of
            return  # the sends of an answer, each a cancel scope and a lock in hypercorn)
        with trio.move_on_after(self._timeout_s) as scope:
            await self._stream.send_all(data)
        if scope.cancelled_caught:
            log.warning("http.slow_reader", timeout_s=self._timeout_s)
            raise trio.BrokenResourceError(f"the client took no data for {self._timeout_s} s")


def _common_name(stream: trio.SSLStream[trio.SocketStream]) -> str | None:
    cert = stream.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass
class Bound:
    """What the listener needs before it serves: read and bound at start-up, before the
    daemon's actors, so that a taken port or a bad file refuses the start (EX_CONFIG)."""

    credentials: Credentials
    hc: HypercornConfig
    tls: ssl.SSLContext | None
    sock: socket.socket

    def close(self) -> None:
        self.sock.close()


def listen(cfg: HttpConfig) -> Bound:
    """The credentials read, the TLS context made and the socket bound; ConfigError saying
    which key is wrong."""
    credentials = Credentials(Path(cfg.credentials_file))
    credentials.load()
    hc = hypercorn_config(cfg)
    try:
        tls = hc.create_ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"http TLS files: {exc}") from None
    return Bound(credentials, hc, tls, bind(cfg.listen))


async def serve(
    ctx: Context,
    bound: Bound | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `bound` (made by `listen`, here when not given) until `ctx.stopping`;
    `task_status` gets the bound `host:port`."""
    cfg = ctx.config.http
    if bound is None:
        bound = listen(cfg)
    credentials, hc, tls, sock = bound.credentials, bound.hc, bound.tls, bound.sock
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    by_address: dict[tuple[str, int], str] = {}  # client address -> its certificate's user

    def client_user(scope: Scope) -> str | None:
        client = scope.get("client")
        return by_address.get(tuple(client)) if client else None  # type: ignore[arg-type]

    # The KDF runs like the rest of the daemon's blocking work: a worker thread of its own in
    # production, inline under the tests' MockClock (see cmsod.executor).
    metrics = (lambda: exposition(ctx)) if ctx.config.metrics.address is not None else None
    app = ASGIWrapper(RestApp(ctx, credentials, type(ctx.compute)(), client_user, metrics))  # type: ignore[arg-type]
    worker = WorkerContext(None)
    active = 0

    async def connection(raw: trio.SocketStream) -> None:
        nonlocal active
        active += 1
        address = raw.socket.getpeername()[:2]
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = raw
        try:
            if tls is not None:
                stream = trio.SSLStream(raw, tls, server_side=True, https_compatible=True)
                with trio.fail_after(hc.ssl_handshake_timeout):
                    await stream.do_handshake()
                name = _common_name(stream)
                if name is not None:
                    by_address[address] = name
            if active > cfg.max_connections:
                log.warning("http.refused", reason="too many connections", active=active)
                with trio.move_on_after(1.0):
                    await stream.send_all(BUSY)
                return
            bounded = SendDeadline(stream, cfg.request_timeout_s)
            await TCPServer(app, hc, worker, ConnectionState({}), bounded)  # type: ignore[arg-type]
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away, or its TLS handshake failed or took too long
        except Exception:  # a bug must cost one connection, never the listener (or the daemon)
            log.error("http.connection_failed", exc_info=True, client=f"{address[0]}:{address[1]}")
        finally:
            active -= 1
            by_address.pop(address, None)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                functools.partial(
                    trio.serve_listeners, connection, [listener], handler_nursery=connections
                )
            )
            host, port = sock.getsockname()[:2]
            where = f"{host}:{port}"
            log.info("http.listening", address=where, tls=tls is not None)
            task_status.started(where)
            await ctx.stopping.wait()
            accepting.cancel_scope.cancel()
        await listener.aclose()
        log.info("http.draining", connections=active)
        await worker.terminated.set()  # idle connections close; busy ones after their answer
        connections.cancel_scope.deadline = trio.current_time() + ctx.config.daemon.shutdown_grace_s
    ctx.http_drained.set()  # the daemon stops once this (and its own work) is done
