"""Where CM events go. Every sink delivers a batch of events, each with its key (its schedule
id), in order, and says how many it delivered from the front; the emitter marks exactly those
sent (at least once).

- `FileSink` (the embedded default): JSON lines, one file per topic, fsynced before it
  returns, rotated by size (<topic>.jsonl.1 is the newest old file).
- `MrSink`: DMaaP Message Router, `POST {url}/events/{topic}` in MR's `application/cambria`
  format, `<key length>.<event length>.<key><event>` per event: the one MR body format that
  gives each message its own Kafka key (a JSON array has one `partitionKey` for all, or a
  `cambria.partition` member the event schema forbids) and keeps the event's bytes exactly.
  So one POST carries many schedules' events and each still lands in its schedule's
  partition, in order. Honours the answer's `count` and a partial publish (DMaaP_MR_ERR_3007).
- `CloudEventsSink`: the CloudEvents HTTP binding. Binary mode (the default): one POST per
  event, the envelope in `ce-*` headers and the RFC 8641 payload as the body. Batch mode: one
  POST of `application/cloudevents-batch+json`, a JSON array of structured-mode events, for a
  receiver that takes it; the binding has no partial answer, so a failed batch is retried
  whole (at least once, the same ids).
- `KafkaSink`: the Kafka REST Proxy API v2 (Confluent's REST Proxy, Strimzi's Kafka Bridge),
  `POST {url}/topics/{topic}` with `application/vnd.kafka.json.v2+json`: one record per event,
  its key the schedule id (one partition per schedule, as NCMP keys its events), its value the
  envelope's JSON as is. The answer's `offsets` say record by record what Kafka took: the
  events before the first record not taken are sent, the rest go again from there.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Protocol, Self
from urllib.parse import quote

import httpx
import msgspec

from cmsod.config import shown_url
from cmsod.errors import PeerError
from cmsod.executor import Executor, ThreadExecutor
from cmsod.wire.events import CmEvent


class PartialDelivery(PeerError):
    """The first `delivered` events went through, the rest did not. `permanent`: the sink
    refused them for a reason a retry alone will not cure (a missing topic, no permission, a
    record it cannot take): still retried (an event is never dropped), at the slowest pace."""

    def __init__(self, delivered: int, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.permanent = permanent


Keyed = list[tuple[str, bytes]]  # (key, event body) in the order they must be delivered


class EventSink(Protocol):
    async def publish(self, topic: str, events: Keyed) -> int:
        """Deliver the events in order; return how many, or raise (PartialDelivery: some)."""
        ...


@dataclass
class FileSink:
    directory: Path
    executor: Executor = field(default_factory=ThreadExecutor)
    max_bytes: int = 64 * 1024 * 1024
    keep: int = 5

    def path(self, topic: str) -> Path:
        return self.directory / f"{topic}.jsonl"

    def _rotate(self, path: Path) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{n + 1}"))
        path.replace(path.with_name(f"{path.name}.1"))

    def _append(self, topic: str, bodies: list[bytes]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(topic)
        data = b"".join(body + b"\n" for body in bodies)
        if path.exists() and path.stat().st_size + len(data) > self.max_bytes:
            self._rotate(path)
        with open(path, "ab") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())

    async def publish(self, topic: str, events: Keyed) -> int:
        bodies = [body for _, body in events]
        try:
            await self.executor(lambda: self._append(topic, bodies))
        except OSError as exc:
            raise PeerError(f"cannot append to {self.path(topic)}: {exc.strerror}") from exc
        return len(bodies)


def _client(
    timeout_s: float, ssl_context: ssl.SSLContext, credentials: tuple[str, str] | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        auth=httpx.BasicAuth(*credentials) if credentials else None,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=4),
        verify=ssl_context,  # the one TLS configuration of every peer (peers/tls.py)
        trust_env=False,  # every peer is reached directly, as SO is
    )


MAX_ANSWER_BYTES = 1024 * 1024  # a sink's answer is read up to this, never whole first


class AnswerTooLarge(PeerError):
    """A sink answered more than MAX_ANSWER_BYTES: not read further."""


async def _post(
    client: httpx.AsyncClient, where: str, url: str, content: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One POST; the answer's status and body, the body read through httpx's stream up to
    MAX_ANSWER_BYTES (AnswerTooLarge past it). httpx.HTTPError as httpx raises them."""
    async with client.stream("POST", url, content=content, headers=headers) as response:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge(
                    f"{where}: answer larger than {MAX_ANSWER_BYTES} bytes"
                    f" (HTTP {response.status_code}): not read"
                )
        return response.status_code, bytes(body)


