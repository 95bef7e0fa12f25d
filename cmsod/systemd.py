"""sd_notify without libsystemd (after systemd's own notify-selfcontained-example.py).

No $NOTIFY_SOCKET means not under systemd: every call is a no-op. Errors are ignored, as the
protocol asks.
"""

from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False
    payload = "\n".join(assignments).replace("\n\n", "\n").encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of $WATCHDOG_USEC when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
