"""The machine a benchmark ran on, printed with its figures."""

from __future__ import annotations

import os
import platform
import sqlite3


def describe() -> str:
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {model}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )
