"""The orchestrator's HTTP/1.1 client (h11 on trio streams) against real servers on loopback:
framings it reads, framings it refuses, cancellation at every await of an exchange, servers
that close idle connections, file descriptors above 1023, IPv6, and TLS with a test CA."""

from __future__ import annotations

import os
import resource
import socket
import ssl
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmsod.config import TlsConfig
from cmsod.errors import ConfigError, PeerError
from cmsod.peers import http1, tls
from cmsod.peers.http1 import Broken, ConnectFailed, Http1Client
from tests.fake_http import Drop, FakeHTTP, Raw, Reply, Request


def echo(request: Request) -> Reply:
    """Every answer names the request it answers."""
    return Reply(200, f"{request.method} {request.path}".encode())


async def started(nursery: trio.Nursery, fake: FakeHTTP) -> FakeHTTP:
    await nursery.start(fake.serve)
    return fake


async def test_one_connection_carries_request_after_request(nursery) -> None:
    fake = await started(nursery, FakeHTTP(echo))
    client = Http1Client(fake.url + "/base", {"X-FromAppId": "cmso"}, 5, 5, 4)
    for i in range(20):
        assert (await client.request("GET", f"/{i}")).body == f"GET /base/{i}".encode()
    answer = await client.request("POST", "/x", {"X-TransactionId": "k"}, b"{}")
    assert (answer.status, answer.body) == (200, b"POST /base/x")
    assert fake.connections == 1  # kept alive throughout
    assert all(r.headers["x-fromappid"] == "cmso" for r in fake.requests)
    assert fake.requests[-1].headers["x-transactionid"] == "k"
    assert fake.requests[-1].headers["content-length"] == "2"
    assert fake.requests[-1].headers["host"] == f"127.0.0.1:{fake.port}"
    await client.aclose()


async def test_concurrent_requests_each_get_their_own_answer(nursery) -> None:
    fake = await started(nursery, FakeHTTP(echo))
    client = Http1Client(fake.url, {}, 5, 5, 8)
    got: dict[int, bytes] = {}

    async def one(i: int) -> None:
        got[i] = (await client.request("GET", f"/{i}")).body

    async with trio.open_nursery() as requests:
        for i in range(200):
            requests.start_soon(one, i)
    assert got == {i: f"GET /{i}".encode() for i in range(200)}
    assert fake.connections <= 8  # never more than the pool's size
    await client.aclose()


async def test_pipelined_polls_come_back_in_order_on_one_connection(nursery) -> None:
    fake = await started(nursery, FakeHTTP(echo))
    client = Http1Client(fake.url + "/base", {}, 5, 5, 4)
    answers = await client.exchange([client.encode("GET", f"/{i}") for i in range(100)])
    assert [a.body for a in answers] == [f"GET /base/{i}".encode() for i in range(100)]
    assert (await client.request("POST", "/x", body=b"{}")).body == b"POST /base/x"
    assert fake.connections == 1
    with pytest.raises(ValueError, match="only GET and HEAD"):
        await client.exchange([client.encode("GET", "/"), client.encode("POST", "/", body=b"x")])
    await client.aclose()


async def test_a_batch_stops_at_the_first_bad_answer_and_keeps_the_ones_before(nursery) -> None:
    """With pipelining one mis-framed answer would shift every later one: nothing after it is
    read as an answer."""
    bad = MALFORMED["repeated Content-Length"]

    def handle(request: Request) -> Reply | Raw:
        return Raw(bad) if request.path == "/3" else echo(request)

    fake = await started(nursery, FakeHTTP(handle))
    client = Http1Client(fake.url, {}, 5, 5, 1)
    with pytest.raises(Broken, match="not a well-framed") as caught:
        await client.exchange([client.encode("GET", f"/{i}") for i in range(6)])
    assert [a.body for a in caught.value.got] == [b"GET /0", b"GET /1", b"GET /2"]
    answers = await client.exchange([client.encode("GET", f"/{i}") for i in (4, 5)])
    assert [a.body for a in answers] == [b"GET /4", b"GET /5"]  # their own, on a new connection
    assert fake.connections == 2
    await client.aclose()


async def test_a_connection_close_answer_ends_the_batch(nursery) -> None:
    def handle(request: Request) -> Reply:
        headers = {"Connection": "close"} if request.path == "/1" else {}
        return Reply(200, request.path.encode(), headers=headers)

    fake = await started(nursery, FakeHTTP(handle))
    client = Http1Client(fake.url, {}, 5, 5, 1)
    with pytest.raises(Broken, match="closed before every answer") as caught:
        await client.exchange([client.encode("GET", f"/{i}") for i in range(4)])
    assert [a.body for a in caught.value.got] == [b"/0", b"/1"]
    assert not client._idle
    await client.aclose()


