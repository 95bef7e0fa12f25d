"""Building CM events from state changes (pure). One event per transaction and schedule: the
edits of one yang-patch are atomic, as the changes of one transaction are."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import msgspec

from cmsod.errors import CmsodError
from cmsod.wire.events import (
    EVENT_SCHEMA,
    EVENT_SCHEMA_VERSION,
    EVENT_TYPE,
    CmEvent,
    DatastoreChanges,
    Edit,
    EventBody,
    PushChangeUpdate,
    YangPatch,
)

KNOWN_SCHEMAS = frozenset({(EVENT_SCHEMA, EVENT_SCHEMA_VERSION)})
MAX_EDITS_PER_EVENT = 1000  # keeps one event well under a message bus's size limit


class UnknownEventSchema(CmsodError):
    """An event whose eventSchema/eventSchemaVersion the emitter does not know (seed decision 3)."""


def schedule_target(schedule_id: str) -> str:
    return f"/cm-schedule:schedules/schedule={quote(schedule_id, safe='')}"


def element_target(schedule_id: str, name: str) -> str:
    return f"{schedule_target(schedule_id)}/vnf={quote(name, safe='')}"


def schedule_edit(schedule_id: str, operation: str, value: dict[str, Any]) -> tuple[str, str, dict]:
    return (operation, schedule_target(schedule_id), {"cm-schedule:schedule": [value]})


def element_edit(schedule_id: str, name: str, value: dict[str, Any]) -> tuple[str, str, dict]:
    return ("patch", element_target(schedule_id, name), {"cm-schedule:vnf": [value]})


FREEZE_CORRELATION = "cmsod-freeze"  # the global freeze's events: their own sequence
FREEZE_TARGET = "/cm-schedule:freeze"


def freeze_edit(value: dict[str, Any]) -> tuple[str, str, dict]:
    return ("patch", FREEZE_TARGET, {"cm-schedule:freeze": [value]})


def event_time(ms: int) -> str:
    """NCMP legacy eventTime: 2024-05-28T17:28:02.869+0000."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}+0000"


def build(
    schedule_id: str,
    seq: int,
    edits: list[tuple[str, str, dict]],
    now_ms: int,
    source: str,
    schema: str = EVENT_SCHEMA,
    version: str = EVENT_SCHEMA_VERSION,
) -> CmEvent:
    if (schema, version) not in KNOWN_SCHEMAS:
        raise UnknownEventSchema(f"unknown event schema {schema!r} version {version!r}")
    patch = YangPatch(
        patch_id=f"{schedule_id}:{seq}",
        edit=[
            Edit(edit_id=str(i), operation=op, target=target, value=value)  # type: ignore[arg-type]
            for i, (op, target, value) in enumerate(edits, 1)
        ],
    )
    return CmEvent(
        eventId=str(uuid.uuid4()),
        eventCorrelationId=schedule_id,
        eventTime=event_time(now_ms),
        eventSource=source,
        eventType=EVENT_TYPE,
        eventSchema=schema,
        eventSchemaVersion=version,
        event=EventBody(PushChangeUpdate(DatastoreChanges(patch))),
    )


def encode(event: CmEvent) -> bytes:
    return msgspec.json.encode(event)
