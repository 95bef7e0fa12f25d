"""CMSO v1 request bodies shaped like the robot suite's templates (reference/cmso.md 8.1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

NODES = ["node1", "node2", "node3", "node4"]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def callback_data(nodes: list[str]) -> str:
    return json.dumps(
        {
            "requestType": "Update",
            "requestDetails": [
                {
                    "vnfName": n,
                    "vnfInstanceId": f"instance-{n}",
                    "modelInfo": {"modelType": "vnf", "modelName": "vSAMP12"},
                    "cloudConfiguration": {"lcpCloudRegionId": "mdt1", "tenantId": "88a6"},
                    "requestInfo": {
                        "source": "VID",
                        "suppressRollback": False,
                        "requestorId": "jf9860",
                    },
                    "requestParameters": {"usePreload": True},
                }
                for n in nodes
                if n  # CMSO's "no node name" case: an empty name has no request
            ],
        }
    )


def request(
    schedule_id: str,
    nodes: list[str] | None = None,
    *,
    now: datetime,
    minutes_from_now: int | None = 1,
    windows: int = 1,
    normal: int | None = 3600,
    additional: int | None = 0,
    concurrency: int | None = 10,
    policy: str | None = "AllDayEveryDay",
    workflow: str = "Replace",
    group_id: str | None = "group",
    user: str = "jf9860",
    domain: str = "ChangeManagement",
    extra_domain_data: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`minutes_from_now=None` makes an immediate request (no change window)."""
    nodes = nodes or ["node1"]
    change_windows = []
    if minutes_from_now is not None:
        for i in range(windows):
            start = now + timedelta(minutes=i * 1440 + minutes_from_now)
            change_windows.append(
                {"startTime": iso(start), "endTime": iso(start + timedelta(minutes=1440))}
            )
    details: dict[str, Any] = {"node": nodes}
    if group_id is not None:
        details["groupId"] = group_id
    if change_windows:
        details["changeWindow"] = change_windows
    info: dict[str, Any] = {"vnfDetails": [details]}
    for key, value in [
        ("normalDurationInSeconds", normal),
        ("additionalDurationInSeconds", additional),
        ("concurrencyLimit", concurrency),
        ("policyId", policy),
    ]:
        if value is not None:
            info[key] = value
    domain_data = {
        "CallbackUrl": "http://localhost:8080/callback",
        "CallbackData": callback_data(nodes),
        "WorkflowName": workflow,
    }
    domain_data.update(extra_domain_data or {})
    return {
        "domain": domain,
        "scheduleId": schedule_id,
        "scheduleName": schedule_id,
        "userId": user,
        "domainData": [domain_data],
        "schedulingInfo": info,
    }


def approval(
    status: str = "Accepted", user: str = "jf9860", kind: str = "Tier 2"
) -> dict[str, str]:
    return {"approvalUserId": user, "approvalType": kind, "approvalStatus": status}
