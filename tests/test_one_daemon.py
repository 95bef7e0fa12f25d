"""One daemon per state directory: a second `cmsod` on the same directory must exit at once,
naming the running one's pid, before it opens the store or starts an actor; and the lock must
not outlive a daemon killed with SIGKILL."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cmsod.daemon import EX_CONFIG, EX_IN_USE
from cmsod.rest.auth import hash_password
from tests.cmso_requests import request
from tests.procs import Daemon, cmsoctl


def state_files(state_dir: Path) -> dict[str, bytes]:
    """Every regular file of the state directory and its bytes. (Not SQLite's -shm index:
    the running daemon's own readers may touch it.)"""
    return {
        str(path.relative_to(state_dir)): path.read_bytes()
        for path in sorted(state_dir.rglob("*"))
        if path.is_file() and not path.name.endswith("-shm")
    }


def test_a_second_daemon_on_the_same_state_dir_touches_nothing(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    try:
        body = request("one", now=datetime.now(UTC), nodes=["one-a", "one-b"])
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        first.wait_log(r"event=schedule\.optimized schedule_id=one")
        deadline = time.monotonic() + 30
        while json.loads(cmsoctl(tmp_path, "--json", "status")[1])["counts"]["eventsPending"]:
            assert time.monotonic() < deadline, "the outbox never drained to the file"
            time.sleep(0.05)
        before = state_files(tmp_path)
        assert before["events/cm-events.jsonl"].count(b"\n") == 3  # created, optimizing, planned

        second = subprocess.run(
            [sys.executable, "-m", "cmsod", "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == EX_IN_USE
        assert second.stdout == ""
        assert second.stderr.count("\n") == 1, second.stderr  # one line
        assert f"in use by cmsod pid {first.proc.pid}" in second.stderr
        assert state_files(tmp_path) == before  # the store and the events, byte for byte
        assert cmsoctl(tmp_path, "show", "one")[0] == 0  # the first one serves on
    finally:
        first.kill()

    # SIGKILL released the lock with the process: a new daemon starts and takes over
    again = Daemon(tmp_path)
    assert (tmp_path / "cmsod.lock").read_text() == f"{again.proc.pid}\n"
    code, out = cmsoctl(tmp_path, "show", "one")
    assert code == 0 and "Pending Approval" in out, out
    assert again.stop() == 0


@pytest.mark.parametrize("section", ["metrics", "http"])
def test_a_listen_port_in_use_refuses_the_start(tmp_path: Path, section: str) -> None:
    """The metrics and REST listeners are bound before the store is opened or an actor
    started: a port held by another process is EX_CONFIG, in one line naming the key."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    users = tmp_path / "users"
    users.write_text(f"ann:read:{hash_password('x', 4)}\n")
    listen = {"metrics": "127.0.0.1:0", "http": "127.0.0.1:0", section: f"127.0.0.1:{port}"}
    env = {
        "CMSOD_METRICS__LISTEN": listen["metrics"],
        "CMSOD_HTTP__LISTEN": listen["http"],
        "CMSOD_HTTP__CREDENTIALS_FILE": str(users),
    }
    try:
        daemon = Daemon(tmp_path, extra_env=env, ready=False)
        assert daemon.exited() == EX_CONFIG
    finally:
        held.close()
    said = [line for line in daemon.lines if line.startswith("cmsod:")]
    assert said == [
        f"cmsod: cannot start: {section}.listen = '127.0.0.1:{port}': Address already in use"
    ], daemon.lines
    assert not [line for line in daemon.lines if "store.opened" in line or "actor." in line]
    assert not (tmp_path / "cmsod.sqlite3").exists()
    # and with the port free, the same configuration starts (both listeners bound)
    daemon = Daemon(tmp_path, extra_env={**env, f"CMSOD_{section.upper()}__LISTEN": "127.0.0.1:0"})
    assert daemon.wait_log(r"event=metrics\.listening") and daemon.wait_log(
        r"event=http\.listening"
    )
    assert daemon.stop() == 0
