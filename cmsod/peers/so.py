"""The orchestrator (SO). `LoopbackSO` is the embedded default: it accepts every work flow and
reports it `COMPLETE` once `simulated_duration_s` has passed.

It is stateless on purpose: the request id carries the time the work flow finishes, so a
restarted daemon polling an id it handed out before the crash gets the right answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Protocol

from cmsod.clock import WallClock
from cmsod.errors import PeerError


@dataclass(frozen=True)
class SoStatus:
    """One answer to a status poll: SO's requestState (or None when the answer had none)."""

    http_status: int
    request_state: str | None
    message: str | None = None
    finish_time: str | None = None  # RFC 1123, as SO writes it


class Orchestrator(Protocol):
    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        """Start the work flow; return SO's request id, or raise PeerError saying why not."""
        ...

    async def status(self, request_id: str) -> SoStatus: ...


@dataclass
class LoopbackSO:
    clock: WallClock
    simulated_duration_s: float = 5.0
    dispatched: list[tuple[str, str]] = field(default_factory=list)  # (key, vnf) for tests

    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        self.dispatched.append((key, vnf_name))
        finish_ms = self.clock.now_ms() + int(self.simulated_duration_s * 1000)
        return f"loopback-{uuid.uuid4().hex[:12]}-{finish_ms}"

    async def status(self, request_id: str) -> SoStatus:
        prefix, _, finish = request_id.rpartition("-")
        if not prefix.startswith("loopback-") or not finish.isdigit():
            return SoStatus(404, None, f"unknown request {request_id}")
        finish_ms = int(finish)
        if self.clock.now_ms() < finish_ms:
            return SoStatus(200, "IN_PROGRESS", "loop-back work flow running")
        return SoStatus(200, "COMPLETE", "Done.", formatdate(finish_ms / 1000, usegmt=True))


__all__ = ["LoopbackSO", "Orchestrator", "PeerError", "SoStatus"]
