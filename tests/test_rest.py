"""CMSO's REST API over a real HTTP listener (hypercorn on loopback) in front of an in-process
daemon: CMSO's acceptance scenarios (reference/cmso.md 8.1) as over the socket, then who may
do what and the limits. MockClock runs the scenarios' hours in milliseconds."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
import trio
import trio.testing
import trustme

from cmsod import usecases
from cmsod.control import api
from cmsod.executor import InlineExecutor
from cmsod.lifecycle import validate_request
from cmsod.log import LogfmtFormatter
from cmsod.model import ElementStatus as E
from cmsod.model import ScheduleStatus as S
from cmsod.rest import server as rest
from cmsod.rest.app import RestApp, ViewCache
from cmsod.rest.auth import Credentials, hash_password
from cmsod.store import schedules, views
from cmsod.wire.cmso import ScheduleRequest
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, Daemon, start_daemon, wait_until
from tests.fake_http import FakeSO
from tests.test_acceptance import (
    ACCEPTED_ODDITIES,
    FAILURES,
    FUTURE_CASES,
    IMMEDIATE_CASES,
    statuses,
)
from tests.test_calendars import daemon_from_file, write_config

PASSWORD = "correct horse"
USERS = {"reader": "read", "operator": "operate", "jf9860": "approve"}
BASE = "/cmso/v1/schedules"


def write_credentials(path: Path, cost: int = 4) -> Path:
    """Cheap hashes (ln=4) for the tests; the real default costs ~0.1 s per user."""
    lines = [f"{name}:{level}:{hash_password(PASSWORD, cost)}" for name, level in USERS.items()]
    path.write_text("# test users\n" + "\n".join(lines) + "\ncertonly:read:!\n")
    return path


class Rest:
    """An HTTP client of the listener, as one user."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    def as_user(self, name: str, password: str = PASSWORD) -> Rest:
        return Rest(
            httpx.AsyncClient(
                base_url=self.client.base_url, auth=(name, password), timeout=self.client.timeout
            )
        )

    async def create(self, body: dict[str, Any], schedule_id: str | None = None) -> httpx.Response:
        return await self.client.post(f"{BASE}/{schedule_id or body['scheduleId']}", json=body)

    async def schedule(self, schedule_id: str) -> dict[str, Any]:
        response = await self.client.get(f"{BASE}/{schedule_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def approve(self, schedule_id: str, body: dict[str, str]) -> httpx.Response:
        return await self.client.post(f"{BASE}/{schedule_id}/approvals", json=body)

    async def delete(self, schedule_id: str) -> httpx.Response:
        return await self.client.delete(f"{BASE}/{schedule_id}")

    async def details(self, **filters: Any) -> httpx.Response:
        return await self.client.get(f"{BASE}/scheduleDetails", params=filters)

    async def wait_for(self, schedule_id: str, *wanted: str) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        async def reached() -> bool:
            seen.append(await self.schedule(schedule_id))
            return seen[-1]["status"] in wanted

        await wait_until(reached, f"{schedule_id} in {wanted}")
        return seen[-1]


@pytest.fixture
async def served(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon with its HTTP listener on an ephemeral loopback port."""
    d = await start_daemon(
        nursery,
        tmp_path,
        http__listen="127.0.0.1:0",
        http__credentials_file=write_credentials(tmp_path / "users"),
        http__request_timeout_s=5,
        http__max_body_bytes=256 * 1024,
    )
    address = await nursery.start(rest.serve, d.ctx)
    yield d, f"http://{address}"
    d.cancel.cancel()


@pytest.fixture
async def http(served: tuple[Daemon, str]) -> AsyncIterator[Rest]:
    async with httpx.AsyncClient(
        base_url=served[1], auth=("jf9860", PASSWORD), timeout=30
    ) as client:
        yield Rest(client)


def assert_version_headers(response: httpx.Response) -> None:
    assert response.headers["X-LatestVersion"] == "2.0.0"
    assert response.headers["X-MinorVersion"] == "0"
    assert response.headers["X-PatchVersion"] == "0"


# -- CMSO's scenarios, as over the socket (tests/test_acceptance.py) ---------------------------


@pytest.mark.parametrize("case", FUTURE_CASES)
async def test_future_schedule_over_http(autojump_clock, http: Rest, case: str) -> None:
    created = await http.create(request(case, now=EPOCH, **FUTURE_CASES[case]))
    assert created.status_code == 202 and created.content == b""
    assert_version_headers(created)
    view = await http.wait_for(case, S.PENDING_APPROVAL)
    assert set(statuses(view).values()) == {E.PENDING_APPROVAL}
    answer = await http.approve(case, approval())
    assert answer.status_code == 204, answer.text
    view = await http.wait_for(case, S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    assert set(statuses(view).values()) == {E.COMPLETED}
    rows = await http.details(**{"request.scheduleId": case})
    assert rows.status_code == 200
    assert {r["status"] for r in rows.json()} == {E.COMPLETED}
    assert len(rows.json()) == len(FUTURE_CASES[case]["nodes"])
    assert (await http.delete(case)).status_code == 204
    assert (await http.schedule(case))["status"] == S.DELETED


@pytest.mark.parametrize("case", IMMEDIATE_CASES)
async def test_immediate_schedule_over_http(autojump_clock, http: Rest, case: str) -> None:
    options: dict[str, Any] = dict(
        normal=100,
        additional=10,
        group_id="group1",
        extra_domain_data={"plans": "x", "question.000000000000001": "y"},
    )
    options.update(IMMEDIATE_CASES[case])
    body = request(case, now=EPOCH, minutes_from_now=None, **options)
    created = await http.create(body)
    assert created.status_code == 202, created.text
    assert_version_headers(created)
    view = await http.wait_for(case, S.COMPLETED, S.COMPLETED_WITH_ERRORS)
    assert view["status"] == S.COMPLETED
    assert view["scheduleApprovals"][0]["userId"] == "jf9860"


@pytest.mark.parametrize("case", FUTURE_CASES)
async def test_cancel_over_http(autojump_clock, http: Rest, case: str) -> None:
    await http.create(request(case, now=EPOCH, minutes_from_now=20, **FUTURE_CASES[case]))
    await http.wait_for(case, S.PENDING_APPROVAL)
    assert (await http.approve(case, approval())).status_code == 204
    await http.wait_for(case, S.SCHEDULED)
    assert (await http.delete(case)).status_code == 204
    view = await http.schedule(case)
    assert view["status"] == S.CANCELLED
    assert set(statuses(view).values()) == {E.CANCELLED}


async def test_rejection_over_http(autojump_clock, http: Rest) -> None:
    await http.create(request("reject-me", now=EPOCH, normal=100, additional=10))
    await http.wait_for("reject-me", S.PENDING_APPROVAL)
    assert (await http.approve("reject-me", approval("Rejected"))).status_code == 204
    view = await http.schedule("reject-me")
    assert view["status"] == S.REJECTED
    assert set(statuses(view).values()) == {E.APPROVAL_REJECTED}


@pytest.mark.parametrize(
    "name,options,edit,message_id,variables", FAILURES, ids=[f[0] for f in FAILURES]
)
async def test_create_failures_over_http(
    http: Rest, name, options, edit, message_id, variables
) -> None:
    body = request(name, now=EPOCH, **options)
    if edit:
        body = edit(body)
    answer = await http.create(body, schedule_id=name)
    assert answer.status_code == 400, answer.text
    assert_version_headers(answer)
    error = answer.json()["requestError"]
    assert error["messageId"] == message_id
    if variables is not None:
        assert error["variables"] == variables
    assert error["text"]
    listed = await http.client.get(BASE)
    assert listed.status_code == 200 and listed.json() == []  # nothing half-stored


@pytest.mark.parametrize(
    "name,options,edit", ACCEPTED_ODDITIES, ids=[a[0] for a in ACCEPTED_ODDITIES]
)
async def test_cmso_accepted_oddities_over_http(http: Rest, name, options, edit) -> None:
    body = request(name, now=EPOCH, **options)
    if edit:
        body = edit(body)
    assert (await http.create(body)).status_code == 202
    assert (await http.schedule(name))["scheduleName"] == name


async def test_duplicate_and_path_mismatch(http: Rest) -> None:
    body = request("twice", now=EPOCH)
    assert (await http.client.put(f"{BASE}/twice", json=body)).status_code == 202  # PUT creates
    again = await http.create(body)
    assert again.status_code == 409
    assert again.json()["requestError"] == {
        "messageId": "Scheduler.SCHEDULE_ALREADY_EXISTS",
        "text": "Schedule already exists domain=ChangeManagement schedule id=twice",
        "variables": ["ChangeManagement", "twice"],
    }
    other = await http.create(request("body-id", now=EPOCH), schedule_id="path-id")
    assert other.status_code == 400
    assert other.json()["requestError"]["variables"] == ["scheduleId", "body-id"]


async def test_query_cases_over_http(autojump_clock, http: Rest) -> None:
    body = request("query", now=EPOCH, nodes=["node1", "node2", "node3"], workflow="Replace")
    await http.create(body)
    await http.wait_for("query", S.PENDING_APPROVAL)

    async def count(query: str) -> int | httpx.Response:
        answer = await http.client.get(f"{BASE}/scheduleDetails?request.scheduleId=query{query}")
        return len(answer.json()) if answer.status_code == 200 else answer

    assert await count("") == 3
    assert await count("&vnfName=node1&vnfName=node3&WorkflowName=Replace") == 2
    # CMSO's robot suite sends `%` unescaped
    assert await count("&vnfName=node%&request.createDateTime=2018-01-01T00:00:00Z") == 3
    missing = await count(
        "&vnfName=NoNode&request.createDateTime=2018-01-01T00:00:00Z,2018-01-01T01:00:00Z"
    )
    assert isinstance(missing, httpx.Response) and missing.status_code == 404
    bad = await count("&bad=NoNode")
    assert isinstance(bad, httpx.Response) and bad.status_code == 400
    assert bad.json()["requestError"]["messageId"] == "Scheduler.UNDEFINED_FILTER_ATTRIBUTE"
    date = await count("&request.createDateTime=2018-01-010")
    assert isinstance(date, httpx.Response) and date.status_code == 400
    assert date.json()["requestError"]["messageId"] == "Scheduler.INVALID_DATE_FILTER"
    assert await count("&vnfStatus=Pending%20Approval") == 3  # a filter CMSO broke
    assert await count("&maxSchedules=1") == 3


async def test_misc_not_found_bad_approval_and_versions(http: Rest) -> None:
    assert (await http.client.get(f"{BASE}/doesNotExist")).status_code == 404
    assert (await http.delete("doesNotExist")).status_code == 404
    bad = await http.approve("DoesNotExist", approval("Accespted"))
    assert bad.status_code == 400
    assert bad.json()["requestError"]["variables"] == ["approvalStatus", "Accespted"]
    assert (await http.client.get("/cmso/V2/schedules")).status_code == 200  # any case
    v3 = await http.client.get("/cmso/v3/schedules")
    assert (v3.status_code, v3.text) == (404, "Unsupported Major version")
    minor = await http.client.get(BASE, headers={"X-MinorVersion": "1"})
    assert (minor.status_code, minor.text) == (404, "Unsupported API version")
    assert minor.headers["X-MinorVersion"] == "1"
    health = await http.client.get("/cmso/v1/health", params={"checkInterfaces": "true"})
    assert health.status_code == 200 and health.json()["healthy"] is True
    assert_version_headers(health)
    document = await http.client.get("/cmso/openapi.json")
    assert document.json()["openapi"].startswith("3.")


async def test_list_pages_with_a_link(http: Rest) -> None:
    for n in range(3):
        assert (await http.create(request(f"s{n}", now=EPOCH))).status_code == 202
    first = await http.client.get(BASE, params={"limit": 2})
    assert [s["scheduleId"] for s in first.json()] == ["s2", "s1"]  # newest first
    link = first.headers["Link"]
    rest_page = await http.client.get(BASE + link[1 : link.index(">")])
    assert [s["scheduleId"] for s in rest_page.json()] == ["s0"]
    assert "Link" not in rest_page.headers
    for after in ("nope", "²~x", "9" * 30 + "~x"):  # neither an id nor a cursor: no 500
        refused = await http.client.get(BASE, params={"after": after})
        assert refused.status_code == 400
        assert refused.json()["requestError"]["variables"] == ["after"]
    filtered = await http.client.get(BASE, params={"status": S.SCHEDULED})
    assert filtered.json() == []
    refused = await http.client.get(BASE, params={"status": "completed"})  # not `Completed`
    assert refused.status_code == 400
    error = refused.json()["requestError"]
    assert (
        error["variables"] == ["status"]
        and "they are (exactly): Pending Schedule," in error["text"]
    )
    unknown = await http.client.get(BASE, params={"scheduleName": "x"})
    assert unknown.status_code == 400  # CMSO ignored its list filters silently; we refuse
    assert unknown.json()["requestError"]["text"] == (  # the filters of this route
        "Undefined filter attribute scheduleName: the filters are: status, limit, after"
    )
    assert unknown.json()["requestError"]["variables"] == ["scheduleName"]


# -- who may do what ---------------------------------------------------------------------------


async def nothing_stored(http: Rest) -> None:
    listed = await http.client.get(BASE)
    assert listed.status_code == 200 and listed.json() == []


async def test_wrong_password_unknown_user_and_no_credentials(
    served: tuple[Daemon, str], http: Rest
) -> None:
    body = request("intruder", now=EPOCH)
    for user, password in [("jf9860", "wrong"), ("mallory", PASSWORD), ("certonly", "")]:
        async with httpx.AsyncClient(base_url=served[1], auth=(user, password)) as client:
            answer = await client.post(f"{BASE}/intruder", json=body)
            assert answer.status_code == 401, (user, answer.text)
            assert answer.headers["WWW-Authenticate"] == 'Basic realm="cmsod"'
            assert answer.json()["requestError"]["messageId"] == "cmsod.UNAUTHORIZED"
            assert_version_headers(answer)
    async with httpx.AsyncClient(base_url=served[1]) as anonymous:
        assert (await anonymous.get(BASE)).status_code == 401
        garbled = await anonymous.get(BASE, headers={"Authorization": "Basic %%%"})
        assert garbled.status_code == 401
    await nothing_stored(http)


async def test_password_never_logged(
    served: tuple[Daemon, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cmsod")
    async with httpx.AsyncClient(base_url=served[1], auth=("jf9860", "s3cret-guess")) as c:
        assert (await c.get(BASE)).status_code == 401
    async with httpx.AsyncClient(base_url=served[1], auth=("jf9860", PASSWORD)) as c:
        assert (await c.get(BASE)).status_code == 200
        assert (await c.get(BASE)).status_code == 200  # remembered: no second KDF
    formatter = LogfmtFormatter(journal=False)
    logged = "\n".join(formatter.format(r) for r in caplog.records)
    assert 'event=http.denied reason="wrong password" user=jf9860' in logged
    assert "s3cret-guess" not in logged and PASSWORD not in logged


async def test_read_only_user_cannot_change_state(autojump_clock, http: Rest) -> None:
    reader = http.as_user("reader")
    operator = http.as_user("operator")
    try:
        body = request("guarded", now=EPOCH)
        refused = await reader.create(body)
        assert refused.status_code == 403
        assert refused.json()["requestError"]["variables"] == ["reader", "operate"]
        await nothing_stored(http)
        # an operator may create a future schedule but not approve it...
        assert (await operator.create(body)).status_code == 202
        await http.wait_for("guarded", S.PENDING_APPROVAL)
        assert (await operator.approve("guarded", approval())).status_code == 403
        assert (await reader.delete("guarded")).status_code == 403
        assert (await reader.schedule("guarded"))["status"] == S.PENDING_APPROVAL
        # ...nor create an immediate one, which CMSO approves as it is created
        immediate = request("now", now=EPOCH, minutes_from_now=None, normal=100, additional=10)
        assert (await operator.create(immediate)).status_code == 403
        assert (await http.client.get(f"{BASE}/now")).status_code == 404
    finally:
        await reader.client.aclose()
        await operator.client.aclose()


async def test_the_approval_is_the_authenticated_users(autojump_clock, http: Rest) -> None:
    await http.create(request("mine", now=EPOCH))
    await http.wait_for("mine", S.PENDING_APPROVAL)
    claimed = approval(user="someone-else")
    assert (await http.approve("mine", claimed)).status_code == 204
    view = await http.schedule("mine")
    assert [a["userId"] for a in view["scheduleApprovals"]] == ["jf9860"]


# -- limits -----------------------------------------------------------------------------------


async def test_oversize_body_is_413_and_nothing_stored(http: Rest) -> None:
    body = request("huge", now=EPOCH)
    body["domainData"][0]["padding"] = "x" * 300_000
    answer = await http.create(body)
    assert answer.status_code == 413
    assert answer.json()["requestError"]["messageId"] == "cmsod.BODY_TOO_LARGE"
    await nothing_stored(http)


async def test_oversize_chunked_body_is_413(http: Rest) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it comes
        for _ in range(40):
            yield b" " * 10_000

    answer = await http.client.post(f"{BASE}/chunked", content=chunks())
    assert answer.status_code == 413
    await nothing_stored(http)


async def test_oversize_headers_are_refused(http: Rest) -> None:
    answer = await http.client.get(BASE, headers={"X-Big": "y" * 20_000})
    assert answer.status_code == 431
    long_query = await http.client.get(f"{BASE}/scheduleDetails", params={"vnfName": "n" * 20_000})
    assert long_query.status_code == 431
    await nothing_stored(http)


async def test_connection_limit_answers_503(
    autojump_clock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    d = await start_daemon(
        nursery,
        tmp_path,
        http__listen="127.0.0.1:0",
        http__credentials_file=write_credentials(tmp_path / "users"),
        http__max_connections=2,
    )
    address = await nursery.start(rest.serve, d.ctx)
    host, port = address.split(":")
    held = [await trio.open_tcp_stream(host, int(port)) for _ in range(2)]
    async with httpx.AsyncClient(base_url=f"http://{address}", auth=("reader", PASSWORD)) as c:
        busy = await c.get(BASE)
        assert busy.status_code == 503
        for stream in held:
            await stream.aclose()

        async def served_again() -> bool:
            return (await c.get(BASE)).status_code == 200

        await wait_until(served_again, "a freed connection slot", within_s=30)
    d.cancel.cancel()


async def send_partly(url: str, schedule_id: str, keep: int) -> tuple[trio.SocketStream, bytes]:
    """A create request sent whole but for the last `keep` bytes of its body, which it returns."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(request(schedule_id, now=EPOCH)).encode()
    credentials = base64.b64encode(f"jf9860:{PASSWORD}".encode()).decode()
    stream = await trio.open_tcp_stream(host, int(port))
    head = (
        f"POST {BASE}/{schedule_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {credentials}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + body[:-keep])
    return stream, body[-keep:]


async def read_head(stream: trio.SocketStream) -> bytes:
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = await stream.receive_some(65536)
        assert data, f"closed after {reply!r}"
        reply += data
    return reply


async def test_slow_client_gets_408_and_nothing_stored(
    autojump_clock, served: tuple[Daemon, str], http: Rest
) -> None:
    """A body that dribbles in slower than request_timeout_s (5 s here) is dropped: 408."""
    stream, _ = await send_partly(served[1], "slow", keep=100)
    with trio.fail_after(30):  # the server answers on its own once its 5 s are up
        assert (await read_head(stream)).startswith(b"HTTP/1.1 408")
    await stream.aclose()
    await nothing_stored(http)


async def test_sigterm_drains_the_listener(served: tuple[Daemon, str], http: Rest) -> None:
    """On SIGTERM (ctx.stopping) the listener takes no new connection, closes idle ones and
    answers the request in progress."""
    daemon, url = served
    assert (await http.client.get(BASE)).status_code == 200  # now an idle kept-alive one
    stream, rest_of_body = await send_partly(url, "in-flight", keep=100)
    await trio.testing.wait_all_tasks_blocked()  # the server has read what came
    daemon.ctx.stopping.set()
    with trio.fail_after(10):
        while True:
            try:
                async with httpx.AsyncClient(base_url=url, auth=("reader", PASSWORD)) as c:
                    await c.get(BASE)
            except httpx.ConnectError:
                break  # no longer accepting
            await trio.sleep(0.01)
    await stream.send_all(rest_of_body)
    with trio.fail_after(10):
        assert (await read_head(stream)).startswith(b"HTTP/1.1 202")
    await stream.aclose()
    assert (await daemon.ctx.store.read(views.get_schedule, "in-flight"))["status"]


# -- TLS, and a client certificate standing for a user ----------------------------------------


async def test_tls_and_client_certificates(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    d = await start_daemon(
        nursery,
        tmp_path,
        http__listen="127.0.0.1:0",
        http__credentials_file=write_credentials(tmp_path / "users"),
        http__certfile=tmp_path / "server.pem",
        http__keyfile=tmp_path / "server.pem",
        http__client_ca=tmp_path / "ca.pem",
    )
    address = await nursery.start(rest.serve, d.ctx)
    url = f"https://{address}"

    def client_context(common_name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        if common_name is not None:
            issued = ca.issue_cert(f"{common_name}.example", common_name=common_name)
            issued.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
            context.load_cert_chain(str(tmp_path / "client.pem"))
        return context

    # basic auth over TLS, no client certificate (it is optional unless required)
    async with httpx.AsyncClient(
        base_url=url, verify=client_context(None), auth=("reader", PASSWORD)
    ) as c:
        answer = await c.get(BASE)
        assert answer.status_code == 200 and answer.http_version == "HTTP/1.1"
    # HTTP/1.1 even when the client offers HTTP/2 (ALPN)
    async with httpx.AsyncClient(
        base_url=url, verify=client_context(None), auth=("jf9860", PASSWORD), http2=True
    ) as c:
        answer = await c.get(BASE)
        assert answer.status_code == 200 and answer.http_version == "HTTP/1.1"
    # the certificate of a known user is that user, no password needed: reader may read...
    async with httpx.AsyncClient(base_url=url, verify=client_context("certonly")) as c:
        assert (await c.get(BASE)).status_code == 200
        assert (await c.post(f"{BASE}/x", json=request("x", now=EPOCH))).status_code == 403
    # ...and the certificate of someone unknown is nobody
    async with httpx.AsyncClient(base_url=url, verify=client_context("stranger")) as c:
        assert (await c.get(BASE)).status_code == 401
    # plain HTTP to a TLS listener gets nothing
    async with httpx.AsyncClient(base_url=f"http://{address}", auth=("reader", PASSWORD)) as c:
        with pytest.raises(httpx.HTTPError):
            await c.get(BASE)
    d.cancel.cancel()


async def test_metrics_hook_serves_what_it_is_given(served: tuple[Daemon, str]) -> None:
    """`/metrics` is served on this listener by whatever renders the exposition (issue 13);
    without one it is an unknown path."""
    daemon, _ = served
    credentials = Credentials(Path(daemon.ctx.config.http.credentials_file))
    credentials.load()

    async def exposition() -> bytes:
        return b"cmsod_up 1\n"

    app = RestApp(daemon.ctx, credentials, InlineExecutor(), metrics=exposition)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=transport, base_url="http://cmsod", auth=("reader", PASSWORD)
    ) as client:
        answer = await client.get("/metrics")
        assert answer.status_code == 200 and answer.text == "cmsod_up 1\n"
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    async with httpx.AsyncClient(base_url=served[1], auth=("reader", PASSWORD)) as client:
        assert (await client.get("/metrics")).status_code == 404


async def test_a_client_gone_mid_request_leaves_all_or_nothing(
    served: tuple[Daemon, str], http: Rest
) -> None:
    """A client that sends a create and hangs up at once: the listener keeps serving, and the
    schedule is either stored whole or not at all."""
    stream, rest_of_body = await send_partly(served[1], "gone", keep=1)
    await stream.send_all(rest_of_body)
    await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    answer = await http.client.get(f"{BASE}/gone")
    if answer.status_code == 200:
        assert answer.json()["status"] in (S.PENDING_SCHEDULE, S.PENDING_APPROVAL)
        assert len(statuses(answer.json())) == 1
    else:
        assert answer.status_code == 404
    assert (await http.client.get(BASE)).status_code == 200


async def test_a_failing_connection_costs_that_connection_only(
    served: tuple[Daemon, str], http: Rest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hypercorn's HTTP/2 let a KeyError out of a connection (an answer before the body): such
    an escape must cost that connection, never the listener and the daemon with it."""
    real = rest.TCPServer
    failures: list[int] = []

    async def failing_once(*args: Any) -> None:
        if not failures:
            failures.append(1)
            raise KeyError(3)
        await real(*args)

    monkeypatch.setattr(rest, "TCPServer", failing_once)
    async with httpx.AsyncClient(base_url=served[1], auth=("reader", PASSWORD)) as fresh:
        with pytest.raises(httpx.HTTPError):
            await fresh.get(BASE)
        assert (await fresh.get(BASE)).status_code == 200
    assert failures == [1]


async def test_a_failure_inside_is_a_500_and_the_next_request_is_served(
    http: Rest, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(ctx: Any, parameters: Any, more: bool) -> Any:
        raise sqlite3.OperationalError("disk I/O error at /var/lib/cmsod")
        yield  # a paged handler, as api.get is

    monkeypatch.setattr(api, "get", broken)
    answer = await http.client.get(f"{BASE}/any")
    assert answer.status_code == 500
    assert answer.json()["requestError"]["text"] == "OperationalError (in cmsod's log)"
    assert_version_headers(answer)
    monkeypatch.undo()
    assert (await http.client.get(f"{BASE}/any")).status_code == 404


async def test_too_many_rows_for_one_answer_is_a_400_not_a_500(
    http: Rest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schedule's view is one body (400 past MAX_REPLY_ROWS); scheduleDetails is streamed,
    so it answers every row whatever their number."""
    monkeypatch.setattr(api, "MAX_REPLY_ROWS", 2)
    monkeypatch.setattr(api, "STREAM_CHUNK", 2)  # the details in chunks of 2
    body = request("big", ["n1", "n2", "n3"], now=EPOCH)
    assert (await http.create(body)).status_code == 202
    answer = await http.client.get(f"{BASE}/big")
    assert answer.status_code == 400, answer.text
    assert answer.json()["requestError"]["messageId"] == "cmsod.TOOMANYROWS"
    details = await http.client.get(f"{BASE}/scheduleDetails?vnfName=n%25")
    assert details.status_code == 200
    assert [d["vnfName"] for d in details.json()] == ["n1", "n2", "n3"]
    monkeypatch.undo()
    assert (await http.client.get(f"{BASE}/big")).status_code == 200


@pytest.fixture
async def quiet(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Daemon, str]]:
    """A listener in front of a daemon whose optimizer sweeps once an hour: rows stored by
    `create_rows` are never planned during the test (planning 10,000 elements inline blocks
    the loop for seconds, and the tests here only read them)."""
    d = await start_daemon(
        nursery,
        tmp_path,
        http__listen="127.0.0.1:0",
        http__credentials_file=write_credentials(tmp_path / "users"),
        http__request_timeout_s=5,
        optimizer__interval_s=3600,
    )
    address = await nursery.start(rest.serve, d.ctx)
    yield d, f"http://{address}"
    d.cancel.cancel()


@pytest.fixture
async def quiet_http(quiet: tuple[Daemon, str]) -> AsyncIterator[Rest]:
    async with httpx.AsyncClient(base_url=quiet[1], auth=("jf9860", PASSWORD), timeout=30) as c:
        yield Rest(c)


async def create_rows(daemon: Daemon, count: int, per_schedule: int = 10_000) -> list[str]:
    """Schedules of `count` elements in all, stored without waking the optimizer (and not
    over HTTP: these tests' body limit is small); their names in scheduleDetails' order."""
    names: list[str] = []
    for first in range(0, count, per_schedule):
        nodes = [f"e{n:06d}" for n in range(first, min(count, first + per_schedule))]
        body = request(f"rows-{first:06d}", nodes, now=EPOCH, minutes_from_now=600)
        new = validate_request(msgspec.convert(body, ScheduleRequest))
        await daemon.ctx.store.tx(schedules.create_schedule, new)
        names += nodes
    return names


async def test_scheduledetails_streams_every_row_in_one_answer(
    quiet: tuple[Daemon, str], quiet_http: Rest
) -> None:
    """25,000 rows (more than MAX_REPLY_ROWS, many chunks): all there, in order, one JSON
    array, sent without a length (chunked) from one snapshot."""
    names = await create_rows(quiet[0], 25_000)
    async with quiet_http.client.stream(
        "GET", f"{BASE}/scheduleDetails", params={"request.scheduleId": "rows-%"}
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in answer.headers
        assert_version_headers(answer)
        body = await answer.aread()
    rows = json.loads(body)
    assert len(rows) == 25_000 > api.MAX_REPLY_ROWS
    assert [r["vnfName"] for r in rows] == names
    assert rows[-1]["scheduleRequest"]["scheduleId"] == "rows-020000"
    assert quiet[0].ctx.store.streams.borrowed_tokens == 0  # the read is over


async def a_large_answer_begun(daemon: Daemon, url: str) -> trio.SocketStream:
    """A raw connection that asked for a 20 MB scheduleDetails and read only its head."""
    await create_rows(daemon, 40_000)  # 20 MB: far more than the socket buffers hold
    host, port = url.removeprefix("http://").split(":")
    credentials = base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        f"GET {BASE}/scheduleDetails?vnfName=e% HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Basic {credentials}\r\n\r\n".encode()
    )
    head = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    return stream


async def the_store_stream_freed(daemon: Daemon) -> None:
    async def stream_ended() -> bool:
        return daemon.ctx.store.streams.borrowed_tokens == 0

    await wait_until(stream_ended, "the store stream freed", within_s=30)


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    formatter = LogfmtFormatter(journal=False)
    return [formatter.format(r) for r in caplog.records if r.msg == event]


async def still_serves(http: Rest) -> None:
    rows = await http.details(**{"request.scheduleId": "rows-000000"})
    assert rows.status_code == 200 and len(rows.json()) == 10_000


async def test_a_client_gone_mid_stream_leaves_the_daemon_fine(
    quiet: tuple[Daemon, str], quiet_http: Rest, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that reads the start of a large scheduleDetails and hangs up: the read behind
    it ends (its store stream freed), and the listener goes on serving."""
    caplog.set_level(logging.INFO, logger="cmsod")
    daemon, url = quiet
    stream = await a_large_answer_begun(daemon, url)
    await stream.aclose()
    await the_store_stream_freed(daemon)
    (line,) = logged(caplog, "http.client_gone")
    assert "path=/cmso/v1/schedules/scheduleDetails" in line
    await still_serves(quiet_http)


async def test_a_client_that_stops_reading_is_cut_off(
    autojump_clock, quiet: tuple[Daemon, str], quiet_http: Rest, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that reads the head of a large answer and then nothing, connection open: cut
    off once a send waited request_timeout_s (5 s here; hypercorn sends under a shield, so
    without the deadline it held the answer's task and the store stream for ever)."""
    caplog.set_level(logging.INFO, logger="cmsod")
    daemon, url = quiet
    stream = await a_large_answer_begun(daemon, url)
    await the_store_stream_freed(daemon)
    (line,) = logged(caplog, "http.slow_reader")
    assert "timeout_s=5" in line
    await still_serves(quiet_http)
    await stream.aclose()


# -- cmsod's own extensions: stopping a rollout, the global freeze -----------------------------

X = "/cmso/v1/x-cmsod"


async def test_extensions_pause_resume_and_abort_a_rollout(autojump_clock, http: Rest) -> None:
    reader, operator = http.as_user("reader"), http.as_user("operator")
    try:
        await http.create(request("ext", ["n1", "n2"], now=EPOCH, minutes_from_now=20))
        await http.wait_for("ext", S.PENDING_APPROVAL)
        assert (await http.approve("ext", approval())).status_code == 204
        await http.wait_for("ext", S.SCHEDULED)
        # a read-only user may not, and nothing changes
        for action in ("pause", "abort", "resume"):
            refused = await reader.client.post(f"{X}/schedules/ext/{action}", json={"reason": "x"})
            assert refused.status_code == 403, refused.text
            assert refused.json()["requestError"]["variables"] == ["reader", "operate"]
        view = await http.schedule("ext")
        assert view["status"] == S.SCHEDULED and "control" not in view

        paused = await operator.client.post(
            f"{X}/schedules/ext/pause", json={"reason": "odd alarms"}
        )
        assert paused.status_code == 200, paused.text
        assert paused.json() == {"scheduleId": "ext", "status": S.PAUSED}
        assert_version_headers(paused)
        view = await http.schedule("ext")
        assert view["status"] == S.PAUSED
        control = view["control"]
        assert (control["action"], control["by"], control["reason"]) == (
            "pause",
            "operator (http)",  # the authenticated user, whatever a client might claim
            "odd alarms",
        )
        claimed = await operator.client.post(f"{X}/schedules/ext/pause", json={"by": "someone"})
        assert claimed.status_code == 400
        assert claimed.json()["requestError"] == {  # the field named, msgspec's reason once
            "messageId": "Scheduler.INVALID_ATTRIBUTE",
            "text": "Invalid attribute by: not a field of this body",
            "variables": ["by"],
        }

        resumed = await operator.client.post(f"{X}/schedules/ext/resume")  # no body: no reason
        assert resumed.status_code == 200, resumed.text
        answer = resumed.json()  # as over the socket: the status and the view, new plan and all
        assert (answer["scheduleId"], answer["status"]) == ("ext", S.SCHEDULED)
        view = await http.schedule("ext")
        assert answer["schedule"] == view and view["control"]["action"] == "resume"

        aborted = await operator.client.post(
            f"{X}/schedules/ext/abort", json={"reason": "wrong firmware"}
        )
        assert aborted.json() == {  # nothing ran
            "scheduleId": "ext",
            "status": S.CANCELLED,
            "cancelled": len(statuses(await http.schedule("ext"))),
            "running": 0,
        }
        view = await http.schedule("ext")
        assert view["status"] == S.CANCELLED
        for element in statuses(view):
            assert statuses(view)[element] == E.CANCELLED
        messages = {
            e["statusMessage"] for g in view["groups"] for e in g["changeManagementSchedules"]
        }
        assert messages == {"aborted by operator (http): wrong firmware"}

        # CMSO's errors, in its requestError shape
        again = await operator.client.post(f"{X}/schedules/ext/pause")
        assert again.status_code == 412
        assert again.json()["requestError"]["messageId"] == "Scheduler.NOT_RUNNING"
        missing = await operator.client.post(f"{X}/schedules/nope/abort")
        assert missing.status_code == 404
        long = await operator.client.post(f"{X}/schedules/ext/pause", json={"reason": "r" * 1001})
        assert long.status_code == 400
        assert long.json()["requestError"]["variables"] == ["reason"]
        assert long.json()["requestError"]["text"] == (
            "Invalid attribute reason: Expected `str` of length <= 1000"
        )
        bad = await operator.client.post(f"{X}/schedules/ext/pause", content=b"[1]")
        assert bad.json()["requestError"]["text"] == (
            "Invalid attribute body: Expected `object`, got `array`"
        )
        assert (await operator.client.get(f"{X}/schedules/ext/pause")).status_code == 405
        assert (await operator.client.post(f"{X}/schedules/ext/halt")).status_code == 404
    finally:
        await reader.client.aclose()
        await operator.client.aclose()


async def test_extensions_freeze_on_status_and_off(autojump_clock, http: Rest) -> None:
    reader, operator = http.as_user("reader"), http.as_user("operator")
    try:
        assert (await reader.client.get(f"{X}/freeze")).json() == {"freeze": None}
        queried = await reader.client.get(f"{X}/freeze", params={"on": "1"})
        assert queried.json()["requestError"]["text"] == (
            "Undefined filter attribute on: this takes no filter"
        )
        refused = await reader.client.put(f"{X}/freeze", json={"reason": "no"})
        assert refused.status_code == 403
        assert (await reader.client.get(f"{X}/freeze")).json() == {"freeze": None}

        past = await operator.client.put(f"{X}/freeze", json={"until": "2026-12-01T07:00:00Z"})
        assert past.status_code == 400
        assert past.json()["requestError"]["variables"][0] == "until"
        zoneless = await operator.client.put(f"{X}/freeze", json={"until": "2026-12-02T08:00:00"})
        assert zoneless.status_code == 400
        assert zoneless.json()["requestError"]["text"].endswith(
            ": no time zone: add Z for UTC, or an offset such as +01:00"
        )
        on = await operator.client.put(
            f"{X}/freeze", json={"reason": "incident 42", "until": "2026-12-02T08:00:00Z"}
        )
        assert on.status_code == 200, on.text
        frozen = on.json()["freeze"]
        assert frozen["status"] == "Frozen" and frozen["by"] == "operator (http)"
        assert (frozen["reason"], frozen["until"]) == ("incident 42", "2026-12-02T08:00:00Z")
        assert (await reader.client.get(f"{X}/freeze")).json() == {"freeze": frozen}
        health = await reader.client.get("/cmso/v1/health")
        assert health.json()["freeze"] == frozen

        assert (await reader.client.delete(f"{X}/freeze")).status_code == 403
        assert (await reader.client.get(f"{X}/freeze")).json() == {"freeze": frozen}
        off = await operator.client.request("DELETE", f"{X}/freeze", json={"reason": "resolved"})
        assert off.status_code == 200, off.text
        assert off.json() == {"freeze": None}
        assert (await reader.client.get(f"{X}/freeze")).json() == {"freeze": None}
        assert (await operator.client.post(f"{X}/freeze")).status_code == 405
    finally:
        await reader.client.aclose()
        await operator.client.aclose()


async def test_every_documented_operation_is_routed(http: Rest) -> None:
    """docs/openapi.json and the routes agree: no documented path or method is unknown to
    the listener, and cmsod's own are tagged as its extensions."""
    document = (await http.client.get("/cmso/openapi.json")).json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            answer = await http.client.request(method.upper(), path.format(scheduleId="x"))
            assert answer.status_code != 405, (method, path)
            if answer.status_code == 404 and answer.headers["content-type"] == "application/json":
                assert answer.json()["requestError"]["messageId"] != "cmsod.NOT_FOUND", path
            assert operation["tags"] == (
                ["cmsod extensions"] if "/x-cmsod/" in path else ["CMSO"]
            ), path


async def test_view_cache_reads_once_per_commit_and_shares_a_read() -> None:
    cache = ViewCache(entries=2)
    version = [0]

    async def current() -> int:
        return version[0]

    reads: list[str] = []
    gate = trio.Event()

    def reader(key: str, fail: bool = False) -> Any:
        async def read() -> bytes:
            reads.append(key)
            await gate.wait()
            if fail:
                raise KeyError(key)
            return f"{key}@{version[0]}".encode()

        return read

    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):  # five clients at once: one read
            nursery.start_soon(lambda: _append(got, cache.get("a", current, reader("a"))))
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert got == [b"a@0"] * 5 and reads == ["a"]
    assert await cache.get("a", current, reader("a")) == b"a@0"  # kept
    version[0] = 1  # a commit: read again
    assert await cache.get("a", current, reader("a")) == b"a@1"
    assert reads == ["a", "a"]
    with pytest.raises(KeyError):  # a failure is not kept
        await cache.get("gone", current, reader("gone", fail=True))
    assert "gone" not in cache.entries and not cache.reading
    for key in ("b", "c"):  # two entries at most: the oldest goes
        await cache.get(key, current, reader(key))
    assert list(cache.entries) == ["b", "c"]


async def _append(into: list[bytes], value: Any) -> None:
    into.append(await value)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_view_kept_on_one_daemon_is_not_served_after_a_commit_on_another(
    backend: str, autojump_clock, nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a GET on daemon b after a commit on daemon a reads again; while nothing
    commits, b serves what it keeps."""
    a = await start_daemon(nursery, tmp_path / "a")
    b = await start_daemon(
        nursery,
        tmp_path / "b",
        http__listen="127.0.0.1:0",
        http__credentials_file=write_credentials(tmp_path / "users"),
    )
    address = await nursery.start(rest.serve, b.ctx)
    reads: list[str] = []
    get_schedule = usecases.get_schedule

    async def counted(ctx: Any, schedule_id: str, limit: int) -> dict[str, Any]:
        reads.append(schedule_id)
        return await get_schedule(ctx, schedule_id, limit)

    monkeypatch.setattr(usecases, "get_schedule", counted)
    on_a = await a.connect()
    await on_a.ok("io.cmsod.Schedules.Create", schedule=request("both", now=EPOCH))
    await on_a.wait_for("both", S.PENDING_APPROVAL)
    async with httpx.AsyncClient(
        base_url=f"http://{address}", auth=("jf9860", PASSWORD), timeout=30
    ) as client:
        http = Rest(client)
        assert (await http.schedule("both"))["status"] == S.PENDING_APPROVAL
        kept = False
        for _ in range(50):  # (other sessions of the server may commit meanwhile)
            before = len(reads)
            await http.schedule("both")
            await http.schedule("both")
            if len(reads) - before <= 1:
                kept = True
                break
        assert kept, "b never served a view it kept"
        await on_a.ok("io.cmsod.Schedules.Approve", scheduleId="both", approval=approval())
        assert (await http.schedule("both"))["status"] != S.PENDING_APPROVAL
    await on_a.aclose()
    a.cancel.cancel()
    b.cancel.cancel()


def strict(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.0 schema of `document` as a JSON Schema that refuses what it does not
    describe: $refs resolved, `nullable` as null allowed, an object's properties all it has."""
    if "$ref" in schema:
        return strict(document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], document)
    out = {k: v for k, v in schema.items() if k not in ("nullable", "description")}
    if "properties" in out:
        out["properties"] = {k: strict(v, document) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"], document)
    if "items" in out:
        out["items"] = strict(out["items"], document)
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") else out


@pytest.mark.usefixtures("backend")  # SQLite and PostgreSQL (where it lists the daemons)
async def test_the_health_answer_is_all_in_the_document(
    autojump_clock, nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """Every field of the health report (REST /health, `cmsoctl status`) is described by the
    OpenAPI document's Health schema, with a freeze on, a calendar period ahead, an alarm gate
    and, on PostgreSQL, the daemons sharing the store."""
    so = FakeSO()
    await nursery.start(so.serve)
    calendar = tmp_path / "freeze.toml"
    calendar.write_text(
        '[[deny]]\nname = "xmas"\nfrom = "2026-12-24T00:00"\nto = "2026-12-26T00:00"\n'
        'reason = "holidays"\n'
    )
    path = write_config(tmp_path, so, calendar)
    path.write_text(path.read_text() + '[alarms]\nurl = "http://127.0.0.1:9/"\n')
    d = await daemon_from_file(nursery, path)
    client = await d.connect()
    await client.ok("io.cmsod.Manager.Freeze", on=True, reason="r", until="2026-12-02T00:00:00Z")
    report = await client.ok("io.cmsod.Manager.Status")
    assert report["freeze"] and report["calendars"] and report["alarms"]
    assert bool(report["daemons"]) == (backend == "postgres")
    document = json.loads(Path(rest.__file__).with_name("openapi.json").read_text())
    jsonschema.validate(report, strict({"$ref": "#/components/schemas/Health"}, document))
    await client.aclose()
    d.cancel.cancel()
