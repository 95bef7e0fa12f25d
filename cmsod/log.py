"""One log format: logfmt records, one per line, with a stable `event=` name first.

Under journald (stderr is the stream named by $JOURNAL_STREAM) records carry a `<N>` priority
prefix and no timestamp (journald adds its own); otherwise an ISO-8601 UTC `ts=` leads.
Call `log.info("schedule.created", schedule_id=..., n=...)`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_LOGGER = logging.getLogger("cmsod")
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return bool(ino) and f"{st.st_dev}" == dev and f"{st.st_ino}" == ino


class LogfmtFormatter(logging.Formatter):
    def __init__(self, journal: bool, as_json: bool = False) -> None:
        super().__init__()
        self.journal = journal
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if not self.journal:
            fields["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
                f".{int(record.msecs):03d}Z"
            )
        fields["level"] = record.levelname.lower()
        fields["event"] = getattr(record, "event", record.getMessage())
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            line = json.dumps(fields, default=str, ensure_ascii=False)
        else:
            line = " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
        if self.journal:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(stderr_is_journal(), as_json=fmt == "json"))
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


def set_level(level: str) -> None:
    _LOGGER.setLevel(level.upper())


def _log(level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, event, exc_info=exc_info, extra={"event": event, "fields": fields})


def debug(event: str, **fields: Any) -> None:
    _log(logging.DEBUG, event, False, fields)


def info(event: str, **fields: Any) -> None:
    _log(logging.INFO, event, False, fields)


def warning(event: str, **fields: Any) -> None:
    _log(logging.WARNING, event, False, fields)


def error(event: str, exc_info: bool = False, **fields: Any) -> None:
    _log(logging.ERROR, event, exc_info, fields)
