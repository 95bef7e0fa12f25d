"""A small HTTP/1.1 client on trio streams, for the orchestrator's two hot paths.

Why not httpx here: httpx costs about 1 ms of CPU per request at the concurrency dispatch
needs, so 10,000 work flows polled every second would take well over a core. This client
keeps connections alive and sends a batch of status GETs down one connection in one write
(pipelining: a GET is safe to repeat, RFC 9112 §9.3.2), reading the answers as they come
with a few bytes operations: tens of microseconds per poll (bench/README.md). A dispatch
POST is never pipelined: it has a connection to itself.

It speaks only what the SO contract needs: requests with a Content-Length body; answers
with Content-Length, chunked or close-delimited bodies; keep-alive and `Connection: close`;
TLS for https URLs. Answers are bounded (MAX_HEAD, MAX_BODY); anything else is a
ProtocolError. httpx stays for the ticket system and the event sinks, where rates are low.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
READ_SIZE = 256 * 1024


class ProtocolError(Exception):
    """The peer's bytes are not an HTTP/1.1 answer we can read."""


class ConnectFailed(Exception):
    """No connection: nothing was sent."""


class Broken(Exception):
    """The connection failed after a request went out: the answers before it are in `got`."""

    def __init__(self, why: str, got: list[Response]) -> None:
        super().__init__(why)
        self.got = got


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    keep_alive: bool = True


@dataclass
class ResponseReader:
    """Answers parsed out of a byte stream, in order (pure: no I/O). `feed` bytes in, take
    `next()` until None; `eof()` when the peer closed, for a close-delimited last answer."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes | bytearray) -> None:
        self.buffer += data

    def next(self) -> Response | None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise ProtocolError("answer head too large")
                return None
            if end > MAX_HEAD:
                raise ProtocolError("answer head too large")
            status, headers, keep_alive = _head(bytes(self.buffer[:end]))
            if 100 <= status < 200:  # 100 Continue and the like: no body, the answer follows
                del self.buffer[: end + 4]
                continue
            start = end + 4
            if status in (204, 304):
                del self.buffer[:start]
                return Response(status, b"", keep_alive)
            if "chunked" in headers.get(b"transfer-encoding", b"").lower().decode("latin-1"):
                parsed = _chunked(self.buffer, start)
                if parsed is None:
                    return None
                body, used = parsed
                del self.buffer[:used]
                return Response(status, body, keep_alive)
            length = headers.get(b"content-length")
            if length is None:
                return None  # close-delimited: the whole rest, at eof()
            try:
                size = int(length)
            except ValueError:
                raise ProtocolError(f"bad Content-Length {length!r}") from None
            if not 0 <= size <= MAX_BODY:
                raise ProtocolError(f"Content-Length {size} out of bounds")
            if len(self.buffer) < start + size:
                return None
            body = bytes(self.buffer[start : start + size])
            del self.buffer[: start + size]
            return Response(status, body, keep_alive)

    def eof(self) -> Response | None:
        """The peer closed: a close-delimited answer ends here; anything else half-read is lost."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        status, headers, _ = _head(bytes(self.buffer[:end]))
        if b"content-length" in headers or b"transfer-encoding" in headers:
            return None
        body = bytes(self.buffer[end + 4 :])
        self.buffer.clear()
        return Response(status, body, keep_alive=False)


def _head(head: bytes) -> tuple[int, dict[bytes, bytes], bool]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
    status = int(parts[1])
    if not 100 <= status <= 599:
        raise ProtocolError(f"status {status} out of range")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get(b"connection", b"").lower()
    keep_alive = b"close" not in connection and (
        parts[0] == b"HTTP/1.1" or b"keep-alive" in connection
    )
    return status, headers, keep_alive


