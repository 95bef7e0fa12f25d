"""The change-ticket system (TM). `LoopbackTM` approves everything and remembers nothing."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol


class TicketSystem(Protocol):
    async def create(
        self,
        schedule_id: str,
        group_id: str,
        vnfs: list[str],
        user_id: str,
        planned_start_ms: int | None,
        planned_end_ms: int | None,
    ) -> str:
        """Open a change ticket; return its changeId, or raise PeerError."""
        ...


@dataclass
class LoopbackTM:
    created: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)

    async def create(
        self,
        schedule_id: str,
        group_id: str,
        vnfs: list[str],
        user_id: str,
        planned_start_ms: int | None,
        planned_end_ms: int | None,
    ) -> str:
        self.created.append((schedule_id, group_id, tuple(vnfs)))
        return f"CHG{uuid.uuid4().hex[:12].upper()}"
