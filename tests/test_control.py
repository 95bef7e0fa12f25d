"""The control socket under bad input: each bad message gets a clear error (or, where the
framing is lost, a closed connection) and the daemon keeps serving everyone else."""

from __future__ import annotations

import msgspec
import trio
import trio.testing

from tests.cmso_requests import request
from tests.conftest import EPOCH, ControlClient, Daemon

STATUS = b'{"method":"io.cmsod.Manager.Status"}\0'


async def still_serving(cmsod: Daemon) -> None:
    other = await cmsod.connect()
    status = await other.ok("io.cmsod.Manager.Status")
    assert status["healthy"] is True
    assert status["daemons"] == []  # SQLite: one daemon, no lease to show (never "LAPSED")
    await other.aclose()


async def test_malformed_json_gets_an_error_and_the_connection_stays(
    client: ControlClient, cmsod: Daemon
) -> None:
    await client.send_raw(b"{not json\0")
    reply = msgspec.json.decode(await client.receive_raw())
    assert reply["error"] == "io.cmsod.InvalidMessage"
    assert "not a JSON object" in reply["parameters"]["message"]
    await client.send_raw(b"\xff\xfe invalid utf-8\0")
    assert msgspec.json.decode(await client.receive_raw())["error"] == "io.cmsod.InvalidMessage"
    await client.send_raw(STATUS)
    assert "parameters" in msgspec.json.decode(await client.receive_raw())


async def test_unknown_method(client: ControlClient) -> None:
    reply = await client.call("io.cmsod.Nope")
    assert reply == {
        "error": "org.varlink.service.MethodNotFound",
        "parameters": {"message": "no such method 'io.cmsod.Nope'", "method": "io.cmsod.Nope"},
    }


async def test_wrong_parameter_types_name_the_field(client: ControlClient) -> None:
    reply = await client.call("io.cmsod.Schedules.Get", scheduleId=42)
    assert reply["error"] == "org.varlink.service.InvalidParameter"
    assert reply["parameters"]["parameter"] == "scheduleId"
    assert "Expected `str`, got `int`" in reply["parameters"]["message"]

    body = request("typed", now=EPOCH)
    body["schedulingInfo"]["normalDurationInSeconds"] = "an hour"
    reply = await client.call("io.cmsod.Schedules.Create", schedule=body)
    assert reply["error"] == "org.varlink.service.InvalidParameter"
    assert reply["parameters"]["parameter"] == "schedule.schedulingInfo.normalDurationInSeconds"

    reply = await client.call("io.cmsod.Schedules.List", limit=10**6)
    assert reply["parameters"]["parameter"] == "limit"
    reply = await client.call("io.cmsod.Manager.Status", surprise=1)
    assert reply["error"] == "org.varlink.service.InvalidParameter"


async def test_envelope_errors(client: ControlClient) -> None:
    await client.send_raw(b'{"method": 7}\0')
    reply = msgspec.json.decode(await client.receive_raw())
    assert reply["error"] == "org.varlink.service.InvalidParameter"
    assert reply["parameters"]["parameter"] == "method"
    await client.send_raw(b'{"method":"io.cmsod.Manager.Status","extra":true}\0')
    assert (
        msgspec.json.decode(await client.receive_raw())["error"]
        == "org.varlink.service.InvalidParameter"
    )
    await client.send_raw(b"[1, 2, 3]\0")
    assert (
        msgspec.json.decode(await client.receive_raw())["error"]
        == "org.varlink.service.InvalidParameter"
    )


async def test_message_over_the_cap_closes_the_connection(nursery, tmp_path) -> None:
    from tests.conftest import start_daemon

    cmsod = await start_daemon(nursery, tmp_path, control__max_message_bytes=4096)
    client = await cmsod.connect()
    await client.send_raw(b'{"method":"' + b"x" * 10000)
    reply = await client.receive_raw()
    assert msgspec.json.decode(reply)["error"] == "io.cmsod.MessageTooLarge"
    assert await client.receive_raw() is None  # closed
    await still_serving(cmsod)
    cmsod.cancel.cancel()


async def test_a_nul_less_stream_held_open_is_closed_at_the_idle_timeout(
    autojump_clock, client: ControlClient, cmsod: Daemon
) -> None:
    await client.send_raw(b'{"method":"io.cmsod.Manager.Status"')  # no NUL, ever
    began = trio.current_time()
    assert await client.receive_raw() is None
    assert trio.current_time() - began >= cmsod.ctx.config.control.idle_timeout_s
    await still_serving(cmsod)


async def test_connection_cap(nursery, tmp_path) -> None:
    from tests.conftest import start_daemon

    cmsod = await start_daemon(nursery, tmp_path, control__max_connections=3)
    held = [await cmsod.connect() for _ in range(3)]
    for c in held:  # make sure the daemon has accepted all three
        assert "parameters" in await c.call("io.cmsod.Manager.Status")
    extra = await cmsod.connect()
    reply = await extra.receive_raw()
    assert msgspec.json.decode(reply)["error"] == "io.cmsod.TooManyConnections"
    await held[0].aclose()
    await trio.testing.wait_all_tasks_blocked()
    await still_serving(cmsod)
    cmsod.cancel.cancel()


