"""The HTTP/1.1 client for the orchestrator's hot paths: h11 frames every byte, this module
moves the bytes over trio streams and keeps a pool of keep-alive connections to one origin.

Why not httpx here: httpx costs about 1 ms of CPU per request at the concurrency dispatch and
polling need; h11 (the sans-IO parser httpcore itself is built on) costs tens of microseconds
(bench/README.md). httpx stays for the ticket system and the event sinks, where rates are low.

The rules that keep an answer from ever reaching the wrong request:
- One request per connection at a time; no pipelining (h11's client side does not pipeline,
  and with pipelining one mis-framed answer shifts every later one).
- A connection goes back to the pool only after a complete exchange that both sides agreed
  to keep alive (h11: both sides DONE, then `start_next_cycle`). Anything else (an error, a
  timeout, a cancellation at any await) closes it, so an answer still on the wire dies with
  its connection.
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
    """The request went out (or may have) and no whole, well-framed answer came back."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class Connection:
    """One connection and its h11 state machine."""

    def __init__(self, stream: trio.abc.Stream, fileno: int) -> None:
        self.stream = stream
        self.fileno = fileno
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def stale(self) -> bool:
        """An idle connection the peer has closed (or sent something unasked on)."""
        idle = select.poll()
        idle.register(self.fileno, select.POLLIN)
        return bool(idle.poll(0))

    async def exchange(self, request: h11.Request, body: bytes) -> Response:
        """Send one request, read its whole answer. Raises h11.ProtocolError, ProtocolError,
        and whatever the stream raises; the caller closes the connection on any exception."""
        out = self.h11.send(request) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        await self.stream.send_all(out + (self.h11.send(h11.EndOfMessage()) or b""))
        status, parts, size = 0, [], 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
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

    def reusable(self) -> bool:
        """After an exchange: may this connection carry the next request?"""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


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

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """One exchange on a connection of its own. ConnectFailed: nothing was sent. Broken:
        it was sent (or may have been) and no whole answer came."""
        fields = [*self._fixed, *(headers or {}).items()]
        if body or method not in ("GET", "HEAD"):
            fields.append(("Content-Length", str(len(body))))
        try:
            request = h11.Request(method=method, target=self.base_path + path, headers=fields)
        except h11.LocalProtocolError as exc:
            raise ValueError(f"cannot send {method} {path}: {exc}") from None
        async with self._slots:
            connection = await self._checkout()
            try:
                with trio.fail_after(self.read_timeout_s):
                    answer = await connection.exchange(request, body)
            except BaseException as exc:
                # Cancelled, timed out or failed half-way: the rest of the answer may still
                # come, so this connection must never carry another request.
                await trio.aclose_forcefully(connection.stream)
                failure = _broken(exc, self.read_timeout_s)
                if failure is exc:
                    raise
                raise failure from None
            if connection.reusable():
                self._idle.append(connection)
            else:
                await trio.aclose_forcefully(connection.stream)
            return answer

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
            raise ConnectFailed(
                f"cannot connect to {self.host}:{self.port}: {_reason(exc)}"
            ) from None

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


def _broken(exc: BaseException, read_timeout_s: float) -> BaseException:
    """What a failed exchange raises: Broken for the peer's faults, anything else unchanged
    (a cancellation stays a cancellation)."""
    if isinstance(exc, trio.TooSlowError):
        return Broken(f"no answer within {read_timeout_s:g} s")
    if isinstance(exc, h11.ProtocolError | ProtocolError):
        return Broken(f"not a well-framed HTTP/1.1 answer: {exc}")
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
        return Broken(f"connection broken: {_reason(exc)}")
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
