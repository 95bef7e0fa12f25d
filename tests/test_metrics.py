"""Metrics: the values after known rollouts (in-process under MockClock, and the real daemon
scraped over HTTP with httpx), and the /metrics listener's edges (framing, limits, timeouts)."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h11
import httpx
import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cmsod import config
from cmsod.config import MetricsConfig
from cmsod.control import metrics as http_metrics
from cmsod.errors import ConfigError
from cmsod.metrics import GATES, Metrics, Snapshot, cause
from tests.cmso_requests import approval, iso, request
from tests.conftest import EPOCH, Daemon, start_daemon, wait_until
from tests.fake_http import Drop, FakeSO, Reply
from tests.procs import Daemon as Process
from tests.procs import cmsoctl

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, default: float | None = None, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    if default is not None:
        return samples.get(key, default)
    assert key in samples, f"no {name}{labels} in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def transitions(samples: Samples, kind: str) -> dict[str, float]:
    name = f"cmsod_{kind}_transitions_total"
    return {dict(labels)["status"]: v for (n, labels), v in samples.items() if n == name}


# -- the instruments ------------------------------------------------------------------------


def test_a_cause_is_the_error_class_in_snake_case() -> None:
    from cmsod.errors import NotDelivered, PeerError, Unconfirmed
    from cmsod.peers.sinks import PartialDelivery

    assert cause(NotDelivered("x")) == "not_delivered"
    assert cause(Unconfirmed("x")) == "unconfirmed"
    assert cause(PeerError("x")) == "peer_error"
    assert cause(PartialDelivery(1, "x")) == "partial_delivery"


def test_the_gates_come_from_each_scrape_and_start_at_zero() -> None:
    m = Metrics()
    samples = parse(m.exposition(Snapshot()).decode())
    for gate in GATES:
        assert value(samples, "cmsod_elements_held", gate=gate) == 0
        assert value(samples, "cmsod_gate_on", gate=gate) == 0
    m.exposition(Snapshot(held={"ticket": 3, "stop": 12}, gates_on={"freeze": True}))
    # the next scrape replaces the last one: a gate that holds nothing any more reads 0
    samples = parse(m.exposition(Snapshot(held={"stop": 7}, gates_on={"freeze": True})).decode())
    assert value(samples, "cmsod_elements_held", gate="stop") == 7
    assert value(samples, "cmsod_elements_held", gate="ticket") == 0
    assert value(samples, "cmsod_gate_on", gate="freeze") == 1
    assert value(samples, "cmsod_gate_on", gate="stop") == 0


def test_a_peer_call_is_timed_and_its_error_counted_by_cause() -> None:
    from cmsod.errors import Unconfirmed

    m = Metrics()
    with m.call("so", "dispatch"):
        pass
    with pytest.raises(Unconfirmed), m.call("so", "dispatch"):
        raise Unconfirmed("no answer")
    samples = parse(m.exposition(Snapshot()).decode())
    assert (
        value(samples, "cmsod_peer_call_duration_seconds_count", peer="so", operation="dispatch")
        == 2
    )
    assert (
        value(
            samples,
            "cmsod_peer_call_errors_total",
            peer="so",
            operation="dispatch",
            cause="unconfirmed",
        )
        == 1
    )


async def test_a_cancelled_peer_call_is_neither_timed_nor_counted(autojump_clock) -> None:
    m = Metrics()
    with trio.move_on_after(1):
        with m.call("so", "dispatch"):
            await trio.sleep(5)
    samples = parse(m.exposition(Snapshot()).decode())
    assert not [k for k in samples if k[0].startswith("cmsod_peer_call")]


# -- the configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen,address",
    [("", None), ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0))],
)
def test_the_listen_address(listen: str, address: tuple[str, int] | None) -> None:
    assert MetricsConfig(listen=listen).address == address


@pytest.mark.parametrize("listen", ["9464", "localhost", "host:99999", "a b:1", "::1:9464"])
def test_a_bad_listen_address_names_the_key(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics"):
        config.load(None, env={"CMSOD_METRICS__LISTEN": listen})


def test_a_reload_refuses_a_new_listen_address(tmp_path: Path) -> None:
    from cmsod import daemon
    from cmsod.clock import WallClock
    from cmsod.executor import InlineExecutor

    path = tmp_path / "cmsod.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    ctx = daemon.build_context(config.load(path), WallClock(), InlineExecutor())
    reload = daemon.make_reload(ctx, path, None)
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[metrics]\nlisten = "127.0.0.1:9464"\n')
    with pytest.raises(ConfigError, match="metrics.listen cannot change without a restart"):
        reload()
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[metrics]\ntimeout_s = 3.0\n')
    assert reload() == ["metrics.timeout_s"]


# -- a known rollout, in process ------------------------------------------------------------


async def test_a_rollout_resumed_late_counts_its_transitions_and_lateness(
    autojump_clock, nursery, tmp_path
) -> None:
    d = await start_daemon(nursery, tmp_path, so__simulated_duration_s=30)
    began = trio.current_time()  # = EPOCH on the daemon's wall clock
    client = await d.connect()
    nodes = ["m1", "m2", "m3"]
    body = request("late", nodes, now=EPOCH, minutes_from_now=1, normal=60, concurrency=3)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    await client.wait_for("late", "Pending Approval")
    # approved in time, then paused before its slot (an approval after the slot began is
    # refused: the plan it approves has passed)
    await client.ok("io.cmsod.Schedules.Approve", scheduleId="late", approval=approval())
    await client.ok("io.cmsod.Schedules.Pause", scheduleId="late")
    await client.aclose()
    # the window opened a minute ago (and a half second more: lateness must not sit on the
    # 60 s bucket boundary, whatever virtual time the resume takes)
    await trio.sleep_until(trio.current_time() + 120.5)
    client = await d.connect()
    late_s = trio.current_time() - began - 60  # planned at the window's start, EPOCH + 60 s
    await client.ok("io.cmsod.Schedules.Resume", scheduleId="late")  # within the grace
    await client.wait_for("late", "Completed")

    async def published() -> bool:
        samples = parse((await client.ok("io.cmsod.Manager.Metrics"))["text"])
        return value(samples, "cmsod_outbox_depth", outbox="events") == 0

    await wait_until(published, "every event published")
    samples = parse((await client.ok("io.cmsod.Manager.Metrics"))["text"])

    assert transitions(samples, "element") == {
        "Pending Schedule": 3,
        "Pending Approval": 3,
        "Scheduled": 3,
        "Triggered": 3,
        "Completed": 3,
    }
    assert transitions(samples, "schedule") == {
        "Pending Schedule": 1,
        "Optimization In Progress": 1,
        "Pending Approval": 1,
        "Accepted": 1,
        "Scheduled": 2,
        "Paused": 1,
        "Notifications Initiated": 1,
        "Completed": 1,
    }
    assert value(samples, "cmsod_schedules", status="Completed") == 1
    # all three dispatched at once when resumed, a minute after their planned start
    assert 60 < late_s < 120
    assert value(samples, "cmsod_dispatch_lateness_seconds_count") == 3
    assert value(samples, "cmsod_dispatch_lateness_seconds_sum") == pytest.approx(3 * late_s)
    assert value(samples, "cmsod_dispatch_lateness_seconds_bucket", le="60.0") == 0
    assert value(samples, "cmsod_dispatch_lateness_seconds_bucket", le="120.0") == 3
    assert value(samples, "cmsod_optimizer_solve_seconds_count") == 1
    assert (
        value(samples, "cmsod_peer_call_duration_seconds_count", peer="so", operation="dispatch")
        == 3
    )
    assert (
        value(samples, "cmsod_peer_call_duration_seconds_count", peer="so", operation="status") >= 1
    )
    assert (
        value(samples, "cmsod_peer_call_duration_seconds_count", peer="sink", operation="publish")
        >= 1
    )
    assert not [k for k in samples if k[0] == "cmsod_peer_call_errors_total"]
    assert value(samples, "cmsod_outbox_depth", outbox="tickets") == 0
    assert value(samples, "cmsod_outbox_oldest_age_seconds", outbox="events") == 0
    for actor in ("emitter", "tickets", "poller", "dispatcher", "optimizer"):
        assert value(samples, "cmsod_actor_restarts_total", actor=actor) == 0
    await client.aclose()


async def test_the_outbox_age_is_the_oldest_unsent_event(autojump_clock, nursery, tmp_path) -> None:
    """A sink that refuses everything: the events wait, and their age grows with the clock."""
    d = await start_daemon(
        nursery, tmp_path, events__sink="http", events__url="http://127.0.0.1:9/events"
    )
    client = await d.connect()
    body = request("held", ["h1"], now=EPOCH, minutes_from_now=10)
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    await client.wait_for("held", "Pending Approval")
    await client.aclose()
    await trio.sleep_until(trio.current_time() + 600)
    client = await d.connect()
    samples = parse((await client.ok("io.cmsod.Manager.Metrics"))["text"])
    assert value(samples, "cmsod_outbox_depth", outbox="events") >= 2
    assert value(samples, "cmsod_outbox_oldest_age_seconds", outbox="events") >= 600
    assert (
        value(
            samples,
            "cmsod_peer_call_errors_total",
            peer="sink",
            operation="publish",
            cause="not_delivered",
            default=0,
        )
        + value(
            samples,
            "cmsod_peer_call_errors_total",
            peer="sink",
            operation="publish",
            cause="peer_error",
            default=0,
        )
        >= 1
    )
    await client.aclose()


# -- the listener's edges ---------------------------------------------------------------------


async def listen(d: Daemon, nursery: trio.Nursery, **settings: float) -> tuple[str, int]:
    """Start the /metrics listener of an in-process daemon on an ephemeral port."""
    d.ctx.config = msgspec.structs.replace(
        d.ctx.config, metrics=MetricsConfig(listen="127.0.0.1:0", **settings)
    )
    (address,) = await nursery.start(http_metrics.serve, d.ctx)
    host, _, port = address.rpartition(":")
    return host, int(port)


class RawClient:
    """An HTTP/1.1 client framed by h11 on a plain trio TCP stream, to send what httpx won't."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, target: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
        request = h11.Request(method=method, target=target, headers=[("Host", "x")])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status, headers, body
            else:
                raise AssertionError(f"unexpected {event!r}")


