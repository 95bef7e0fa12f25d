"""Where CM events go. Every sink delivers a batch of one schedule's events in order and says
how many it delivered from the front; the emitter marks exactly those sent (at least once).

- `FileSink` (the embedded default): JSON lines, one file per topic, fsynced before it
  returns, rotated by size (<topic>.jsonl.1 is the newest old file).
- `MrSink`: DMaaP Message Router, `POST {url}/events/{topic}?partitionKey=<scheduleId>` with a
  JSON array; honours the answer's `count` and a partial publish (DMaaP_MR_ERR_3007).
- `CloudEventsSink`: the CloudEvents HTTP binding in binary mode, one POST per event, the
  envelope in `ce-*` headers and the RFC 8641 payload as the body.
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


class EventSink(Protocol):
    async def publish(self, topic: str, key: str, bodies: list[bytes]) -> int:
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

    async def publish(self, topic: str, key: str, bodies: list[bytes]) -> int:
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

    async def publish(self, topic: str, key: str, bodies: list[bytes]) -> int:
        body = b"[" + b",".join(bodies) + b"]"
        try:
            response = await self.client.post(
                f"{self.url}/events/{quote(topic, safe='')}",
                params={"partitionKey": key},
                content=body,
                headers={"Content-Type": "application/json"},
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
            if count < len(bodies):
                raise PartialDelivery(count, f"message router took {count} of {len(bodies)} events")
            return len(bodies)
        try:
            error = msgspec.json.decode(response.content, type=MrError)
        except msgspec.DecodeError:
            error = MrError(message=response.content[:200].decode(errors="replace"))
        if str(error.mrstatus) == "3007":  # partial publish: the message says how many went
            published = re.search(r"\d+", error.message)
            delivered = min(int(published.group()), len(bodies)) if published else 0
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

    @classmethod
    def create(cls, url: str, timeout_s: float, ssl_context: ssl.SSLContext) -> CloudEventsSink:
        return cls(url, _client(timeout_s, ssl_context))

    async def aclose(self) -> None:
        await self.client.aclose()

    @staticmethod
    def binary(body: bytes) -> tuple[dict[str, str], bytes]:
        event = msgspec.json.decode(body, type=CmEvent)
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event.eventId,
            "ce-source": event.eventSource,
            "ce-type": event.eventType,
            "ce-time": _rfc3339(event.eventTime),
            "ce-dataschema": f"urn:{event.eventSchema}:{event.eventSchemaVersion}",
            "ce-correlationid": event.eventCorrelationId,
            "content-type": "application/json",
        }
        return headers, msgspec.json.encode(event.event)

    async def publish(self, topic: str, key: str, bodies: list[bytes]) -> int:
        for delivered, body in enumerate(bodies):
            headers, data = self.binary(body)
            headers["ce-partitionkey"] = key
            try:
                response = await self.client.post(self.url, content=data, headers=headers)
            except httpx.HTTPError as exc:
                raise PartialDelivery(
                    delivered, f"cloudevents receiver at {self.url}: {exc!r}"
                ) from exc
            if not 200 <= response.status_code < 300:
                raise PartialDelivery(
                    delivered,
                    f"cloudevents receiver: HTTP {response.status_code} {response.content[:200]!r}",
                )
        return len(bodies)


def sink_for(
    cfg: Any, directory: Path, executor: Executor, ssl_context: ssl.SSLContext
) -> EventSink:
    events = cfg.events
    if events.sink == "http":
        return MrSink.create(events.url, events.timeout_s, ssl_context)
    if events.sink == "cloudevents":
        return CloudEventsSink.create(events.url, events.timeout_s, ssl_context)
    return FileSink(directory, executor, events.max_file_bytes, events.keep_files)
