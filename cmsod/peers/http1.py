"""The HTTP/1.1 client for the orchestrator's hot paths: h11 frames every byte, this module
moves the bytes over trio streams and keeps a pool of keep-alive connections to one origin.

Why not httpx here: httpx costs about 1 ms of CPU per request at the concurrency dispatch and
polling need; h11 (the sans-IO parser httpcore itself is built on) costs tens of microseconds
(bench/README.md). httpx stays for the ticket system and the event sinks, where rates are low.

The rules that keep an answer from ever reaching the wrong request:
- A connection carries one exchange at a time: one request, or (status polls only) a batch of
  GETs pipelined in one write, `so.pipeline_depth` at most; a GET is safe to repeat (RFC 9112
  §9.3.2). h11's client does not pipeline on one state machine, so each request of a batch
  gets an h11.Connection of its own: it frames that request and reads exactly that answer, and
  the bytes after it (`trailing_data`) go to the next request's. A dispatch POST is never
  pipelined.
- A batch stops at the first answer that is not whole and well-framed (or ends the
  connection); the polls after it fail, and nothing after it is read as an answer.
- A connection goes back to the pool only after a complete exchange that both sides agreed
  to keep alive, with no byte left over. Anything else (an error, a timeout, a cancellation
  at any await) closes it, so an answer still on the wire dies with its connection.
- Framing is h11's, which refuses conflicting Content-Lengths and a chunk not followed by
  CRLF; an answer carrying both Content-Length and Transfer-Encoding is refused here too
  (RFC 9112 §6.3: "ought to be handled as an error").
- Before an idle connection is reused it is checked with poll(2) (any file descriptor number):
  readable while idle means closed by the peer or sent something nobody asked for: closed.

Answers are bounded: the head by MAX_HEAD, the body by MAX_BODY.
"""

from __future__ import annotations

import errno
import select
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
READ_SIZE = 64 * 1024


class ProtocolError(Exception):
    """The peer's bytes are not an HTTP/1.1 answer we accept."""


class ConnectFailed(Exception):
    """No connection: nothing was sent."""


class Broken(Exception):
    """The requests went out (or may have) and not every answer came back whole and
    well-framed: the answers before the failure are in `got`."""

    def __init__(self, why: str, got: list[Response] | None = None) -> None:
        super().__init__(why)
        self.got = got or []


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


Outgoing = tuple[h11.Request, bytes]  # a request and its body


class Connection:
    """One connection; each exchange on it frames its requests with fresh h11 state machines."""

    def __init__(self, stream: trio.abc.Stream, fileno: int) -> None:
        self.stream = stream
        self.fileno = fileno

    def stale(self) -> bool:
        """An idle connection the peer has closed (or sent something unasked on)."""
        idle = select.poll()
        idle.register(self.fileno, select.POLLIN)
        return bool(idle.poll(0))

    async def exchange(self, requests: Sequence[Outgoing], got: list[Response]) -> bool:
        """Send the requests in one write, then read their answers in order into `got`.
        True if the connection may carry the next exchange. Raises h11.ProtocolError,
        ProtocolError and whatever the stream raises; the caller then closes the connection."""
        cycles = [h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD) for _ in requests]
        out = bytearray()
        for cycle, (request, body) in zip(cycles, requests, strict=True):
            out += cycle.send(request) or b""
            if body:
                out += cycle.send(h11.Data(data=body)) or b""
            out += cycle.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)
        left, closed = b"", False
        for cycle in cycles:
            if left:
                cycle.receive_data(left)
            if closed:
                cycle.receive_data(b"")
            got.append(await self._answer(cycle))
            if cycle.their_state is not h11.DONE:  # the answer ends the connection
                return False
            left, closed = cycle.trailing_data
        return not left and not closed  # a byte nobody asked for: not reusable

    async def _answer(self, cycle: h11.Connection) -> Response:
        status, parts, size = 0, [], 0
        while True:
            event = cycle.next_event()
            if event is h11.NEED_DATA:
                cycle.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
            elif isinstance(event, h11.Response):
                fields = dict(event.headers)  # h11 refused conflicting repeats already
                if b"content-length" in fields and b"transfer-encoding" in fields:
                    raise ProtocolError("both Content-Length and Transfer-Encoding")
                if int(fields.get(b"content-length", 0)) > MAX_BODY:
                    raise ProtocolError(f"Content-Length over {MAX_BODY} bytes")
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise ProtocolError(f"answer body over {MAX_BODY} bytes")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, b"".join(parts))
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolError("the peer closed the connection before answering")
            # h11.InformationalResponse (100 Continue and the like): the answer follows