@pytest.mark.parametrize(
    "answer, body",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2;ext=1\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"hello",
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    ],
)
async def test_the_framings_of_http_1_1_are_read(nursery, answer: bytes, body: bytes) -> None:
    fake = await started(nursery, FakeHTTP(lambda r: Raw(answer)))
    client = Http1Client(fake.url, {}, 5, 5, 1)
    assert (await client.request("GET", "/")).body == body
    assert (await client.request("GET", "/")).body == body
    assert fake.connections == 1
    await client.aclose()


async def test_a_close_delimited_answer_ends_at_the_close(nursery) -> None:
    answer = Raw(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True)
    fake = await started(nursery, FakeHTTP(lambda r: answer))
    client = Http1Client(fake.url, {}, 5, 5, 1)
    for _ in range(2):
        got = await client.request("GET", "/")
        assert (got.status, got.body) == (200, b"until the end")
    assert not client._idle and fake.connections == 2  # never kept after such an answer
    await client.aclose()


MALFORMED = {
    "repeated Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 2\r\n\r\nok",
    "Content-Length and Transfer-Encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "no CRLF after a chunk": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n"
    ),
    "not HTTP/1.x": b"HTTP/2 200\r\n\r\n",
    "not HTTP at all": b"SSH-2.0-OpenSSH\r\n\r\n",
    "status not a number": b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    "header without a colon": b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    "negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "Content-Length too large": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "head too large": b"HTTP/1.1 200 OK\r\nX: " + b"y" * (http1.MAX_HEAD + 10),
}


@pytest.mark.parametrize("name", MALFORMED)
async def test_a_mis_framed_answer_is_refused_and_its_connection_closed(nursery, name) -> None:
    def handle(request: Request) -> Reply | Raw:
        return Raw(MALFORMED[name]) if request.path == "/bad" else echo(request)

    fake = await started(nursery, FakeHTTP(handle))
    client = Http1Client(fake.url, {}, 5, 2, 1)
    assert (await client.request("GET", "/before")).body == b"GET /before"
    with pytest.raises(Broken, match="not a well-framed"):
        await client.request("GET", "/bad")
    # whatever the bad answer left on the wire dies with its connection
    assert (await client.request("POST", "/after")).body == b"POST /after"
    assert fake.connections == 2
    await client.aclose()


async def test_a_cancelled_request_never_hands_its_answer_to_the_next(nursery) -> None:
    """The issue's reproduction: GET /slow cancelled while its answer is on its way, then a
    dispatch POST on the same client."""
    received = trio.Event()

    def handle(request: Request) -> Reply:
        if request.path == "/slow":
            received.set()
            return Reply(200, b"/slow", delay_s=0.2)
        return Reply(200, request.path.encode())

    async def cancel_once_received(scope: trio.CancelScope) -> None:
        await received.wait()
        scope.cancel()

    fake = await started(nursery, FakeHTTP(handle))
    client = Http1Client(fake.url, {}, 5, 5, 1)
    assert (await client.request("GET", "/warm")).body == b"/warm"  # a kept-alive connection
    with trio.fail_after(5), trio.CancelScope() as scope:
        nursery.start_soon(cancel_once_received, scope)
        await client.request("GET", "/slow")
    assert scope.cancelled_caught
    answer = await client.request("POST", "/dispatch", body=b"{}")
    assert answer.body == b"/dispatch"
    await client.aclose()


class CancellingStream(trio.abc.Stream):
    """A real connection's stream that cancels `scope` at its `at`-th operation (send_all or
    receive_some), just before the operation or just after it returned."""

    def __init__(self, inner: trio.abc.Stream, plan: CancelPlan) -> None:
        self.inner, self.plan = inner, plan

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.plan.step(lambda: self.inner.send_all(data))

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.plan.step(lambda: self.inner.receive_some(max_bytes))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:  # pragma: no cover - HTTP/1.1 never half-closes
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.inner.aclose()


class CancelPlan:
    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.at = -1
        self.after = False
        self.count = 0

    async def step(self, operation: Callable):
        self.count += 1
        cancel = self.scope is not None and self.count == self.at
        if cancel and not self.after:
            self.scope.cancel()  # type: ignore[union-attr]
        result = await operation()
        if cancel and self.after:
            self.scope.cancel()  # type: ignore[union-attr]
            await trio.lowlevel.checkpoint()  # the answer's bytes were taken off the wire
        return result


