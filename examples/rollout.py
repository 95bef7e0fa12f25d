"""Print a CMSO v1 request for a rollout of N elements in G groups, starting in a minute:
`python examples/rollout.py 200 4 | cmsoctl submit -` (README, "Watching a rollout")."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta


def rollout(elements: int, groups: int, seconds: int, concurrency: int) -> dict:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)
    window = {
        "startTime": start.isoformat().replace("+00:00", "Z"),
        "endTime": (start + timedelta(hours=2)).isoformat().replace("+00:00", "Z"),
    }
    names = [f"site{g}-node{i:03d}" for g in range(groups) for i in range(elements // groups)]
    details = [{"vnfName": n, "vnfInstanceId": f"vnf-{n}"} for n in names]
    return {
        "domain": "ChangeManagement",
        "scheduleId": f"rollout-{start:%H%M}",
        "userId": "jf9860",
        "domainData": [
            {
                "WorkflowName": "Replace",
                "CallbackUrl": "http://vid.example/callback",
                "CallbackData": json.dumps({"requestType": "Update", "requestDetails": details}),
            }
        ],
        "schedulingInfo": {
            "normalDurationInSeconds": seconds,
            "additionalDurationInSeconds": 0,
            "concurrencyLimit": concurrency,
            "policyId": "AllDayEveryDay",
            "vnfDetails": [
                {
                    "groupId": f"site{g}",
                    "node": names[g * (elements // groups) : (g + 1) * (elements // groups)],
                    "changeWindow": [window],
                }
                for g in range(groups)
            ],
        },
    }


if __name__ == "__main__":
    n, g = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (200, 4)
    print(json.dumps(rollout(n, g, seconds=10, concurrency=20), indent=1))