class Http1Client:
    """Keep-alive connections to one origin, at most `max_connections` in use at once."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname  # without the brackets of an IPv6 literal
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        host_header = host if default_port else f"{host}:{self.port}"
        self._fixed = [("Host", host_header), *headers.items()]
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        if self.tls and ssl_context is None:
            raise ValueError(f"{url}: an https URL needs the SSL context of [tls] (peers/tls.py)")
        self._ssl = ssl_context if self.tls else None

    def encode(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Outgoing:
        fields = [*self._fixed, *(headers or {}).items()]
        if body or method not in ("GET", "HEAD"):
            fields.append(("Content-Length", str(len(body))))
        try:
            return h11.Request(method=method, target=self.base_path + path, headers=fields), body
        except h11.LocalProtocolError as exc:
            raise ValueError(f"cannot send {method} {path}: {exc}") from None

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """One request on a connection of its own. ConnectFailed: nothing was sent. Broken:
        it was sent (or may have been) and no whole answer came."""
        (answer,) = await self.exchange([self.encode(method, path, headers, body)])
        return answer

    async def exchange(self, requests: Sequence[Outgoing]) -> list[Response]:
        """Requests (only safe ones if more than one) down one connection, answers in order.
        Broken carries the answers that came before the failure."""
        if len(requests) > 1 and any(r.method not in (b"GET", b"HEAD") for r, _ in requests):
            raise ValueError("only GET and HEAD may be pipelined: they are safe to repeat")
        got: list[Response] = []
        async with self._slots:
            connection = await self._checkout()
            try:
                with trio.fail_after(self.read_timeout_s):
                    reusable = await connection.exchange(requests, got)
            except BaseException as exc:
                # Cancelled, timed out or failed half-way: the rest of an answer may still
                # come, so this connection must never carry another request.
                await trio.aclose_forcefully(connection.stream)
                failure = _broken(exc, self.read_timeout_s, got)
                if failure is exc:
                    raise
                raise failure from None
            if reusable:
                self._idle.append(connection)
            else:
                await trio.aclose_forcefully(connection.stream)
        if len(got) < len(requests):
            raise Broken("the connection closed before every answer came", got)
        return got

    async def _checkout(self) -> Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.stale():
                return connection
            await trio.aclose_forcefully(connection.stream)
        try:
            with trio.fail_after(self.connect_timeout_s):
                return await self._connect()
        except trio.TooSlowError:
            raise ConnectFailed(f"connect timed out after {self.connect_timeout_s:g} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            # the caller names the peer and its address (its URL): the cause alone here
            raise ConnectFailed(f"cannot connect: {_reason(exc)}") from None

    async def _connect(self) -> Connection:
        tcp = await trio.open_tcp_stream(self.host, self.port)
        if self._ssl is None:
            return Connection(tcp, tcp.socket.fileno())
        # https_compatible: servers often close without a TLS close_notify
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=self.host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return Connection(tls, tcp.socket.fileno())

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)


def _broken(exc: BaseException, read_timeout_s: float, got: list[Response]) -> BaseException:
    """What a failed exchange raises: Broken for the peer's faults, anything else unchanged
    (a cancellation stays a cancellation)."""
    if isinstance(exc, trio.TooSlowError):
        return Broken(f"no answer within {read_timeout_s:g} s", got)
    if isinstance(exc, h11.ProtocolError | ProtocolError):
        return Broken(f"not a well-framed HTTP/1.1 answer: {exc}", got)
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
        return Broken(f"connection broken: {_reason(exc)}", got)
    return exc


def _reason(exc: BaseException) -> str:
    """The root cause, briefly: trio wraps it (BrokenResourceError, "all attempts failed")."""
    while not getattr(exc, "errno", None):
        if isinstance(exc, BaseExceptionGroup):  # one error per address tried: the last
            exc = exc.exceptions[-1]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    return errno.errorcode.get(getattr(exc, "errno", None) or 0, "") or repr(exc)