class PlannedClient(Http1Client):
    def __init__(self, url: str, plan: CancelPlan) -> None:
        super().__init__(url, {}, 5, 5, 2)
        self.plan = plan

    async def _connect(self) -> http1.Connection:
        connection = await super()._connect()
        connection.stream = CancellingStream(connection.stream, self.plan)
        return connection


exchanges = st.lists(
    st.tuples(
        st.sampled_from(["GET", "POST"]),
        st.integers(0, 400_000),  # answer size: large ones take several reads
        st.integers(1, 4),  # GETs pipelined in one exchange (a POST is always alone)
        st.one_of(st.none(), st.integers(1, 12)),  # cancel at this operation (None: never)
        st.booleans(),  # just after the operation rather than before it
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchanges=exchanges)
def test_cancellation_at_any_await_never_lets_an_answer_reach_another_request(
    exchanges,
) -> None:
    def handle(request: Request) -> Reply:
        size = int(request.path.rsplit("/", 1)[1])
        name = f"{request.method} {request.path} ".encode()
        body = name + b"x" * (size - len(name)) if size > len(name) else name
        # a little slow, so a cancelled request's answer is still on its way when the next
        # request looks for a connection
        return Reply(200, body, delay_s=0.002)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            fake = await started(nursery, FakeHTTP(handle))
            plan = CancelPlan()
            client = PlannedClient(fake.url, plan)
            last = (99, ("GET", 0, 2, None, False))
            for number, (method, size, batch, at, after) in [*enumerate(exchanges), last]:
                paths = [f"/{number}.{i}/{size}" for i in range(batch if method == "GET" else 1)]
                expected = [handle(Request(method, path, {}, b"")).body for path in paths]
                plan.count, plan.at, plan.after = 0, at if at is not None else -1, after
                answers = []
                with trio.CancelScope() as scope:
                    plan.scope = scope
                    answers = await client.exchange([client.encode(method, p) for p in paths])
                plan.scope = None
                if not scope.cancelled_caught:
                    # each its own answer, never an earlier request's
                    assert [a.body for a in answers] == expected
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(scenario)


async def test_a_server_that_closes_idle_connections(nursery) -> None:
    fake = await started(nursery, FakeHTTP(echo))
    client = Http1Client(fake.url, {}, 5, 5, 2)
    for i in range(5):
        assert (await client.request("POST", f"/{i}", body=b"x")).body == f"POST /{i}".encode()
        await trio.testing.wait_all_tasks_blocked()  # the server waits for the next request
        await fake.close_idle()  # and its keep-alive timeout passes while the client is idle
    # each request sent exactly once, each on a fresh connection: none went down a dead one
    assert [r.path for r in fake.requests] == [f"/{i}" for i in range(5)]
    assert fake.connections == 5
    fake.close_after_reply = True  # and one that closes right after each answer
    for i in range(5):
        await trio.testing.wait_all_tasks_blocked()  # its close has reached us, as idle time would
        assert (await client.request("POST", f"/c{i}", body=b"x")).body == f"POST /c{i}".encode()
    assert len(fake.requests) == 10
    await client.aclose()


async def test_keep_alive_holds_above_file_descriptor_1023(nursery) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    with ExitStack() as hold:
        fds = []
        while not fds or fds[-1] < 1030:  # push the client's socket above 1023
            fds.append(os.open(os.devnull, os.O_RDONLY))
            hold.callback(os.close, fds[-1])
        fake = await started(nursery, FakeHTTP(echo))
        client = Http1Client(fake.url, {}, 5, 5, 1)
        for i in range(3):
            assert (await client.request("GET", f"/{i}")).body == f"GET /{i}".encode()
        assert client._idle[0].fileno > 1023
        assert fake.connections == 1  # one connection kept alive
        await client.aclose()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_ipv6_loopback_and_its_host_header(nursery) -> None:
    fake = await started(nursery, FakeHTTP(echo, host="::1"))
    client = Http1Client(fake.url + "/so", {}, 5, 5, 1)
    assert (await client.request("GET", "/x")).body == b"GET /so/x"
    assert fake.requests[0].headers["host"] == f"[::1]:{fake.port}"
    await client.aclose()


async def test_a_dropped_answer_is_broken_and_a_refused_connection_is_connect_failed(
    nursery,
) -> None:
    fake = await started(nursery, FakeHTTP(lambda r: Drop()))
    client = Http1Client(fake.url, {}, 5, 5, 1)
    with pytest.raises(Broken):
        await client.request("POST", "/x", body=b"{}")
    assert not client._idle
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(ConnectFailed, match="ECONNREFUSED"):
            await Http1Client(f"http://127.0.0.1:{port}", {}, 5, 5, 1).request("GET", "/")


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pem_files(ca: trustme.CA, tmp_path: Path) -> TlsConfig:
    """A CA file and a client certificate it signed, as [tls] would name them."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("cmsod@example.org")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    return TlsConfig(ca_file=str(tmp_path / "ca.pem"), client_cert=str(tmp_path / "client.pem"))


def tls_server(ca: trustme.CA, require_client_cert: bool = False) -> ssl.SSLContext:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    if require_client_cert:
        ca.configure_trust(server)
        server.verify_mode = ssl.CERT_REQUIRED
    return server


async def test_tls_with_the_configured_ca_and_client_certificate(nursery, ca, tmp_path) -> None:
    cfg = pem_files(ca, tmp_path)
    fake = await started(nursery, FakeHTTP(echo, ssl_context=tls_server(ca, True)))
    client = Http1Client(fake.url, {}, 5, 5, 1, tls.context(cfg))
    assert (await client.request("GET", "/a")).body == b"GET /a"
    assert (await client.request("GET", "/b")).body == b"GET /b"
    assert fake.connections == 1
    await client.aclose()
    no_cert = TlsConfig(ca_file=cfg.ca_file)  # trusted server, but no client certificate
    with pytest.raises((ConnectFailed, Broken)):
        await Http1Client(fake.url, {}, 5, 5, 1, tls.context(no_cert)).request("GET", "/")


async def test_tls_refuses_a_server_outside_the_trusted_cas(nursery, ca, tmp_path) -> None:
    fake = await started(nursery, FakeHTTP(echo, ssl_context=tls_server(ca)))
    system_store = Http1Client(fake.url, {}, 5, 5, 1, tls.context(TlsConfig()))
    with pytest.raises(ConnectFailed, match="certificate not trusted"):
        await system_store.request("GET", "/")
    anything = Http1Client(fake.url, {}, 5, 5, 1, tls.context(TlsConfig(verify=False)))
    assert (await anything.request("GET", "/")).body == b"GET /"
    await anything.aclose()


async def test_the_httpx_peers_use_the_same_tls_configuration(nursery, ca, tmp_path) -> None:
    from cmsod.config import TicketsConfig
    from cmsod.peers.sinks import MrSink
    from cmsod.peers.tm import HttpTM
    from tests.fake_http import FakeTM

    ctx = tls.context(pem_files(ca, tmp_path))
    tm = FakeTM()
    tm.ssl_context = tls_server(ca, require_client_cert=True)
    await nursery.start(tm.serve)
    ticket_system = HttpTM.from_config(TicketsConfig(mode="http", url=tm.url), ctx)
    assert (await ticket_system.create({"VNF": "n1"})).startswith("CHG")
    await ticket_system.aclose()
    bus = await started(
        nursery, FakeHTTP(lambda r: Reply(200, {"count": 1}), ssl_context=tls_server(ca, True))
    )
    sink = MrSink.create(bus.url, 5, ctx)
    assert await sink.publish("cm-events", [("s1", b"{}")]) == 1
    await sink.aclose()
    untrusted = MrSink.create(bus.url, 5, tls.context(TlsConfig()))
    with pytest.raises(PeerError) as refused:
        await untrusted.publish("cm-events", [("s1", b"{}")])
    assert "CERTIFICATE_VERIFY_FAILED" in repr(causes(refused.value))
    await untrusted.aclose()
    from cmsod.peers.sinks import KafkaSink
    from tests.fake_http import FakeKafkaProxy

    proxy = FakeKafkaProxy()
    proxy.check_shape = False
    proxy.ssl_context = tls_server(ca, require_client_cert=True)
    await nursery.start(proxy.serve)
    kafka = KafkaSink.create(proxy.url, 5, ctx)  # the REST proxy over mutual TLS
    assert await kafka.publish("cm-events", [("s1", b'{"eventId": "e1"}')]) == 1
    await kafka.aclose()
    assert proxy.written == [("cm-events", proxy.partition_of("s1"), 0, "s1", {"eventId": "e1"})]


def causes(exc: BaseException | None) -> list[BaseException]:
    found = []
    while exc is not None:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def test_tls_configuration_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls.ca_file .*No such file"):
        tls.context(TlsConfig(ca_file=str(tmp_path / "missing.pem")))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls.client_cert"):
        tls.context(TlsConfig(client_cert=str(tmp_path / "junk.pem")))
    with pytest.raises(ValueError, match="tls.client_key is set but tls.client_cert is not"):
        TlsConfig(client_key="k.pem")