class MrError(msgspec.Struct):
    status: int | None = None
    mrstatus: int | str | None = None
    message: str = ""


class MrAnswer(msgspec.Struct):
    count: int


@dataclass
class _UrlSink:
    """A sink at one base URL over one HTTP client (Message Router, Kafka REST Proxy)."""

    url: str
    client: httpx.AsyncClient

    @classmethod
    def create(
        cls,
        url: str,
        timeout_s: float,
        ssl_context: ssl.SSLContext,
        credentials: tuple[str, str] | None = None,
    ) -> Self:
        return cls(url.rstrip("/"), _client(timeout_s, ssl_context, credentials))

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class MrSink(_UrlSink):
    @property
    def where(self) -> str:
        return f"message router at {shown_url(self.url)}"

    @staticmethod
    def cambria(events: Keyed) -> bytes:
        """MR's `application/cambria` body: each event with its own key, bytes kept exactly."""
        out = bytearray()
        for key, body in events:
            raw_key = key.encode()
            out += b"%d.%d.%s%s\n" % (len(raw_key), len(body), raw_key, body)
        return bytes(out)

    async def publish(self, topic: str, events: Keyed) -> int:
        try:
            status, content = await _post(
                self.client,
                self.where,
                f"{self.url}/events/{quote(topic, safe='')}",
                self.cambria(events),
                {"Content-Type": "application/cambria"},
            )
        except httpx.HTTPError as exc:
            raise PeerError(f"{self.where}: {exc!r}") from exc
        if status == 200:
            try:
                count = msgspec.json.decode(content, type=MrAnswer).count
            except msgspec.DecodeError:
                raise PeerError(f"message router: unreadable answer {content[:200]!r}") from None
            if count < len(events):
                raise PartialDelivery(count, f"message router took {count} of {len(events)} events")
            return len(events)
        try:
            error = msgspec.json.decode(content, type=MrError)
        except msgspec.DecodeError:
            error = MrError(message=content[:200].decode(errors="replace"))
        if str(error.mrstatus) == "3007":  # partial publish: the message says how many went
            published = re.search(r"\d+", error.message)
            delivered = min(int(published.group()), len(events)) if published else 0
            raise PartialDelivery(delivered, f"message router partial publish: {error.message}")
        raise PeerError(
            f"message router: HTTP {status} {error.mrstatus or ''} {error.message}".strip()
        )


def _rfc3339(event_time: str) -> str:
    """2024-05-28T17:28:02.869+0000 -> 2024-05-28T17:28:02.869Z"""
    return (
        datetime.strptime(event_time, "%Y-%m-%dT%H:%M:%S.%f%z").strftime("%Y-%m-%dT%H:%M:%S.%f")[
            :-3
        ]
        + "Z"
    )


