"""Prometheus Alertmanager's API v2 answer to `GET /api/v2/alerts` (its `gettableAlerts`: an
array of `gettableAlert`). Only what the alarm gate reads is required; extra keys are ignored
(a newer Alertmanager adds some); sizes are bounded."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=4096)]
LabelName = Annotated[str, msgspec.Meta(max_length=1024)]
MAX_ALERTS = 100_000


class AlertStatus(msgspec.Struct, frozen=True):
    state: Literal["unprocessed", "active", "suppressed"]
    silencedBy: Annotated[list[Text], msgspec.Meta(max_length=10_000)] = []
    inhibitedBy: Annotated[list[Text], msgspec.Meta(max_length=10_000)] = []
    mutedBy: Annotated[list[Text], msgspec.Meta(max_length=10_000)] = []


class Receiver(msgspec.Struct, frozen=True):
    name: Text


class GettableAlert(msgspec.Struct, frozen=True):
    labels: Annotated[dict[LabelName, Text], msgspec.Meta(max_length=1000)]
    status: AlertStatus
    fingerprint: Text
    startsAt: Text
    annotations: Annotated[dict[LabelName, Text], msgspec.Meta(max_length=1000)] = {}
    endsAt: Text = ""
    updatedAt: Text = ""
    receivers: Annotated[list[Receiver], msgspec.Meta(max_length=1000)] = []
    generatorURL: Text = ""


GettableAlerts = Annotated[list[GettableAlert], msgspec.Meta(max_length=MAX_ALERTS)]
