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
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import msgspec

from cmsod.errors import PeerError
from cmsod.executor import Executor, ThreadExecutor
from cmsod.wire.events import CmEvent


class PartialDelivery(PeerError):
    """The first `delivered` events went through, the rest did not."""

    def __init__(self, delivered: int, message: str) -> None:
        super().__init__(message)
        self.delivered = delivered


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


def _client(timeout_s: float, ssl_context: ssl.SSLContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=4),
        verify=ssl_context,  # the one TLS configuration of every peer (peers/tls.py)
        trust_env=False,  # every peer is reached directly, as SO is
    )


class MrError(msgspec.Struct):
    status: int | None = None
    mrstatus: int | str | None = None
    message: str = ""


class MrAnswer(msgspec.Struct):
    count: int


@dataclass
class MrSink:
    url: str
    client: httpx.AsyncClient

    @classmethod
    def create(cls, url: str, timeout_s: float, ssl_context: ssl.SSLContext) -> MrSink:
        return cls(url.rstrip("/"), _client(timeout_s, ssl_context))

    async def aclose(self) -> None:
        await self.client.aclose()

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
            response = await self.client.post(
                f"{self.url}/events/{quote(topic, safe='')}",
                content=self.cambria(events),
                headers={"Content-Type": "application/cambria"},
            )
        except httpx.HTTPError as exc:
            raise PeerError(f"message router at {self.url}: {exc!r}") from exc
        if response.status_code == 200:
            try:
                count = msgspec.json.decode(response.content, type=MrAnswer).count
            except msgspec.DecodeError:
                raise PeerError(
                    f"message router: unreadable answer {response.content[:200]!r}"
                ) from None
            if count < len(events):
                raise PartialDelivery(count, f"message router took {count} of {len(events)} events")
            return len(events)
        try:
            error = msgspec.json.decode(response.content, type=MrError)
        except msgspec.DecodeError:
            error = MrError(message=response.content[:200].decode(errors="replace"))
        if str(error.mrstatus) == "3007":  # partial publish: the message says how many went
            published = re.search(r"\d+", error.message)
            delivered = min(int(published.group()), len(events)) if published else 0
            raise PartialDelivery(delivered, f"message router partial publish: {error.message}")
        raise PeerError(
            f"message router: HTTP {response.status_code} {error.mrstatus or ''} {error.message}".strip()
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
        cls, url: str, timeout_s: float, ssl_context: ssl.SSLContext, batch: bool = False
    ) -> CloudEventsSink:
        return cls(url, _client(timeout_s, ssl_context), batch)

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
            response = await self.client.post(self.url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise PartialDelivery(
                delivered, f"cloudevents receiver at {self.url}: {exc!r}"
            ) from exc
        if not 200 <= response.status_code < 300:
            raise PartialDelivery(
                delivered,
                f"cloudevents receiver: HTTP {response.status_code} {response.content[:200]!r}",
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


def sink_for(
    cfg: Any, directory: Path, executor: Executor, ssl_context: ssl.SSLContext
) -> EventSink:
    events = cfg.events
    if events.sink == "http":
        return MrSink.create(events.url, events.timeout_s, ssl_context)
    if events.sink == "cloudevents":
        return CloudEventsSink.create(
            events.url, events.timeout_s, ssl_context, events.cloudevents_mode == "batch"
        )
    return FileSink(directory, executor, events.max_file_bytes, events.keep_files)