async def closed_by_server(stream: trio.SocketStream) -> bool:
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass
    return True


async def test_a_listen_address_in_use_says_which_key(nursery, tmp_path) -> None:
    d = await start_daemon(nursery, tmp_path)
    host, port = await listen(d, nursery)
    d.ctx.config = msgspec.structs.replace(
        d.ctx.config, metrics=MetricsConfig(listen=f"{host}:{port}")
    )
    with pytest.raises(
        ConfigError, match=rf"metrics.listen = '127.0.0.1:{port}': Address already in use"
    ):
        await http_metrics.serve(d.ctx)


async def test_the_listener_answers_get_head_keeps_alive_and_refuses_the_rest(
    autojump_clock, nursery, tmp_path
) -> None:
    d = await start_daemon(nursery, tmp_path)
    host, port = await listen(d, nursery)
    client = RawClient(await trio.open_tcp_stream(host, port))
    status, headers, body = await client.get("/metrics")
    assert status == 200
    assert headers[b"content-type"] == b"text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE cmsod_schedules gauge" in body
    # the same connection again (Prometheus keeps it alive), with a query string
    status, headers, head_body = await client.get("/metrics?x=1", method="HEAD")
    assert (status, head_body) == (200, b"")
    assert int(headers[b"content-length"]) > 0
    assert (await client.get("/"))[0] == 404
    status, headers, _ = await client.get("/metrics", method="DELETE")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")
    await client.stream.aclose()

    garbage = await trio.open_tcp_stream(host, port)
    await garbage.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    reply = b""
    while chunk := await garbage.receive_some(65536):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")
    await garbage.aclose()


