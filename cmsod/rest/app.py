"""The ASGI application: CMSO's REST paths translated to the control socket's handlers.

Nothing here knows a CMSO rule. A request is authenticated, its body decoded into the same
wire Struct the socket decodes (with the same limits), the same handler of `control.api` is
called, and an `io.cmsod.RequestError` becomes CMSO's HTTP answer: its `status` and
`{"requestError": {...}}`. What is HTTP's own is here: paths and methods, the version headers
(reference/cmso.md 2.1), the path id matching the body's, who may do what, and the limits on
what a client may send.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import msgspec
import trio

from cmsod import log, usecases
from cmsod.actors.context import Context
from cmsod.control import api
from cmsod.errors import ControlError, InvalidParameter, RequestError
from cmsod.executor import Executor
from cmsod.lifecycle import validate_request
from cmsod.rest.auth import (
    MAX_PASSWORD_BYTES,
    NO_PASSWORD,
    Credentials,
    Level,
    User,
    check_password,
)
from cmsod.store import views
from cmsod.wire import cmso
from cmsod.wire import control as w
from cmsod.wire import rest as x

OPENAPI_PATH = "/cmso/openapi.json"
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()
VERSION = re.compile(r"^v[12]$", re.IGNORECASE)
LATEST_VERSION = b"2.0.0"
# cmsod's own routes beside CMSO's, under /cmso/<version>/x-cmsod/ (OpenAPI tag "cmsod
# extensions"): the controls of "Stop, hold and gate a rollout", which CMSO never had.
EXTENSIONS = "x-cmsod"
# what each answers: its status, and the view (resume) or the counts (abort) it says after
STOPS = {"resume": usecases.resume, "abort": usecases.abort}  # and "pause" (Api.stop)
STOP_ACTIONS = ("pause", "resume", "abort")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_encoder = msgspec.json.Encoder()


@dataclass
class Answer(Exception):
    """An HTTP answer raised from anywhere in the handling of one request."""

    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    stream: AsyncGenerator[bytes, None] | None = None  # the body, in chunks (no length)


def problem(status: int, message_id: str, text: str, *variables: str, **kw: Any) -> Answer:
    """cmsod's own refusals (auth, limits, routing) in CMSO's requestError shape."""
    error = {"messageId": f"cmsod.{message_id}", "text": text, "variables": list(variables)}
    return Answer(status, _encoder.encode({"requestError": error}), **kw)


def request_error(exc: RequestError) -> Answer:
    return Answer(
        exc.status, _encoder.encode({"requestError": exc.to_parameters()["requestError"]})
    )


def json_answer(status: int, value: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    return Answer(status, _encoder.encode(value), headers=headers)


UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.*)`")


def invalid_body(exc: Exception) -> Answer:
    """A body that does not decode: CMSO's 400 naming the field (where msgspec says which; an
    unknown field by its own name), its one variable, and msgspec's reason said once."""
    reason, at, where = str(exc).rpartition(" - at `$")
    if not at:  # the body as a whole: not JSON, not an object, nested too deeply
        reason, where = str(exc), ""
    path = where.rstrip("`").lstrip(".")
    unknown = UNKNOWN_FIELD.fullmatch(reason)
    if unknown is not None:
        path = f"{path}.{unknown[1]}" if path else unknown[1]
        reason = "not a field of this body"
    field = path or "body"
    text = f"Invalid attribute {field}: {reason}"
    return request_error(RequestError(400, "INVALID_ATTRIBUTE", field, text=text))


