"""Running as a service: sd_notify (READY, STATUS, WATCHDOG, STOPPING) on a real notify
socket and a wedged actor stopping the watchdog pings; permissions with two real users; a
disk that fills up mid-transaction; slow senders; a thousand idle connections.

Times here are virtual (`autojump_clock`): the tests wait on conditions, or run to a virtual
deadline while the watchdog or a slow sender acts for minutes, at no real cost."""

from __future__ import annotations

import json
import os
import pwd
import resource
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from cmsod import ctl
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import request
from tests.conftest import EPOCH, start_daemon, wait_until
from tests.procs import Daemon


async def test_notify_ready_status_watchdog_and_a_wedged_actor(
    autojump_clock, nursery, tmp_path, monkeypatch
) -> None:
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")  # 20 s: a ping every 10 s
    messages: list[tuple[float, str]] = []

    async def listen() -> None:
        while True:
            data = await notify.recv(4096)
            messages.append((trio.current_time(), data.decode()))

    nursery.start_soon(listen)
    cmsod = await start_daemon(nursery, tmp_path)

    async def pinged_and_reported() -> bool:
        kinds = [m.split("\n")[0].split("=")[0] for _, m in messages]
        return kinds.count("WATCHDOG") >= 5 and kinds.count("STATUS") >= 1

    await wait_until(pinged_and_reported, "watchdog pings and a STATUS line")
    kinds = [m.split("\n")[0].split("=")[0] for _, m in messages]
    assert kinds[0] == "READY" and messages[0][1].split("\n")[1].startswith("STATUS=")
    assert kinds.count("WATCHDOG") >= 5
    assert any(m.startswith("STATUS=") and "active schedules" in m for _, m in messages[1:])

    async def stuck(topic, events):  # the sink call never returns: the emitter wedges
        await trio.sleep_forever()

    cmsod.ctx.sink.publish = stuck  # type: ignore[method-assign]
    client = await cmsod.connect()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("wedge", now=EPOCH))
    wedged_at = trio.current_time()
    await trio.sleep_until(wedged_at + 400)  # past STALL_S: the watchdog must have gone quiet
    pings_after = [t for t, m in messages if m == "WATCHDOG=1" and t > wedged_at + 130]
    assert pings_after == []  # systemd would now kill and restart the daemon
    assert [t for t, m in messages if m == "WATCHDOG=1" and t > wedged_at]  # until it stalled

    os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own signal handler takes it
    await wait_until(lambda: _has(messages, "STOPPING=1"), "STOPPING=1")


async def _has(messages, text) -> bool:
    return any(m == text for _, m in messages)


async def test_a_full_disk_mid_transaction_stores_nothing_half_done(nursery, tmp_path) -> None:
    cmsod = await start_daemon(nursery, tmp_path)
    client = await cmsod.connect()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("before", now=EPOCH))
    conn = cmsod.ctx.store.conn
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = request("too-big", now=EPOCH, nodes=[f"n{i}" for i in range(2000)])
    reply = await client.call("io.cmsod.Schedules.Create", schedule=big)
    assert reply["error"] == "io.cmsod.InternalError"
    assert "full" in reply["parameters"]["message"]
    listed = await client.ok("io.cmsod.Schedules.List")
    assert [s["scheduleId"] for s in listed["schedules"]] == ["before"]  # nothing half-stored
    assert (await client.ok("io.cmsod.Manager.Status"))["components"][0]["healthy"] is True
    conn.execute("PRAGMA max_page_count = 1073741823")
    await client.ok("io.cmsod.Schedules.Create", schedule=big)
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM elements").fetchone() == (2001,)


