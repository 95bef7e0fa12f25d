"""A small real HTTP/1.1 server on loopback for tests, with fault injection.

`FakeHTTP(handler)` calls `handler(request)` for every request and acts on what it returns:
a `Reply` (status, body, optional delay), `Raw` (these exact bytes as the answer, for
mis-framed ones), `Drop` (the request was taken, the connection is closed without an answer:
"executed, reply lost"), or `Reset` (the connection is reset before anything is read). Every
request is recorded. Serve it inside a trio test with `nursery.start(server.serve)`, or in its
own thread for a daemon process with `in_thread()`. `host` may be "::1" (IPv6 loopback);
`ssl_context` serves HTTPS.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # wall-clock time it was read (for benchmarks)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | list = b""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        head = [
            f"HTTP/1.1 {self.status} X",
            f"Content-Length: {len(body)}",
            "Content-Type: application/json",
        ]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Raw:
    """These bytes as the answer, exactly as given; then close the connection if `close`."""

    data: bytes
    close: bool = False


class Drop:
    """Take the request (the handler ran), then close the connection without answering."""


class Reset:
    """Reset the connection before reading the request."""


Handler = Callable[[Request], "Reply | Raw | Drop | Reset"]


class FakeHTTP:
    def __init__(
        self, handler: Handler, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.handler = handler
        self.host = host
        self.ssl_context = ssl_context
        self.requests: list[Request] = []
        self.port = 0
        self.connections = 0  # connections accepted so far
        self.reset_next = 0  # reset this many coming connections at once
        self.close_after_reply = False  # a server whose keep-alive ends after each answer
        self.idle: set[trio.abc.Stream] = set()  # connections waiting for a request
        self._lock = threading.Condition()  # notified after each request is handled

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Block (a thread beside a server run with `in_thread`) until `condition` holds after
        some request, woken by each request rather than by polling."""
        with self._lock:
            assert self._lock.wait_for(condition, timeout_s), "never happened"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)  # port 0: any
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    async def close_idle(self) -> None:
        """Close every connection that waits for a request, as a keep-alive timeout would."""
        idle, self.idle = self.idle, set()
        for stream in idle:
            await trio.aclose_forcefully(stream)

    async def _connection(self, socket_stream: trio.SocketStream) -> None:
        self.connections += 1
        if self.reset_next:
            self.reset_next -= 1
            await _reset(socket_stream)
            return
        stream: trio.abc.Stream = socket_stream
        if self.ssl_context is not None:
            stream = trio.SSLStream(socket_stream, self.ssl_context, server_side=True)
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    if not buffer:
                        self.idle.add(stream)
                    try:
                        data = await stream.receive_some(65536)
                    finally:
                        self.idle.discard(stream)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                body, buffer = buffer[:length], buffer[length:]
                request = Request(method, path, headers, body, time.time())
                with self._lock:
                    self.requests.append(request)
                    reply = self.handler(request)
                    self._lock.notify_all()
                if isinstance(reply, Reset):
                    await _reset(socket_stream)
                    return
                if isinstance(reply, Drop):
                    await stream.aclose()
                    return
                if isinstance(reply, Raw):
                    await stream.send_all(reply.data)
                    if reply.close:
                        await stream.aclose()
                        return
                    continue
                if reply.delay_s:
                    await trio.sleep(reply.delay_s)
                await stream.send_all(reply.encode())
                if self.close_after_reply:
                    await stream.aclose()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def in_thread(self) -> Callable[[], None]:
        """Serve from a thread of its own (for a daemon in another process); returns stop()."""
        started = threading.Event()
        state: dict[str, Any] = {}

        async def main() -> None:
            with trio.CancelScope() as scope:
                state["scope"], state["token"] = scope, trio.lowlevel.current_trio_token()
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.serve)
                    started.set()

        thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        thread.start()
        started.wait(10)

        def stop() -> None:
            trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
            thread.join(10)

        return stop


async def _reset(stream: trio.SocketStream) -> None:
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