@dataclass
class CloudEventsSink:
    url: str
    client: httpx.AsyncClient
    batch: bool = False  # batch content mode instead of one binary-mode POST per event

    @classmethod
    def create(
        cls,
        url: str,
        timeout_s: float,
        ssl_context: ssl.SSLContext,
        batch: bool = False,
        credentials: tuple[str, str] | None = None,
    ) -> CloudEventsSink:
        return cls(url, _client(timeout_s, ssl_context, credentials), batch)

    @property
    def where(self) -> str:
        return f"cloudevents receiver at {shown_url(self.url)}"

    async def aclose(self) -> None:
        await self.client.aclose()

    @staticmethod
    def attributes(event: CmEvent, key: str) -> dict[str, str]:
        """The CloudEvents attributes of one of our events (`data` aside)."""
        return {
            "specversion": "1.0",
            "id": event.eventId,
            "source": event.eventSource,
            "type": event.eventType,
            "time": _rfc3339(event.eventTime),
            "dataschema": f"urn:{event.eventSchema}:{event.eventSchemaVersion}",
            "correlationid": event.eventCorrelationId,
            "partitionkey": key,
        }

    @classmethod
    def binary(cls, body: bytes, key: str) -> tuple[dict[str, str], bytes]:
        event = msgspec.json.decode(body, type=CmEvent)
        headers = {f"ce-{name}": value for name, value in cls.attributes(event, key).items()}
        headers["content-type"] = "application/json"
        return headers, msgspec.json.encode(event.event)

    @classmethod
    def structured_batch(cls, events: Keyed) -> bytes:
        batch = []
        for key, body in events:
            event = msgspec.json.decode(body, type=CmEvent)
            structured: dict[str, Any] = cls.attributes(event, key)
            structured["datacontenttype"] = "application/json"
            structured["data"] = event.event
            batch.append(structured)
        return msgspec.json.encode(batch)

    async def post(self, content: bytes, headers: dict[str, str], delivered: int) -> None:
        """One POST; PartialDelivery(delivered) unless the receiver took it (2xx)."""
        try:
            status, answer = await _post(self.client, self.where, self.url, content, headers)
        except httpx.HTTPError as exc:
            raise PartialDelivery(delivered, f"{self.where}: {exc!r}") from exc
        except AnswerTooLarge as exc:
            raise PartialDelivery(delivered, str(exc)) from None
        if not 200 <= status < 300:
            raise PartialDelivery(
                delivered, f"cloudevents receiver: HTTP {status} {answer[:200]!r}"
            )

    async def publish(self, topic: str, events: Keyed) -> int:
        if self.batch:
            content_type = {"content-type": "application/cloudevents-batch+json"}
            await self.post(self.structured_batch(events), content_type, 0)
            return len(events)
        for delivered, (key, body) in enumerate(events):
            headers, data = self.binary(body, key)
            await self.post(data, headers, delivered)
        return len(events)


# -- Kafka REST Proxy API v2 ----------------------------------------------------------------

KAFKA_CONTENT_TYPE = "application/vnd.kafka.json.v2+json"
KAFKA_ACCEPT = "application/vnd.kafka.v2+json, application/vnd.kafka+json, application/json"
MAX_RECORDS = 10_000  # = the most events.batch_size allows
ErrorText = Annotated[str, msgspec.Meta(max_length=65536)]


class KafkaRecord(msgspec.Struct):
    key: str
    value: msgspec.Raw  # the envelope's bytes, embedded as they are


class KafkaProduce(msgspec.Struct):
    records: list[KafkaRecord]


class KafkaOffset(msgspec.Struct, frozen=True):
    """One record's fate. Taken: partition and offset, no error_code. Not taken: Confluent
    says `error_code` (50003 retriable, 50002 other Kafka error, 40101/40301 authentication /
    authorization; 2 and 1 in older versions) and `error`, partition and offset null; Strimzi says
    `error_code` (500, or 404 for a topic Kafka does not know) and `message`."""

    partition: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] | None = None
    error_code: int | None = None
    error: ErrorText | None = None
    message: ErrorText | None = None

    @property
    def taken(self) -> bool:
        return self.error_code is None and self.partition is not None and self.offset is not None


class KafkaAnswer(msgspec.Struct):
    offsets: Annotated[list[KafkaOffset], msgspec.Meta(max_length=MAX_RECORDS)]
    key_schema_id: int | None = None
    value_schema_id: int | None = None


class KafkaError(msgspec.Struct):
    """A whole request refused: `{"error_code": 40401, "message": "Topic not found."}` (the
    proxy's code is HTTP status x 100 + a sub-code; Strimzi's is the HTTP status)."""

    error_code: int | None = None
    message: ErrorText = ""