async def test_a_slow_scraper_is_cut_off_and_connections_are_bounded(
    autojump_clock, nursery, tmp_path
) -> None:
    d = await start_daemon(nursery, tmp_path)
    host, port = await listen(d, nursery, max_connections=2, timeout_s=5)
    began = trio.current_time()
    slow = [await trio.open_tcp_stream(host, port) for _ in range(2)]
    for stream in slow:
        await stream.send_all(b"GET /metr")  # and nothing more
    # Both slots taken: a third is closed at once (before the timeout), unanswered.
    third = await trio.open_tcp_stream(host, port)
    assert await closed_by_server(third)
    assert trio.current_time() - began < 5
    for stream in slow:  # each cut off at its timeout, not before
        assert await closed_by_server(stream)
    assert 5 <= trio.current_time() - began < 6
    # Slots free again: a scrape works.
    client = RawClient(await trio.open_tcp_stream(host, port))
    assert (await client.get("/metrics"))[0] == 200
    await client.stream.aclose()


async def test_a_cancelled_scrape_never_reuses_its_connection(
    autojump_clock, nursery, tmp_path
) -> None:
    """A scraper that stops reading mid-answer: the server gives up at its timeout and closes
    that connection; the next scrape, on a new one, is whole."""
    d = await start_daemon(nursery, tmp_path)
    host, port = await listen(d, nursery, timeout_s=2)
    stream = await trio.open_tcp_stream(host, port)
    began = trio.current_time()
    try:  # pipelined requests, never read: the answers fill the socket buffers both ways
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20000)
    except trio.BrokenResourceError:
        pass  # the server gave up on us while we were still sending
    assert await closed_by_server(stream)
    assert 2 <= trio.current_time() - began < 10
    client = RawClient(await trio.open_tcp_stream(host, port))
    status, _, body = await client.get("/metrics")
    assert status == 200 and parse(body.decode())
    await client.stream.aclose()