def _chunked(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body from `start`: (body, bytes used through its end), None if incomplete."""
    body = bytearray()
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            if len(buffer) - at > 1024:
                raise ProtocolError("chunk size line too long")
            return None
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size < 0 or len(body) + size > MAX_BODY:
            raise ProtocolError("chunked body too large")
        at = line_end + 2
        if size == 0:  # the last chunk; then trailers up to an empty line
            trailer_end = buffer.find(b"\r\n\r\n", at - 2)
            if trailer_end < 0:
                return None
            return bytes(body), trailer_end + 4
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


class Connection:
    def __init__(self, stream: trio.abc.Stream, fileno: int) -> None:
        self.stream = stream
        self.fileno = fileno
        self.reader = ResponseReader()
        self.usable = True

    def stale(self) -> bool:
        """An idle connection the peer has closed (or sent something unasked on): not reusable.
        Checked before reuse so a dispatch never goes down a connection that is already dead."""
        if self.reader.buffer:
            return True
        try:
            readable, _, _ = select.select([self.fileno], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)  # readable while idle: closed, or bytes nobody asked for

    async def exchange(self, requests: Sequence[bytes], read_timeout_s: float) -> list[Response]:
        """Send the requests in one write and read one answer for each, in order."""
        got: list[Response] = []
        try:
            with trio.fail_after(read_timeout_s):
                await self.stream.send_all(b"".join(requests))
                while len(got) < len(requests):
                    answer = self.reader.next()
                    if answer is not None:
                        got.append(answer)
                        if not answer.keep_alive:
                            break
                        continue
                    data = await self.stream.receive_some(READ_SIZE)
                    if not data:
                        last = self.reader.eof()
                        if last is not None:
                            got.append(last)
                        break
                    self.reader.feed(data)
        except trio.TooSlowError:
            self.usable = False
            raise Broken(f"no answer within {read_timeout_s:g} s", got) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.usable = False
            raise Broken(f"connection broken: {exc!r}", got) from None
        except ProtocolError as exc:
            self.usable = False
            raise Broken(f"not a readable HTTP answer: {exc}", got) from None
        if len(got) < len(requests) or not got[-1].keep_alive:
            self.usable = False
        if len(got) < len(requests):
            raise Broken("the connection closed before every answer came", got)
        return got

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class Http1Client:
    """Keep-alive connections to one origin, at most `max_connections` in use at once."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = self.port == (443 if self.tls else 80)
        host_header = self.host if default_port else f"{self.host}:{self.port}"
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host_header, **headers}.items())
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        self._ssl = ssl.create_default_context() if self.tls else None

    def encode(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        length = f"Content-Length: {len(body)}\r\n" if body or method != "GET" else ""
        head = f"{method} {self.base_path}{path} HTTP/1.1\r\n{self._fixed}{extra}{length}\r\n"
        return head.encode("latin-1") + body

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """One request on a connection of its own. ConnectFailed: nothing was sent. Broken:
        it was sent (or may have been) and no usable answer came."""
        (answer,) = await self.exchange([self.encode(method, path, headers, body)])
        return answer

    async def exchange(self, requests: Sequence[bytes]) -> list[Response]:
        """Requests (only safe ones if more than one) down one connection, answers in order."""
        async with self._slots:
            connection = await self._checkout()
            try:
                return await connection.exchange(requests, self.read_timeout_s)
            finally:
                if connection.usable:
                    self._idle.append(connection)
                else:
                    await connection.aclose()

    async def _checkout(self) -> Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.stale():
                return connection
            await connection.aclose()
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
                sock = stream.socket  # type: ignore[attr-defined]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl is not None:
                    stream = trio.SSLStream(stream, self._ssl, server_hostname=self.host)
                    await stream.do_handshake()
        except trio.TooSlowError:
            raise ConnectFailed(f"connect timed out after {self.connect_timeout_s:g} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            reason = errno.errorcode.get(getattr(exc, "errno", 0) or 0, "") or repr(exc)
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {reason}") from None
        return Connection(stream, sock.fileno())

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()
