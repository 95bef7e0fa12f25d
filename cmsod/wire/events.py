"""The CM event envelope (seeds/004: NCMP's legacy flat envelope) with an RFC 8641
`push-change-update` carrying an `ietf-yang-patch:yang-patch`. See docs/events.md."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

EVENT_TYPE = "org.onap.ncmp.cm-network-avc-event"
EVENT_TYPES = (EVENT_TYPE,)  # every eventType cmsod emits (`watch --type` takes one of these)
EVENT_SCHEMA = "org.onap.ncmp:cm-network-avc-event.rfc8641"
EVENT_SCHEMA_VERSION = "1.0"


class Edit(msgspec.Struct, rename="kebab"):
    edit_id: str
    operation: Literal["create", "patch", "update", "delete"]
    target: str
    value: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class YangPatch(msgspec.Struct, rename="kebab"):
    patch_id: str
    edit: list[Edit]


class DatastoreChanges(msgspec.Struct):
    yang_patch: YangPatch = msgspec.field(name="ietf-yang-patch:yang-patch")


class PushChangeUpdate(msgspec.Struct, rename="kebab"):
    datastore_changes: DatastoreChanges


class EventBody(msgspec.Struct):
    push_change_update: PushChangeUpdate = msgspec.field(name="push-change-update")


class CmEvent(msgspec.Struct):
    eventId: str
    eventCorrelationId: str
    eventTime: str
    eventSource: str
    eventType: str
    eventSchema: str
    eventSchemaVersion: str
    event: EventBody