class ViewCache:
    """Encoded answers of `GET /schedules/{id}`, each valid while the store's version (any
    value, compared for equality) stays. CMSO's clients poll a schedule until its status
    changes: a view is read and encoded once per change, not once per request, and requests
    for a view being read wait for that read instead of starting their own. At most `entries`
    views of `max_bytes` each (larger ones are not kept); a failed read (404, too many rows)
    is not kept either."""

    def __init__(self, entries: int = 128, max_bytes: int = 256 * 1024) -> None:
        self.size = entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[Hashable, bytes]] = OrderedDict()
        self.reading: dict[str, trio.Event] = {}

    async def get(
        self,
        key: str,
        version: Callable[[], Awaitable[Hashable]],
        read: Callable[[], Awaitable[bytes]],
    ) -> bytes:
        while True:
            now = await version()  # before the read: what it sees is at least this recent
            hit = self.entries.get(key)
            if hit is not None and hit[0] == now:
                self.entries.move_to_end(key)
                return hit[1]
            busy = self.reading.get(key)
            if busy is None:
                break
            await busy.wait()  # then look again: it may have failed, or be of an older commit
        done = self.reading[key] = trio.Event()
        try:
            body = await read()
        finally:
            del self.reading[key]
            done.set()
        if len(body) <= self.max_bytes:
            self.entries[key] = (now, body)
            self.entries.move_to_end(key)
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return body


@dataclass
class Call:
    """One request as the routes see it."""

    scope: Scope
    receive: Receive
    user: User
    segments: list[str]  # the path after /cmso/<version>/, each segment percent-decoded

    def query(self) -> dict[str, list[str]]:
        values: dict[str, list[str]] = {}
        for name, value in parse_qsl(self.scope["query_string"].decode("latin-1"), True):
            values.setdefault(name, []).append(value)
        return values


