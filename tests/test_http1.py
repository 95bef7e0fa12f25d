"""The lean HTTP/1.1 client: the answer parser on any split of the byte stream, its limits,
and against a real server on loopback: pipelined polls, connections the server closed."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cmsod.peers import http1
from cmsod.peers.http1 import Http1Client, ProtocolError, Response, ResponseReader
from tests.fake_http import Drop, FakeHTTP, Reply, Request


def encode(status: int, body: bytes, chunked: bool, sizes: list[int]) -> bytes:
    if not chunked:
        return b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
    out, at = [b"HTTP/1.1 %d OK\r\nTransfer-Encoding: chunked\r\n\r\n" % status], 0
    for size in sizes:
        piece = body[at : at + size]
        at += len(piece)
        if piece:
            out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
    if at < len(body):
        out.append(b"%x\r\n%s\r\n" % (len(body) - at, body[at:]))
    out.append(b"0\r\nX-Trailer: t\r\n\r\n")
    return b"".join(out)


answers = st.lists(
    st.tuples(
        st.sampled_from([200, 201, 404, 500]),
        st.binary(max_size=300),
        st.booleans(),
        st.lists(st.integers(1, 50), max_size=5),
        st.booleans(),  # a 100 Continue first
    ),
    min_size=1,
    max_size=8,
)


@given(answers=answers, cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_answers_come_out_whole_and_in_order_however_the_bytes_arrive(answers, cuts) -> None:
    stream = b"".join(
        (b"HTTP/1.1 100 Continue\r\n\r\n" if cont else b"") + encode(s, b, c, z)
        for s, b, c, z, cont in answers
    )
    reader, got = ResponseReader(), []
    points = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    start = 0
    for point in points:
        reader.feed(stream[start:point])
        start = point
        while (answer := reader.next()) is not None:
            got.append(answer)
    assert [(a.status, a.body) for a in got] == [(s, b) for s, b, *_ in answers]
    assert not reader.buffer


def test_close_delimited_and_connection_close_answers() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
    assert reader.next() is None
    assert reader.eof() == Response(200, b"until the end", keep_alive=False)
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert reader.next() == Response(204, b"", keep_alive=False)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 700 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * (http1.MAX_HEAD + 10),
    ],
)
def test_what_is_not_a_readable_answer_is_a_protocol_error(data: bytes) -> None:
    reader = ResponseReader()
    reader.feed(data)
    with pytest.raises(ProtocolError):
        reader.next()


def server(log: list[str]) -> FakeHTTP:
    def handle(request: Request) -> Reply:
        log.append(request.path)
        return Reply(200, request.path.encode())

    return FakeHTTP(handle)


async def test_pipelined_requests_come_back_in_order_on_one_connection(nursery) -> None:
    log: list[str] = []
    fake = server(log)
    await nursery.start(fake.serve)
    client = Http1Client(fake.url + "/base", {"X-FromAppId": "cmso"}, 5, 5, 4)
    requests = [client.encode("GET", f"/{i}") for i in range(100)]
    answers = await client.exchange(requests)
    assert [a.body for a in answers] == [f"/base/{i}".encode() for i in range(100)]
    again = await client.request("POST", "/x", {"X-TransactionId": "k"}, b"{}")
    assert again.body == b"/base/x"
    assert all(r.headers["x-fromappid"] == "cmso" for r in fake.requests)
    assert fake.requests[-1].headers["x-transactionid"] == "k"
    assert fake.requests[-1].headers["content-length"] == "2"
    assert len(client._idle) == 1  # one kept-alive connection served them all
    await client.aclose()


async def test_a_connection_the_server_closed_is_never_reused(nursery) -> None:
    log: list[str] = []
    fake = server(log)
    fake.close_after_reply = True  # as a server whose keep-alive timeout passed
    await nursery.start(fake.serve)
    client = Http1Client(fake.url, {}, 5, 5, 2)
    for i in range(20):
        await trio.lowlevel.checkpoint()  # let the server's close reach us, as idle time would
        assert (await client.request("POST", f"/{i}", body=b"x")).body == f"/{i}".encode()
    assert log == [f"/{i}" for i in range(20)]  # each sent once: none lost on a dead connection
    await client.aclose()


async def test_a_break_mid_batch_keeps_the_answers_before_it(nursery) -> None:
    fake = FakeHTTP(lambda r: Reply(200, b"ok") if r.path != "/3" else Drop())
    await nursery.start(fake.serve)
    client = Http1Client(fake.url, {}, 5, 5, 2)
    with pytest.raises(http1.Broken) as caught:
        await client.exchange([client.encode("GET", f"/{i}") for i in range(6)])
    assert [a.body for a in caught.value.got] == [b"ok"] * 3
    assert not client._idle  # the broken connection is not kept
    with pytest.raises(http1.ConnectFailed):
        await Http1Client("http://127.0.0.1:9", {}, 5, 5, 1).request("GET", "/")
