"""Where CM events go. `FileSink` (the embedded default) appends JSON lines to one file per
topic and fsyncs before it returns, so an event marked sent is on disk (at least once)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cmsod.errors import PeerError
from cmsod.executor import Executor, ThreadExecutor


class EventSink(Protocol):
    async def publish(self, topic: str, bodies: list[bytes]) -> None:
        """Deliver every body, in order, or raise PeerError (then none counts as delivered)."""
        ...


@dataclass
class FileSink:
    directory: Path
    executor: Executor = field(default_factory=ThreadExecutor)

    def path(self, topic: str) -> Path:
        return self.directory / f"{topic}.jsonl"

    def _append(self, topic: str, bodies: list[bytes]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path(topic), "ab") as out:
            out.write(b"".join(body + b"\n" for body in bodies))
            out.flush()
            os.fsync(out.fileno())

    async def publish(self, topic: str, bodies: list[bytes]) -> None:
        try:
            await self.executor(lambda: self._append(topic, bodies))
        except OSError as exc:
            raise PeerError(f"cannot append to {self.path(topic)}: {exc.strerror}") from exc