# -- the real daemon, scraped over HTTP -------------------------------------------------------


def metrics_url(daemon: Process) -> str:
    """Where the daemon says its listener is (it was asked for port 0)."""
    (line,) = daemon.wait_log(r"event=metrics\.listening")
    address = re.search(r"address=(\S+)", line)
    assert address is not None
    return f"http://{address.group(1)}/metrics"


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def test_the_real_daemon_serves_metrics_that_survive_a_restart(tmp_path: Path) -> None:
    so = FakeSO()
    so.dispatch_faults = {2: Reply(500, {"error": "boom"}), 3: Drop()}
    stop_so = so.in_thread()
    env = {
        "CMSOD_SO__MODE": "http",
        "CMSOD_SO__URL": so.url,
        "CMSOD_METRICS__LISTEN": "127.0.0.1:0",
    }
    try:
        daemon = Process(tmp_path, extra_env=env)
        url = metrics_url(daemon)
        nodes = [f"r{i}" for i in range(5)]
        now = datetime.now(UTC)
        body = request("real", nodes, now=now, minutes_from_now=None)
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        daemon.wait_log(r"event=schedule\.finished schedule_id=real")
        planned = request("planned", ["p1"], now=now, minutes_from_now=0, normal=1)
        planned["schedulingInfo"]["vnfDetails"][0]["changeWindow"][0]["startTime"] = iso(
            now + timedelta(seconds=2)
        )
        assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(planned))[0] == 0
        daemon.wait_log(r"event=schedule\.optimized schedule_id=planned")
        assert cmsoctl(tmp_path, "approve", "planned")[0] == 0
        daemon.wait_log(r"event=schedule\.finished schedule_id=planned")

        deadline = time.monotonic() + 30
        while value(samples := scrape(url), "cmsod_outbox_depth", outbox="events") > 0:
            assert time.monotonic() < deadline, "events never published"
            time.sleep(0.05)  # between looks at the condition

        elements = transitions(samples, "element")
        assert elements["Scheduled Immediate"] == 5
        assert elements["Triggered"] == 4  # three of `real`, and `planned`'s one
        assert elements["Scheduling Failed"] == 2  # the 500 and the unanswered dispatch
        assert elements["Completed"] == 4
        assert transitions(samples, "schedule")["Completed with error(s)"] == 1
        assert value(samples, "cmsod_schedules", status="Completed with error(s)") == 1
        assert value(samples, "cmsod_schedules", status="Completed") == 1
        so_dispatch = {"peer": "so", "operation": "dispatch"}
        assert value(samples, "cmsod_peer_call_duration_seconds_count", **so_dispatch) == 6
        assert (
            value(samples, "cmsod_peer_call_errors_total", **so_dispatch, cause="peer_error") == 1
        )
        assert (
            value(samples, "cmsod_peer_call_errors_total", **so_dispatch, cause="unconfirmed") == 1
        )
        assert value(samples, "cmsod_dispatch_lateness_seconds_count") == 6
        assert value(samples, "cmsod_optimizer_solve_seconds_count") == 1
        assert value(samples, "cmsod_outbox_oldest_age_seconds", outbox="events") == 0

        code, text = cmsoctl(tmp_path, "metrics")
        assert code == 0
        assert value(parse(text), "cmsod_schedules", status="Completed") == 1

        assert daemon.stop() == 0
        daemon = Process(tmp_path, extra_env=env)
        url = metrics_url(daemon)
        samples = scrape(url)
        # read from the store: right after a restart; counted: from zero again
        assert value(samples, "cmsod_schedules", status="Completed with error(s)") == 1
        assert value(samples, "cmsod_schedules", status="Completed") == 1
        assert transitions(samples, "element") == {}
        assert daemon.stop() == 0
    finally:
        stop_so()
