"""The orchestrator's (SO's) answers, as CMSO reads them (reference/cmso.md 5)."""

from __future__ import annotations

from typing import Annotated

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=4096)]


class CmResponse(msgspec.Struct):
    orchestratorRequestId: Text | None = None
    vnfName: Text | None = None
    serviceInstanceId: Text | None = None
    vnfInstanceId: Text | None = None


class CmResponses(msgspec.Struct):
    """201: the change-management answer, one entry per VNF."""

    cmResponses: Annotated[list[CmResponse], msgspec.Meta(max_length=100_000)]


class RequestReferences(msgspec.Struct):
    requestId: Text
    instanceId: Text | None = None


class Entity(msgspec.Struct):
    requestReferences: RequestReferences


class Accepted(msgspec.Struct):
    """200 with `status` 202 (a number, or the string "202" as CMSO's mock sends it)."""

    status: int | Text
    entity: Entity


class RequestStatus(msgspec.Struct):
    requestState: Text | None = None
    statusMessage: Text | None = None
    finishTime: Text | None = None
    percentProgress: int | float | Text | None = None


class SoRequest(msgspec.Struct):
    requestStatus: RequestStatus | None = None


class StatusResponse(msgspec.Struct):
    """GET {so.url}/{requestId}: `request.requestStatus.requestState`."""

    request: SoRequest | None = None