# Answers to a whole request that may go through later as they are: a timeout, too many
# requests, a proxy or Kafka that cannot serve now. Any other 4xx (400 bad request, 401/403
# credentials or ACLs, 404 no such topic, 406/415 a media type it does not take, 413/422 a
# record it refuses) needs an operator first.
KAFKA_RETRY_STATUS = frozenset({408, 425, 429})
# Per-record error codes that a retry may cure (Confluent: RetriableException; Strimzi: 500
# for any producer failure, which is mostly timeouts and leader changes).
KAFKA_RETRY_RECORD = frozenset({2, 500, 50003, 50302})


@dataclass
class KafkaSink(_UrlSink):
    @staticmethod
    def records(events: Keyed) -> bytes:
        return msgspec.json.encode(
            KafkaProduce([KafkaRecord(key, msgspec.Raw(body)) for key, body in events])
        )

    async def publish(self, topic: str, events: Keyed) -> int:
        where = f"kafka rest proxy at {shown_url(self.url)}"
        try:  # AnswerTooLarge, like no answer: all again
            status, content = await _post(
                self.client,
                where,
                f"{self.url}/topics/{quote(topic, safe='')}",
                self.records(events),
                {"Content-Type": KAFKA_CONTENT_TYPE, "Accept": KAFKA_ACCEPT},
            )
        except httpx.HTTPError as exc:  # not sent, or sent and not answered: all again
            raise PeerError(f"{where}: {exc!r}") from exc
        if status == 200:
            return self.taken(where, topic, content, len(events))
        try:
            error = msgspec.json.decode(content, type=KafkaError)
        except (msgspec.DecodeError, msgspec.ValidationError):
            error = KafkaError(message=content[:200].decode(errors="replace"))
        code = f" (error_code {error.error_code})" if error.error_code is not None else ""
        retry = status >= 500 or status in KAFKA_RETRY_STATUS
        raise PartialDelivery(
            0,
            f"{where}: topic {topic}: HTTP {status}{code} {error.message}".strip(),
            permanent=not retry,
        )

    @staticmethod
    def taken(where: str, topic: str, content: bytes, sent: int) -> int:
        """How many events from the front Kafka took, from a 200 answer; PartialDelivery
        from the first record not taken (an error, or no entry for it), so that a schedule's
        later event never counts as sent before an earlier one."""
        try:
            answer = msgspec.json.decode(content, type=KafkaAnswer)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise PeerError(f"{where}: unreadable answer ({exc}): {content[:200]!r}") from None
        if len(answer.offsets) > sent:
            raise PeerError(f"{where}: answered {len(answer.offsets)} offsets for {sent} records")
        for n, offset in enumerate(answer.offsets):
            if not offset.taken:
                why = offset.error or offset.message or "no partition or offset"
                raise PartialDelivery(
                    n,
                    f"{where}: topic {topic}: record {n + 1} of {sent} not taken"
                    f" (error_code {offset.error_code}): {why}",
                    permanent=offset.error_code is not None
                    and offset.error_code not in KAFKA_RETRY_RECORD,
                )
        if len(answer.offsets) < sent:
            raise PartialDelivery(
                len(answer.offsets),
                f"{where}: topic {topic}: answered {len(answer.offsets)} of {sent} records",
            )
        return sent


def sink_credentials(path: str) -> tuple[str, str] | None:
    """events.credentials_file: one line user:password for basic auth ("" = none)."""
    if not path:
        return None
    user, _, password = Path(path).read_text().strip().partition(":")
    return user, password


def sink_for(
    cfg: Any, directory: Path, executor: Executor, ssl_context: ssl.SSLContext
) -> EventSink:
    events = cfg.events
    credentials = sink_credentials(events.credentials_file)
    if events.sink == "http":
        return MrSink.create(events.url, events.timeout_s, ssl_context, credentials)
    if events.sink == "kafka":
        return KafkaSink.create(events.url, events.timeout_s, ssl_context, credentials)
    if events.sink == "cloudevents":
        return CloudEventsSink.create(
            events.url,
            events.timeout_s,
            ssl_context,
            events.cloudevents_mode == "batch",
            credentials,
        )
    return FileSink(directory, executor, events.max_file_bytes, events.keep_files)
