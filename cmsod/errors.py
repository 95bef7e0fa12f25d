"""The error tree of cmsod. Every exception we raise on purpose is one of these.

CmsodError
├── RequestError          a CMSO request error: HTTP-like status + messageId, text, variables
├── ControlError          a control-socket error with a varlink-style name
│   ├── InvalidParameter  (org.varlink.service.InvalidParameter)
│   ├── MethodNotFound    (org.varlink.service.MethodNotFound)
│   └── PermissionDenied  (io.cmsod.PermissionDenied)
├── ConfigError           a configuration file or override that does not decode
├── TransitionError       a state change the state machine does not allow (a bug if seen)
└── PeerError             a peer (SO, ticket system, event sink) failed or answered badly
    ├── NotDelivered      the request never reached the peer: safe to send again
    ├── Unconfirmed       sent, but no answer came: the peer may have acted on it
    └── Unavailable       the peer answered that it cannot serve now (HTTP 5xx)
"""

from __future__ import annotations

from typing import Any


class CmsodError(Exception):
    pass


class RequestError(CmsodError):
    """CMSO's `requestError`: `messageId` is `Scheduler.<code>`, text formatted from a template."""

    TEMPLATES = {
        "MISSING_REQUIRED_ATTRIBUTE": "Missing required attribute '{0}'",
        "INVALID_ATTRIBUTE": "Invalid attribute {0}={1}",
        "INVALID_CHANGE_WINDOW": "Change window end time {1} must be after start time {0}",
        "SCHEDULE_ALREADY_EXISTS": "Schedule already exists domain={0} schedule id={1}",
        "SCHEDULE_NOT_FOUND": "Schedule not found domain={0} schedule id={1}",
        "ELEMENT_NOT_FOUND": "Element {0} not found{1}",
        # CMSO's template says {3} for the state; we format the state it means.
        "NOT_PENDING_APPROVAL": (
            "Approval request received for schedule that is not in Pending Approval state: "
            "domain={0} scheduleId={1} state={2}"
        ),
        "CANNOT_CANCEL_IN_PROGRESS": "Cannot delete/cancel a schedule with events in progress.",
        # CMSO's text; each raiser says after it which filters its route takes
        "UNDEFINED_FILTER_ATTRIBUTE": "Undefined filter attribute {0}",
        "INVALID_DATE_FILTER": "Invalid date filter provided {0}={1}",
        "UNABLE_TO_CREATE_CHANGE_TICKET": (
            "Unable to create change ticket in TM: Schedule ID: {0} : Reason : {1}"
        ),
        "NOT_RUNNING": "Cannot {0} schedule {1}: it is {2}, not a rollout under way",
        "NOT_STOPPED": "Cannot resume schedule {0}: it is {1}, not Paused or Halted",
        "TOO_MANY_ELEMENTS": (
            "{0} holds {1} elements, more than the {2} allowed ([optimizer] max_elements)"
        ),
        "PLAN_CHANGED": (
            "The plan of schedule {0} is {2}, not {1} as approved: look at it again (cmsoctl"
            " show, or GET the schedule), or approve with --replan (REST: ?replan=true)"
        ),
        "PLAN_PASSED": (
            "Slots of plan {1} of schedule {0} passed (start + misfire grace before now, {2}):"
            " approve with --replan (REST: ?replan=true) to re-place them first"
        ),
        "NO_SLOT_LEFT": (
            "Schedule {0} cannot be re-planned: its change windows have no free slot left"
        ),
        "SCHEDULE_CHANGED": (
            "Schedule {0} changed while its change tickets were being opened; try again"
        ),
    }

    def __init__(
        self, status: int, code: str, *variables: Any, detail: str = "", text: str = ""
    ) -> None:
        """`detail`: said after CMSO's text (which element, why), leaving its variables as
        CMSO's clients expect them. `text`: said instead of CMSO's, where its template does
        not fit (a body that does not decode has a field but no value to show)."""
        self.status = status
        self.code = code
        self.variables = [str(v) for v in variables]
        padded = self.variables + [""] * 4
        self.text = (text or self.TEMPLATES[code].format(*padded)) + (
            f": {detail}" if detail else ""
        )
        super().__init__(f"{status} Scheduler.{code}: {self.text}")

    def add(self, more: str) -> None:
        """Say more after the text (what already happened before the refusal)."""
        self.text += f"; {more}"
        self.args = (f"{self.status} Scheduler.{self.code}: {self.text}",)

    @property
    def message_id(self) -> str:
        return f"Scheduler.{self.code}"

    def to_parameters(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "requestError": {
                "messageId": self.message_id,
                "text": self.text,
                "variables": self.variables,
            },
        }


class ControlError(CmsodError):
    name = "io.cmsod.Error"

    def __init__(self, message: str, name: str | None = None, **parameters: Any) -> None:
        super().__init__(message)
        if name:
            self.name = name
        self.parameters = {"message": message, **parameters}


class InvalidParameter(ControlError):
    name = "org.varlink.service.InvalidParameter"

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message, parameter=parameter)


class MethodNotFound(ControlError):
    name = "org.varlink.service.MethodNotFound"

    def __init__(self, method: str) -> None:
        super().__init__(f"no such method {method!r}", method=method)


class PermissionDenied(ControlError):
    name = "io.cmsod.PermissionDenied"


class ConfigError(CmsodError):
    pass


class TransitionError(CmsodError):
    pass


class PeerError(CmsodError):
    pass


class NotDelivered(PeerError):
    pass


class Unconfirmed(PeerError):
    pass


class Unavailable(PeerError):
    pass