async def test_several_requests_on_one_connection_in_order(client: ControlClient) -> None:
    await client.send_raw(
        b'{"method":"org.varlink.service.GetInfo"}\0{"method":"io.cmsod.Schedules.List"}\0'
    )
    first = msgspec.json.decode(await client.receive_raw())
    second = msgspec.json.decode(await client.receive_raw())
    assert first["parameters"]["product"] == "cmsod"
    assert "io.cmsod.Schedules" in first["parameters"]["interfaces"]
    assert second["parameters"] == {"schedules": [], "next": None}


async def test_state_changing_calls_are_logged_with_peer_credentials(
    client: ControlClient, caplog
) -> None:
    import logging
    import os

    caplog.set_level(logging.INFO, logger="cmsod")
    logging.getLogger("cmsod").propagate = True
    try:
        await client.ok("io.cmsod.Schedules.Create", schedule=request("audited", now=EPOCH))
    finally:
        logging.getLogger("cmsod").propagate = False
    calls = [r for r in caplog.records if getattr(r, "event", "") == "control.call"]
    assert calls and calls[0].fields["uid"] == os.getuid()
    assert calls[0].fields["pid"] == os.getpid()
    assert calls[0].fields["method"] == "io.cmsod.Schedules.Create"


async def test_a_stalled_group_lookup_does_not_stall_the_daemon(
    nursery, tmp_path, monkeypatch
) -> None:
    import grp
    import threading

    from cmsod.control.api import Peer, handle_message
    from tests.conftest import start_daemon

    cmsod = await start_daemon(nursery, tmp_path, control__operator_group="cmsod-ops")
    asked, released = threading.Event(), threading.Event()
    timed_out = []

    def unanswered_getgrnam(name: str) -> grp.struct_group:  # an LDAP server gone quiet
        asked.set()
        timed_out.append(not released.wait(10))
        raise KeyError(name)

    monkeypatch.setattr(grp, "getgrnam", unanswered_getgrnam)
    stranger = Peer(pid=1, uid=4242, gid=4242)  # not root, not us: membership decides
    create = msgspec.json.encode(
        {"method": "io.cmsod.Schedules.Create", "parameters": {"schedule": request("x", now=EPOCH)}}
    )
    replies: list[dict] = []
    answered = trio.Event()

    async def change_state() -> None:
        async for reply in handle_message(cmsod.ctx, stranger, create):
            replies.append(msgspec.json.decode(reply))
        answered.set()

    nursery.start_soon(change_state)
    await trio.to_thread.run_sync(asked.wait, 10)
    await still_serving(cmsod)  # served while the look-up hangs
    released.set()
    await answered.wait()
    assert timed_out == [False]  # the other call did not have to wait for the look-up
    assert replies[0]["error"] == "io.cmsod.PermissionDenied"  # same answer as before


async def test_out_of_descriptors_on_accept_the_server_keeps_serving(
    autojump_clock, nursery, tmp_path
) -> None:
    import errno
    import gc
    import logging
    import os
    import resource
    import socket

    from tests.conftest import start_daemon

    cmsod = await start_daemon(nursery, tmp_path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("cmsod").addHandler(handler)

    def logged(event: str) -> list[logging.LogRecord]:
        return [r for r in records if r.getMessage() == event]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients: list[socket.socket] = []
    gc.collect()  # no earlier test's socket may be collected, freeing a descriptor, mid-burst
    gc.disable()
    try:
        # a few descriptors to spare, then clients take every one of them: the daemon's
        # accept() (same process) gets EMFILE while they wait in the listen queue
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        while True:
            try:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
            client.connect(str(cmsod.socket))
            clients.append(client)
        await trio.sleep(5)  # virtual: dozens of failed accepts
        assert len(logged("control.accept_failed")) == 1  # once per burst, not once per try
        for client in clients:
            client.close()
        clients.clear()
        await still_serving(cmsod)  # the server is still there
        assert logged("control.accept_recovered")[0].fields["failures"] > 1
    finally:
        for client in clients:
            client.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.enable()
        logging.getLogger("cmsod").removeHandler(handler)


async def test_a_connection_s_failure_costs_that_connection_only() -> None:
    """The guard both the control socket and the metrics listener serve connections with: a
    client gone away is not an error, a bug is logged; either way the connection is closed
    and no longer counted, and nothing reaches the server."""
    import logging

    from cmsod.control.listening import Connections

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("cmsod").addHandler(handler)
    connections = Connections("control")
    seen: list[int] = []

    async def gone(stream: trio.SocketStream) -> None:
        seen.append(connections.active)
        raise trio.BrokenResourceError

    async def bug(stream: trio.SocketStream) -> None:
        seen.append(connections.active)
        raise KeyError("a bug")

    try:
        for handle in (gone, bug):
            ours, theirs = trio.socket.socketpair()
            with theirs:
                await connections.serve(handle, trio.SocketStream(ours))
                assert ours.fileno() == -1  # closed
    finally:
        logging.getLogger("cmsod").removeHandler(handler)
    assert seen == [1, 1] and connections.active == 0
    assert [r.getMessage() for r in records] == ["control.connection_failed"]
