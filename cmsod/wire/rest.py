"""Bodies of cmsod's own REST extensions (`/cmso/v1/x-cmsod/...`): the controls of "Stop, hold
and gate a rollout" that CMSO never had. The same limits as the control socket's parameters;
who did it is never in the body (it is the authenticated user)."""

from __future__ import annotations

import msgspec

from cmsod.wire.cmso import Name
from cmsod.wire.control import Reason


class StopBody(msgspec.Struct, forbid_unknown_fields=True):
    """Pause, resume or abort: why (an empty body is no reason)."""

    reason: Reason = ""


class FreezeBody(msgspec.Struct, forbid_unknown_fields=True):
    """Freeze on: why, and optionally when it ends by itself (ISO-8601, in the future)."""

    reason: Reason = ""
    until: Name | None = None