class RestApp:
    """The ASGI callable. `metrics`, when given, renders `/metrics` on this listener: the
    Prometheus exposition of issue 13 (on main after this branch was cut, as
    `cmsod.control.metrics.exposition(ctx)`) plugs in here, in `server.serve`."""

    def __init__(
        self,
        ctx: Context,
        credentials: Credentials,
        kdf: Executor,
        client_user: Callable[[Scope], str | None] = lambda scope: None,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.credentials = credentials
        self.kdf = kdf
        self.client_user = client_user
        self.metrics = metrics
        self.views = ViewCache()

    async def version(self) -> Hashable:
        """What a cached view is valid for. SQLite: this daemon's commits (the store is its
        own). PostgreSQL: other daemons commit too, unseen by that count, so the server's
        snapshot, read each time (views.snapshot): a GET after a commit on any daemon reads
        again."""
        store = self.ctx.store
        return await store.read(views.snapshot) if store.postgres else store.commits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not served (hypercorn closes the connection)
        minor = _header(scope, b"x-minorversion") or b"0"
        try:
            answer = await self.answer(scope, receive, minor)
        except Answer as exc:
            answer = exc
        except RequestError as exc:
            answer = request_error(exc)
        except InvalidParameter as exc:  # (list's `after`) as a body's field is refused
            field = exc.parameters["parameter"]
            text = f"Invalid attribute {field}: {exc}"
            answer = request_error(RequestError(400, "INVALID_ATTRIBUTE", field, text=text))
        except ControlError as exc:  # the socket's refusals: too many rows for one answer
            answer = problem(400, exc.name.rsplit(".", 1)[-1].upper(), str(exc))
        except Exception as exc:  # a bug or a store failure: answer, log, keep serving
            log.error("http.failed", exc_info=True, method=scope["method"], path=scope["path"])
            answer = problem(500, "INTERNAL_ERROR", f"{type(exc).__name__} (in cmsod's log)")
        if answer.stream is not None:
            await self.stream(scope, receive, send, answer, minor)
            return
        headers: Headers = [
            (b"content-type", answer.content_type),
            (b"content-length", str(len(answer.body)).encode()),
            (b"x-latestversion", LATEST_VERSION),
            (b"x-minorversion", minor[:16]),
            (b"x-patchversion", b"0"),
            *answer.headers,
        ]
        body = answer.body if answer.status != 204 else b""
        if not body:  # 202, 204: no body, so no type (and 204 not even a length)
            drop = (
                (b"content-type", b"content-length") if answer.status == 204 else (b"content-type",)
            )
            headers = [h for h in headers if h[0] not in drop]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def stream(
        self, scope: Scope, receive: Receive, send: Send, answer: Answer, minor: bytes
    ) -> None:
        """A body of unknown length, sent as it is made (chunked: HTTP/1.1 frames each send).
        A client that hangs up ends it (and the read behind it); a failure once the status is
        sent can only cut the body short, which the client sees as a broken answer."""
        assert answer.stream is not None
        headers: Headers = [
            (b"content-type", answer.content_type),
            (b"x-latestversion", LATEST_VERSION),
            (b"x-minorversion", minor[:16]),
            (b"x-patchversion", b"0"),
            *answer.headers,
        ]
        sent = 0
        async with contextlib.aclosing(answer.stream) as chunks, trio.open_nursery() as nursery:

            async def hang_up() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                log.info("http.client_gone", path=scope["path"], sent=sent)
                nursery.cancel_scope.cancel()

            nursery.start_soon(hang_up)
            try:
                await send(
                    {"type": "http.response.start", "status": answer.status, "headers": headers}
                )
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent += len(chunk)
                await send({"type": "http.response.body", "body": b""})
            except Exception:  # the status is out: the connection closes mid-body
                log.error("http.failed", exc_info=True, method=scope["method"], path=scope["path"])
            nursery.cancel_scope.cancel()

    async def answer(self, scope: Scope, receive: Receive, minor: bytes) -> Answer:
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.decode("latin-1")
        parts = path.strip("/").split("/")
        # h11 bounds only headers still arriving; a block that came whole is measured here
        limit = self.ctx.config.http.max_header_bytes
        size = len(raw) + len(scope["query_string"])
        if size + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > limit:
            raise problem(431, "HEADERS_TOO_LARGE", f"headers may have {limit} bytes at most")
        user = await self.authenticate(scope)
        method = scope["method"]
        if path == OPENAPI_PATH:
            return _only(method, "GET") or Answer(200, OPENAPI)
        if path == "/metrics" and self.metrics is not None:
            return _only(method, "GET") or Answer(
                200, await self.metrics(), b"text/plain; version=0.0.4; charset=utf-8"
            )
        if len(parts) < 3 or parts[0] != "cmso":
            raise problem(404, "NOT_FOUND", f"no such path {path}", path)
        if not VERSION.match(parts[1]):  # CMSO's own answers, text and all (cmso.md 2.1)
            return Answer(404, b"Unsupported Major version", b"text/plain")
        if minor != b"0":
            return Answer(404, b"Unsupported API version", b"text/plain")
        call = Call(scope, receive, user, [unquote(p) for p in parts[2:]])
        return await self.route(call, method)

    async def route(self, call: Call, method: str) -> Answer:
        s = call.segments
        if s == ["health"]:
            return _only(method, "GET") or await self.health(call)
        if s[0] == EXTENSIONS:
            return await self.extension(call, method)
        if s[0] != "schedules":
            raise problem(404, "NOT_FOUND", "no such path", "/".join(s))
        if len(s) == 1:
            return _only(method, "GET") or await self.list(call)
        if s[1:] == ["scheduleDetails"]:
            return _only(method, "GET") or await self.details(call)
        if len(s) == 2:
            if method == "GET":
                return await self.get(call, s[1])
            if method in ("POST", "PUT"):
                return await self.create(call, s[1])
            if method == "DELETE":
                return await self.delete(call, s[1])
            return _not_allowed("GET, POST, PUT, DELETE")
        if len(s) == 3 and s[2] == "approvals":
            return _only(method, "POST") or await self.approve(call, s[1])
        raise problem(404, "NOT_FOUND", "no such path", "/".join(s))

    # -- the routes: decode, permit, call the socket's handler ---------------------------------

    async def health(self, call: Call) -> Answer:
        _permit(call, Level.read)
        _no_query(call, "checkInterfaces")
        report = await api.status(self.ctx, w.NoParameters())
        return json_answer(200 if report["healthy"] else 400, report)  # CMSO: 400 unhealthy

    async def list(self, call: Call) -> Answer:
        _permit(call, Level.read)
        query = call.query()
        _no_query(call, "status", "limit", "after")
        parameters = _convert(
            {
                "status": query.get("status"),
                "limit": _one(query, "limit", "100"),
                "after": _one(query, "after", None),
            },
            w.ListParameters,
        )
        result = await api.one_reply(api.list_(self.ctx, parameters, False))
        headers: tuple[tuple[bytes, bytes], ...] = ()
        if result["next"] is not None:  # the next page: RFC 8288's Link
            link = f'<?after={quote(result["next"], safe="")}&limit={parameters.limit}>; rel="next"'
            headers = ((b"link", link.encode()),)
        return json_answer(200, result["schedules"], headers)

    async def details(self, call: Call) -> Answer:
        """Every matching row in one answer, however many: read from one snapshot and sent
        STREAM_CHUNK rows at a time as a JSON array (memory holds a chunk). A refusal (a bad
        filter, nothing found) comes with the first chunk, so before the status is sent."""
        _permit(call, Level.read)
        parameters = _convert({"filters": call.query()}, w.DetailsParameters)
        pages = api.details(self.ctx, parameters, True)
        try:
            first = await anext(pages)
        except StopAsyncIteration:
            return Answer(200, b"[]")
        except BaseException:
            await pages.aclose()
            raise
        return Answer(200, stream=_json_array(first["details"], pages))

    async def get(self, call: Call, schedule_id: str) -> Answer:
        _permit(call, Level.read)
        parameters = _convert({"scheduleId": schedule_id}, w.ScheduleIdParameters)

        async def read() -> bytes:
            view = await api.one_reply(api.get(self.ctx, parameters, False))
            return _encoder.encode(view["schedule"])

        return Answer(200, await self.views.get(schedule_id, self.version, read))

    async def create(self, call: Call, schedule_id: str) -> Answer:
        _permit(call, Level.operate)
        body = await self.body(call, cmso.ScheduleRequest)
        if body.scheduleId and body.scheduleId != schedule_id:  # CMSO's "schedulerId" check
            raise RequestError(400, "INVALID_ATTRIBUTE", "scheduleId", body.scheduleId)
        if _immediate(body):  # approved as it is created (Tier 2 by its userId), as in CMSO
            _permit(call, Level.approve)
        _log_call(call, "create", schedule_id)
        await api.create(self.ctx, w.CreateParameters(schedule=body))
        return Answer(202, b"")

    async def approve(self, call: Call, schedule_id: str) -> Answer:
        _permit(call, Level.approve)
        body = await self.body(call, cmso.Approval)
        if body.approvalUserId and body.approvalUserId != call.user.name:
            log.info("http.approval_user", named=body.approvalUserId, user=call.user.name)
        approval = msgspec.structs.replace(body, approvalUserId=call.user.name)
        # cmsod's own, as query parameters (CMSO's body unchanged): the plan approved, by the
        # fingerprint the client saw (`planFingerprint` of the GET), and re-plan first
        _no_query(call, "plan", "replan")
        query = call.query()
        parameters = _convert(
            {
                "scheduleId": schedule_id,
                "approval": msgspec.to_builtins(approval),
                "plan": _one(query, "plan", None),
                "replan": _one(query, "replan", "false"),
            },
            w.ApproveParameters,
        )
        _log_call(call, "approve", schedule_id)
        reply = await api.approve_as(self.ctx, parameters, f"http user {call.user.name}")
        approved = reply["planFingerprint"]
        headers: tuple[tuple[bytes, bytes], ...] = (
            ((b"x-cmsod-plan", approved.encode()),) if approved else ()
        )
        if parameters.replan:  # asked for the difference: answered with it
            return json_answer(200, reply, headers)
        return Answer(204, headers=headers)

    async def delete(self, call: Call, schedule_id: str) -> Answer:
        _permit(call, Level.operate)
        parameters = _convert({"scheduleId": schedule_id}, w.ScheduleIdParameters)
        _log_call(call, "delete", schedule_id)
        await api.delete(self.ctx, parameters)
        return Answer(204)

    # -- cmsod's extensions: stop a rollout, freeze everything ----------------------------------

    async def extension(self, call: Call, method: str) -> Answer:
        s = call.segments[1:]
        if s == ["freeze"]:
            if method == "GET":
                return await self.freeze_status(call)
            if method in ("PUT", "DELETE"):
                return await self.freeze(call, method == "PUT")
            return _not_allowed("GET, PUT, DELETE")
        if len(s) == 3 and s[0] == "schedules" and s[2] in STOP_ACTIONS:
            return _only(method, "POST") or await self.stop(call, s[1], s[2])
        raise problem(404, "NOT_FOUND", "no such path", "/".join([EXTENSIONS, *s]))

    async def stop(self, call: Call, schedule_id: str, action: str) -> Answer:
        """Pause, resume or abort a rollout, as `cmsoctl pause|resume|abort` does."""
        _permit(call, Level.operate)
        parameters = _convert({"scheduleId": schedule_id}, w.ScheduleIdParameters)
        body = await self.body(call, x.StopBody, empty={})
        _log_call(call, action, schedule_id)
        if action == "pause":
            status = await usecases.pause(self.ctx, parameters.scheduleId, _by(call), body.reason)
            return json_answer(200, {"scheduleId": parameters.scheduleId, "status": status.value})
        answer = await STOPS[action](self.ctx, parameters.scheduleId, _by(call), body.reason)
        return json_answer(200, answer)

    async def freeze(self, call: Call, on: bool) -> Answer:
        """The global freeze on (PUT) or off (DELETE), as `cmsoctl freeze on|off` does."""
        _permit(call, Level.operate)
        body = await self.body(call, x.FreezeBody, empty={})
        if not on and body.until is not None:
            raise RequestError(400, "INVALID_ATTRIBUTE", "until", body.until)
        _log_call(call, "freeze" if on else "thaw", None)
        frozen = await usecases.freeze(self.ctx, on, _by(call), body.reason, body.until)
        return json_answer(200, {"freeze": frozen})

    async def freeze_status(self, call: Call) -> Answer:
        _permit(call, Level.read)
        _no_query(call)
        return json_answer(200, {"freeze": await usecases.freeze_in_force(self.ctx)})

    # -- what every request goes through -------------------------------------------------------

    async def authenticate(self, scope: Scope) -> User:
        """The user of a client certificate (mutual TLS), else of HTTP basic credentials."""
        self.credentials.refresh(trio.current_time())
        by_cert = self.client_user(scope)
        if by_cert is not None:
            user = self.credentials.user(by_cert)
            if user is not None:
                return user
            log.warning("http.denied", reason="certificate of no known user", user=by_cert)
        header = _header(scope, b"authorization") or b""
        scheme, _, encoded = header.partition(b" ")
        try:
            name, sep, password = base64.b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            sep = b""
        if scheme.lower() != b"basic" or not sep or len(password) > MAX_PASSWORD_BYTES:
            raise _unauthorized("HTTP basic credentials are needed")
        user = self.credentials.user(name.decode("utf-8", "replace"))
        if user is None or user.hash == NO_PASSWORD:
            log.warning("http.denied", reason="unknown user", user=name.decode("utf-8", "replace"))
            raise _unauthorized("wrong user name or password")
        if not self.credentials.remembered(user, password):
            if not await self.kdf(lambda: check_password(password, user.hash)):
                log.warning("http.denied", reason="wrong password", user=user.name)
                raise _unauthorized("wrong user name or password")
            self.credentials.remember(user, password)
        return user

    async def body(self, call: Call, into: type[Any], empty: Any = None) -> Any:
        """The whole body within the size and time limits, decoded into `into`; no body at all
        is `empty` when given (an extension's optional reason)."""
        cfg = self.ctx.config.http
        declared = _header(call.scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            raise _too_large(cfg.max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(cfg.request_timeout_s):
            while True:
                message = await call.receive()
                if message["type"] == "http.disconnect":
                    raise Answer(400)  # no one is left to read it
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise _too_large(cfg.max_body_bytes)
                chunks.append(chunk)
                if not message.get("more_body"):
                    whole = b"".join(chunks)
                    try:
                        if empty is not None and not whole.strip():
                            return msgspec.convert(empty, into)
                        return msgspec.json.decode(whole, type=into)
                    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                        raise invalid_body(exc) from None
                    except RecursionError:
                        raise invalid_body(ValueError("JSON nested too deeply")) from None
        log.warning("http.slow_client", user=call.user.name, received=size)
        raise problem(
            408,
            "REQUEST_TIMEOUT",
            f"the body did not arrive within {cfg.request_timeout_s} s",
            headers=((b"connection", b"close"),),
        )


# -- small helpers -----------------------------------------------------------------------------


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _json_array(
    first: list[Any], pages: AsyncGenerator[dict[str, Any], None]
) -> AsyncGenerator[bytes, None]:
    """`[` + every row of `first` and of each page's `details` + `]`, a page per chunk."""
    async with contextlib.aclosing(pages):
        opening = b"["
        rows = first
        while True:
            if rows:
                yield opening + _encoder.encode(rows)[1:-1]
                opening = b","
            page = await anext(pages, None)
            if page is None:
                break
            rows = page["details"]
    yield b"]" if opening == b"," else b"[]"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _only(method: str, allowed: str) -> Answer | None:
    return None if method == allowed else _not_allowed(allowed)


def _not_allowed(allowed: str) -> Answer:
    return problem(
        405, "METHOD_NOT_ALLOWED", f"allowed: {allowed}", headers=((b"allow", allowed.encode()),)
    )


def _unauthorized(text: str) -> Answer:
    return problem(
        401, "UNAUTHORIZED", text, headers=((b"www-authenticate", b'Basic realm="cmsod"'),)
    )


def _too_large(limit: int) -> Answer:
    return problem(
        413,
        "BODY_TOO_LARGE",
        f"a body may have {limit} bytes at most",
        str(limit),
        headers=((b"connection", b"close"),),
    )


def _permit(call: Call, needed: Level) -> None:
    if call.user.level < needed:
        log.warning("http.denied", reason="level", user=call.user.name, needs=needed.name)
        raise problem(
            403,
            "FORBIDDEN",
            f"user {call.user.name} ({call.user.level.name}) may not do this: it needs {needed.name}",
            call.user.name,
            needed.name,
        )


def _by(call: Call) -> str:
    """Who stopped or froze it, as recorded (the control socket records `name (uid N)`)."""
    return f"{call.user.name} (http)"


def _log_call(call: Call, action: str, schedule_id: str | None) -> None:
    log.info("http.call", action=action, schedule_id=schedule_id, user=call.user.name)


def _no_query(call: Call, *known: str) -> None:
    """A query parameter that would be ignored is refused (CMSO's list ignored them all)."""
    for name in call.query():
        if name not in known:
            said = f"the filters are: {', '.join(known)}" if known else "this takes no filter"
            raise RequestError(400, "UNDEFINED_FILTER_ATTRIBUTE", name, detail=said)


def _one(query: dict[str, list[str]], name: str, default: str | None) -> str | None:
    values = query.get(name)
    return values[-1] if values else default


def _convert(value: dict[str, Any], into: type[Any]) -> Any:
    try:
        return msgspec.convert(value, into, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid_body(exc) from None


def _immediate(body: cmso.ScheduleRequest) -> bool:
    """Whether the request would be approved as it is created; one that does not validate is
    refused by `create` itself, with CMSO's error."""
    try:
        return validate_request(body).immediate
    except RequestError:
        return False