class FakeSO(FakeHTTP):
    """The orchestrator: POST /schedule/{vnf} starts a work flow, GET /{id} tells its state.

    `states` are what successive polls of one work flow answer (the last one repeats).
    `dispatch_faults[n]` / `status_faults[n]` replace the n-th (1-based) dispatch / poll.
    With `dedupe`, a repeated X-TransactionId returns the first request's id and starts nothing.
    The work flows of the elements in `failing` end FAILED. `started_at` records each start
    with the wall-clock time it arrived (the e2e tests check blackouts against it), read from
    `clock` (a test under MockClock sets the daemon's).
    """

    def __init__(self, states: list[str] | None = None, answer: str = "201") -> None:
        super().__init__(self.handle)
        self.states = states or ["IN_PROGRESS", "COMPLETE"]
        self.answer = answer
        self.dispatch_faults: dict[int, Reply | Drop | Reset] = {}
        self.status_faults: dict[int, Reply | Drop | Reset] = {}
        self.dedupe = False
        self.polls_down = False  # reset every status poll: an outage of SO's status API
        self.started: list[tuple[str, str]] = []  # (X-TransactionId, vnf) of work flows started
        self.polls: dict[str, int] = {}
        self.by_key: dict[str, str] = {}
        self.dispatch_calls = 0
        self.status_calls = 0
        self.failing: set[str] = set()
        self.vnf_of: dict[str, str] = {}
        self.started_at: list[tuple[str, float]] = []
        self.clock: Callable[[], float] = time.time

    def handle(self, request: Request) -> Reply | Drop | Reset:
        if request.method == "POST" and request.path.startswith("/schedule/"):
            self.dispatch_calls += 1
            key = request.headers.get("x-transactionid", "")
            vnf = request.path.removeprefix("/schedule/")
            if self.dedupe and key in self.by_key:
                return self._accepted(vnf, self.by_key[key])
            fault = self.dispatch_faults.get(self.dispatch_calls)
            if isinstance(fault, Reset | Reply):
                return fault
            request_id = f"req-{len(self.started) + 1}"
            self.started.append((key, vnf))
            self.started_at.append((vnf, self.clock()))
            self.vnf_of[request_id] = vnf
            self.by_key[key] = request_id
            self.polls[request_id] = 0
            return fault if isinstance(fault, Drop) else self._accepted(vnf, request_id)
        if request.method == "GET":
            self.status_calls += 1
            if self.polls_down:
                return Reset()
            fault = self.status_faults.get(self.status_calls)
            if fault is not None:
                return fault
            request_id = request.path.lstrip("/")
            if request_id not in self.polls:
                return Reply(404, {"requestError": {"serviceException": {"text": "not found"}}})
            self.polls[request_id] += 1
            state = self.states[min(self.polls[request_id], len(self.states)) - 1]
            if self.vnf_of.get(request_id) in self.failing and state in ("COMPLETE", "COMPLETED"):
                state = "FAILED"
            return Reply(
                200,
                {
                    "request": {
                        "requestStatus": {
                            "requestState": state,
                            "statusMessage": f"{state.lower()}",
                            "percentProgress": 50,
                            "finishTime": "Tue, 01 Dec 2026 09:00:00 GMT",
                        }
                    }
                },
            )
        return Reply(405, b"")

    def _accepted(self, vnf: str, request_id: str) -> Reply:
        if self.answer == "201":
            return Reply(
                201,
                {
                    "cmResponses": [
                        {
                            "orchestratorRequestId": request_id,
                            "vnfName": vnf,
                            "serviceInstanceId": "s",
                            "vnfInstanceId": "v",
                        }
                    ]
                },
            )
        return Reply(
            200,
            {
                "status": "202",
                "entity": {"requestReferences": {"requestId": request_id, "instanceId": "i"}},
            },
        )


class FakeTM(FakeHTTP):
    """The ticket system (CMSO's TM contract): POST /tm/create|get|update|close and
    /ticketmgt/v1/activetickets. It keeps each ticket's state and records every call.

    `refuse` holds VNFs whose ticket's approvalStatus is `Rejected`; `faults[n]` replaces the n-th
    call (1-based); while `down` every call is answered 503; `closed_already` makes a close
    answer CMSO's 400 SVC40006 "is in Closed status"; `active` is what active tickets returns.
    """

    def __init__(self) -> None:
        super().__init__(self.handle)
        self.tickets: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (call, body) of each call TM took
        self.refuse: set[str] = set()
        self.faults: dict[int, Reply | Drop | Reset] = {}
        self.down = False
        self.closed_already = False
        self.active: list[dict[str, Any]] = []
        self.count = 0

    def handle(self, request: Request) -> Reply | Drop | Reset:
        self.count += 1
        if self.down:
            return Reply(503, b"TM is down")
        fault = self.faults.get(self.count)
        if fault is not None:
            return fault
        call = request.path.rsplit("/", 1)[-1]
        body = request.json()
        if call == "activetickets":
            self.calls.append((call, body))
            return Reply(
                200,
                {"requestId": body["requestId"], "status": "COMPLETED", "elements": self.active},
            )
        if call == "create":
            change_id = f"CHG{len(self.tickets) + 1:04d}"
            self.tickets[change_id] = {"status": "Scheduled", **body}
            if body["VNF"] in self.refuse:
                self.refuse.add(change_id)
            self.calls.append((call, {"changeId": change_id, **body}))
            return Reply(200, {"changeId": change_id})
        ticket = self.tickets.get(body.get("changeId", ""))
        if ticket is None:
            return Reply(404, {"serviceException": [{"messageId": "SVC4003", "text": "no such"}]})
        if call == "get":
            self.calls.append((call, body))
            approval = "Rejected" if body["changeId"] in self.refuse else "Approved"
            return Reply(
                200,
                {
                    "changeId": body["changeId"],
                    "approvalStatus": approval,
                    "status": ticket["status"],
                },
            )
        if call == "close" and (self.closed_already or ticket["status"] == "Closed"):
            self.calls.append(("already-closed", body))
            text = f"Change {body['changeId']} is in Closed status"
            return Reply(400, {"serviceException": [{"messageId": "SVC40006", "text": text}]})
        if call in ("update", "close"):
            ticket["status"] = body["status"]
            self.calls.append(("cancel" if body.get("closureCode") == "Cancelled" else call, body))
            return Reply(200, b"Change was updated successfully.")
        return Reply(405, b"")

    def of(self, change_id: str) -> list[str]:
        """The calls TM answered for one ticket, in order."""
        return [c for c, b in self.calls if b.get("changeId") == change_id]