async def test_a_slow_sender_is_closed_at_the_idle_timeout(
    autojump_clock, nursery, tmp_path
) -> None:
    cmsod = await start_daemon(nursery, tmp_path)
    stream = await trio.open_unix_socket(str(cmsod.socket))
    began = trio.current_time()
    closed = False
    for n, byte in enumerate(b'{"method":"io.cmsod.Manager.Status"' * 10):  # a byte / 5 s, no NUL
        try:
            await stream.send_all(bytes([byte]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            closed = True
            break
        await trio.sleep_until(began + 5 * (n + 1))
    assert closed
    assert cmsod.ctx.config.control.idle_timeout_s <= trio.current_time() - began <= 80
    other = await cmsod.connect()
    assert (await other.ok("io.cmsod.Manager.Status"))["healthy"]


def test_a_thousand_idle_connections(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    daemon = Daemon(tmp_path)
    idle = []
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(tmp_path / "control.sock"))
            sock.sendall(b'{"method":')  # and then nothing
            idle.append(sock)
        reply = ctl.call(str(tmp_path / "control.sock"), "io.cmsod.Manager.Status", {}, 10)
        assert reply.error is None and reply.parameters["healthy"]
        assert (
            ctl.call(str(tmp_path / "control.sock"), "io.cmsod.Schedules.List", {}, 10).error
            is None
        )
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert daemon.stop() == 0


# -- two real users -------------------------------------------------------------------------

USER, GROUP = "cmsod-test-peer", "cmsod-test-ops"


@pytest.fixture
def other_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user (runs as root in CI)")
    subprocess.run(["groupadd", "-f", GROUP], check=True)
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True
        )
    subprocess.run(["gpasswd", "-d", USER, GROUP], capture_output=True)
    yield pwd.getpwnam(USER)
    subprocess.run(["userdel", USER], capture_output=True)
    subprocess.run(["groupdel", GROUP], capture_output=True)


def as_user(user: pwd.struct_passwd, socket_path: str, calls: list[tuple[str, dict]]) -> list[dict]:
    """Make control calls from a child process running as `user` (fork, drop to its ids)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no trio here, only blocking calls, then _exit
        try:
            os.close(read)
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            answers = []
            for method, parameters in calls:
                try:
                    reply = ctl.call(socket_path, method, parameters, 10)
                except ctl.CtlError as exc:  # refused before any reply: cmsoctl's exit code
                    answers.append({"error": "cmsoctl", "exit": exc.code, "uid": os.getuid()})
                    continue
                answers.append(
                    {"error": reply.error, "parameters": reply.parameters, "uid": os.getuid()}
                )
            os.write(write, json.dumps(answers).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


async def test_permissions_with_two_real_users(nursery, tmp_path, other_user, caplog) -> None:
    import logging
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="cmsod-perm-"))
    os.chmod(shared, 0o755)  # the other user must reach the socket: mode 0666 opens the first gate
    cmsod = await start_daemon(
        nursery, shared, control__socket_mode="0666", control__operator_group=GROUP
    )
    sock = str(cmsod.socket)
    create = ("io.cmsod.Schedules.Create", {"schedule": request("theirs", now=EPOCH)})
    caplog.set_level(logging.INFO, logger="cmsod")
    logging.getLogger("cmsod").propagate = True
    try:
        answers = await trio.to_thread.run_sync(
            as_user, other_user, sock, [("io.cmsod.Schedules.List", {}), create]
        )
        assert answers[0]["error"] is None and answers[0]["uid"] == other_user.pw_uid  # may read
        assert answers[1]["error"] == "io.cmsod.PermissionDenied"  # may not change state
        denied = [r for r in caplog.records if getattr(r, "event", "") == "control.denied"]
        assert denied and denied[0].fields["uid"] == other_user.pw_uid
        await trio.run_process(["usermod", "-aG", GROUP, USER])  # now an operator
        answers = await trio.to_thread.run_sync(as_user, other_user, sock, [create])
        assert (
            answers[0]["error"] is None and answers[0]["parameters"]["status"] == S.PENDING_SCHEDULE
        )
        calls = [r for r in caplog.records if getattr(r, "event", "") == "control.call"]
        assert any(r.fields["uid"] == other_user.pw_uid for r in calls)
        # the first gate: with the socket 0660 root:root the other user cannot even connect
        os.chmod(shared / "control.sock", 0o660)
        answers = await trio.to_thread.run_sync(
            as_user, other_user, sock, [("io.cmsod.Schedules.List", {})]
        )
        assert answers == [{"error": "cmsoctl", "exit": ctl.EX_NOPERM, "uid": other_user.pw_uid}]
    finally:
        logging.getLogger("cmsod").propagate = False
        cmsod.cancel.cancel()