KAFKA_JSON = "application/vnd.kafka.json.v2+json"


@dataclass
class RecordErrors:
    """A 200 answer in which the record at index `first` is not taken (with `code`) and, from
    there on, every record of its partition (a partition whose leader is gone) or, with
    `all_after`, every record (a producer that failed whole). Records of other partitions
    after `first` are written: the client will send them again (at least once)."""

    first: int
    code: int = 50003
    all_after: bool = False


@dataclass
class Written:
    """The records are written, then the answer is `reply` (slow, garbage, dropped...)."""

    reply: Reply | Raw | Drop


class FakeKafkaProxy(FakeHTTP):
    """A Kafka REST Proxy API v2 (Confluent's REST Proxy; `strimzi` answers as Strimzi's
    Kafka Bridge does): `POST /topics/{topic}` of `{"records": [{"key", "value"}]}` with
    `Content-Type: application/vnd.kafka.json.v2+json`. It checks the content type, the
    Accept header and each record's shape (the key is the value's eventCorrelationId; with
    `validate`, the value against the CM event schema), puts each record in a partition by a
    hash of its key and gives it the next offset there.

    `faults` are consumed one per POST: a Reply / Reset / Drop answers instead and writes
    nothing; a RecordErrors writes all but the failed records; `Written(reply)` writes all,
    then answers `reply` (a slow answer, garbage, a dropped connection). `written` holds
    (topic, partition, offset, key, value) in the order written; `posts` the eventIds of each
    POST taken."""

    def __init__(
        self,
        partitions: int = 4,
        validate: Callable[[dict], None] | None = None,
        strimzi: bool = False,
    ) -> None:
        super().__init__(self.handle)
        self.partitions = partitions
        self.validate = validate
        self.strimzi = strimzi
        self.faults: list[Any] = []
        self.written: list[tuple[str, int, int, str, dict]] = []
        self.ends: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset
        self.posts: list[list[str]] = []
        self.refused: list[str] = []  # requests refused for their content type or Accept
        self.check_shape = True  # (benchmarks: counting only)

    def partition_of(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.partitions

    def handle(self, request: Request) -> Reply | Raw | Drop | Reset:
        fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, Reply | Reset | Drop | Raw):
            return fault
        if request.method != "POST" or not request.path.startswith("/topics/"):
            return Reply(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
        topic = request.path.removeprefix("/topics/")
        if request.headers.get("content-type") != KAFKA_JSON:
            self.refused.append(f"content-type {request.headers.get('content-type')}")
            return Reply(415, {"error_code": 415, "message": "HTTP 415 Unsupported Media Type"})
        if "application/vnd.kafka.v2+json" not in request.headers.get("accept", ""):
            self.refused.append(f"accept {request.headers.get('accept')}")
            return Reply(406, {"error_code": 406, "message": "HTTP 406 Not Acceptable"})
        body = json.loads(request.body)
        records = body["records"]
        if self.check_shape:
            assert list(body) == ["records"], list(body)
            for record in records:
                assert sorted(record) == ["key", "value"], record
                assert isinstance(record["key"], str) and isinstance(record["value"], dict)
                assert record["key"] == record["value"]["eventCorrelationId"], record["key"]
                if self.validate is not None:
                    self.validate(record["value"])
        self.posts.append([r["value"]["eventId"] for r in records])
        failing: set[int] = set()
        if isinstance(fault, RecordErrors):
            down = self.partition_of(records[fault.first]["key"])
            failing = {
                i
                for i in range(fault.first, len(records))
                if fault.all_after or self.partition_of(records[i]["key"]) == down
            }
        offsets: list[dict[str, Any]] = []
        for i, record in enumerate(records):
            partition = self.partition_of(record["key"])
            if i in failing:
                assert isinstance(fault, RecordErrors)
                offsets.append(self._record_error(fault.code))
                continue
            offset = self.ends.get((topic, partition), 0)
            self.ends[(topic, partition)] = offset + 1
            self.written.append((topic, partition, offset, record["key"], record["value"]))
            if self.strimzi:
                offsets.append({"partition": partition, "offset": offset})
            else:
                offsets.append(
                    {"partition": partition, "offset": offset, "error_code": None, "error": None}
                )
        if isinstance(fault, Written):
            return fault.reply
        if self.strimzi:
            return Reply(200, {"offsets": offsets})
        return Reply(200, {"offsets": offsets, "key_schema_id": None, "value_schema_id": None})

    def _record_error(self, code: int) -> dict[str, Any]:
        if self.strimzi:
            return {"error_code": code, "message": "Expiring 1 record(s): 30000 ms has passed"}
        return {
            "partition": None,
            "offset": None,
            "error_code": code,
            "error": "Expiring 1 record(s) for cm-events-2: 30000 ms has passed",
        }

    def events(self, topic: str = "cm-events") -> list[dict]:
        """The events written to a topic, in the order written (duplicates included)."""
        return [value for t, _, _, _, value in self.written if t == topic]

    def partitions_of_keys(self) -> dict[str, set[int]]:
        keys: dict[str, set[int]] = {}
        for _, partition, _, key, _ in self.written:
            keys.setdefault(key, set()).add(partition)
        return keys


class FakeAlertmanager(FakeHTTP):
    """Prometheus Alertmanager's API v2, `GET /api/v2/alerts`: the alerts it holds, as the
    real one serves them (gettableAlerts), filtered by the request's `filter` matchers (`=`,
    `!=`, `=~`, `!~`, values in Alertmanager's quoting) and its active/silenced/inhibited
    flags. `fire(name, **labels)` starts an alert, `resolve(name)` ends it; `fault` replaces
    every answer while set (a `Reply(500)`, `Raw(b"garbage")`, `Reset()`, or a slow
    `Reply(delay_s=...)`)."""

    ESCAPES = {"n": "\n", '"': '"', "\\": "\\"}  # any other backslash stays itself
    MATCHER = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)(=~|!~|!=|=)"((?:[^"\\]|\\.)*)"$')

    def __init__(self) -> None:
        super().__init__(self.handle)
        self.alerts: dict[str, dict[str, Any]] = {}  # by fingerprint
        self.fault: Reply | Raw | Drop | Reset | None = None
        self.queries: list[list[str]] = []  # the filter matchers of each request

    def fire(self, name: str, silenced: bool = False, **labels: str) -> str:
        fingerprint = f"{len(self.alerts) + 1:016x}"
        self.alerts[fingerprint] = {
            "labels": {"alertname": name, **labels},
            "annotations": {"summary": f"{name} on {labels}"},
            "startsAt": "2026-12-01T07:55:00.000Z",
            "endsAt": "2026-12-01T09:55:00.000Z",
            "updatedAt": "2026-12-01T07:55:00.000Z",
            "fingerprint": fingerprint,
            "receivers": [{"name": "ops"}],
            "generatorURL": "http://prometheus:9090/graph",
            "status": {
                "state": "suppressed" if silenced else "active",
                "silencedBy": ["silence-1"] if silenced else [],
                "inhibitedBy": [],
                "mutedBy": [],
            },
        }
        return fingerprint

    def resolve(self, name: str) -> None:
        for fingerprint in [f for f, a in self.alerts.items() if a["labels"]["alertname"] == name]:
            del self.alerts[fingerprint]

    def handle(self, request: Request) -> Reply | Raw | Drop | Reset:
        url = urlsplit(request.path)
        if request.method != "GET" or url.path != "/api/v2/alerts":
            return Reply(404, b"not found")
        query = parse_qs(url.query)
        filters = query.get("filter", [])
        self.queries.append(filters)
        if self.fault is not None:
            return self.fault
        matchers = []
        for text in filters:
            m = self.MATCHER.match(text)
            if m is None:
                return Reply(400, b'"bad matcher"')
            label, op, raw = m.groups()
            value = re.sub(r"\\(.)", lambda g: self.ESCAPES.get(g.group(1), g.group(0)), raw)
            matchers.append((label, op, value))

        def matches(alert: dict[str, Any]) -> bool:
            for label, op, value in matchers:
                have = alert["labels"].get(label, "")
                ok = re.fullmatch(value, have) is not None if "~" in op else have == value
                if ok == op.startswith("!"):
                    return False
            state = alert["status"]["state"]
            if query.get("silenced") == ["false"] and alert["status"]["silencedBy"]:
                return False
            return not (query.get("active") == ["true"] and state == "unprocessed")

        return Reply(200, [a for a in self.alerts.values() if matches(a)])
