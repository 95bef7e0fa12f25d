"""CM events to Kafka through the Kafka REST Proxy API v2 (Confluent's REST Proxy, Strimzi's
Kafka Bridge), against a fake proxy on loopback that checks the content type, the Accept
header and every record, puts records in partitions by their key and fails in every way the
proxies fail: a whole request refused or 500, a record not taken mid-batch (its partition
down), a garbage answer, a slow one. The real daemon, killed with SIGKILL while a batch is
on the wire, is at the end."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import msgspec
import pytest
import trio

from cmsod import config
from cmsod.errors import ConfigError, PeerError
from cmsod.model import ScheduleStatus as S
from cmsod.peers import tls
from cmsod.peers.sinks import CloudEventsSink, KafkaSink, MrSink, PartialDelivery
from tests.cmso_requests import request
from tests.conftest import EPOCH, start_daemon, validate_event, wait_until
from tests.fake_http import Drop, FakeHTTP, FakeKafkaProxy, Raw, RecordErrors, Reply, Reset, Written
from tests.procs import Daemon, cmsoctl
from tests.test_events import in_order_and_complete, outbox_empty, pile_up, run_schedules


def stored_events(state_dir: Path) -> list[dict]:
    with sqlite3.connect(state_dir / "cmsod.sqlite3") as db:
        return [json.loads(b) for (b,) in db.execute("SELECT body FROM events ORDER BY seq")]


def check_delivery(proxy: FakeKafkaProxy, state_dir: Path) -> dict[str, list[int]]:
    """Every stored event written, each schedule in one partition and in order there (first
    occurrences: duplicates are allowed, delivery is at least once); the per-schedule
    sequences."""
    assert not proxy.refused
    assert all(len(parts) == 1 for parts in proxy.partitions_of_keys().values())
    written = proxy.events()
    per_schedule = in_order_and_complete(written)
    stored = stored_events(state_dir)
    assert {e["eventId"] for e in written} == {e["eventId"] for e in stored}  # nothing lost
    return per_schedule


async def kafka_daemon(nursery, tmp_path, proxy: FakeKafkaProxy, **overrides):
    await nursery.start(proxy.serve)
    return await start_daemon(
        nursery, tmp_path, events__sink="kafka", events__url=proxy.url, **overrides
    )


async def test_records_keyed_by_schedule_land_in_one_partition_each_in_order(
    autojump_clock, nursery, tmp_path
) -> None:
    proxy = FakeKafkaProxy(validate=validate_event)
    cmsod = await kafka_daemon(nursery, tmp_path, proxy, events__batch_size=4)
    await run_schedules(cmsod, ["k1", "k2", "k3", "k4", "k5"])
    per_schedule = check_delivery(proxy, tmp_path)
    assert set(per_schedule) == {"k1", "k2", "k3", "k4", "k5"}
    ids = [e["eventId"] for e in proxy.events()]
    assert len(ids) == len(set(ids))  # nothing failed: nothing twice
    assert len({proxy.partition_of(k) for k in per_schedule}) > 1  # spread over partitions
    first = proxy.requests[0]
    assert first.path == "/topics/cm-events"
    assert first.headers["content-type"] == "application/vnd.kafka.json.v2+json"
    value = first.json()["records"][0]["value"]  # the envelope, as the file sink writes it
    assert list(value) == [
        "eventId",
        "eventCorrelationId",
        "eventTime",
        "eventSource",
        "eventType",
        "eventSchema",
        "eventSchemaVersion",
        "event",
    ]


@pytest.mark.parametrize("strimzi", [False, True], ids=["confluent", "strimzi"])
async def test_a_record_not_taken_mid_batch_resumes_there_after_a_500(
    autojump_clock, nursery, tmp_path, strimzi
) -> None:
    proxy = FakeKafkaProxy(validate=validate_event, strimzi=strimzi)
    proxy.faults = [Reset()] * 1000  # down while 12 schedules make 36 events
    cmsod = await kafka_daemon(nursery, tmp_path, proxy, events__batch_size=10)
    ids = [f"m{i:02}" for i in range(12)]
    await pile_up(cmsod, ids)
    outbox = [e["eventId"] for e in stored_events(tmp_path)]
    proxy.requests.clear()
    code = 500 if strimzi else 50003
    proxy.faults = [
        Reply(500, {"error_code": 50002, "message": "Kafka error: broker down"}),
        RecordErrors(first=4, code=code),  # record 5's partition down from there
        RecordErrors(first=2, code=code, all_after=True),  # the producer failed whole
    ]
    await outbox_empty(cmsod)
    posts = proxy.posts
    # the 500 wrote nothing; then 10 sent, 4 taken (and the other partitions' records after
    # it, which the next POST sends again); then from event 5: 2 taken; then from event 7 on
    assert posts[0] == outbox[:10]
    assert posts[1] == outbox[4:14]
    assert posts[2] == outbox[6:16]
    assert [p[0] for p in posts[3:]] == outbox[16::10]
    per_schedule = check_delivery(proxy, tmp_path)
    assert set(per_schedule) == set(ids)
    status = await (await cmsod.connect()).ok("io.cmsod.Manager.Status")
    assert "record 3 of 10 not taken (error_code" in status["actors"]["emitter"]["lastError"]


async def test_garbage_slow_and_dropped_answers_send_the_batch_again(
    autojump_clock, nursery, tmp_path
) -> None:
    proxy = FakeKafkaProxy(validate=validate_event)
    proxy.faults = [
        Written(Reply(200, b"<html>proxy error</html>")),  # taken, but who knows
        Written(Reply(200, {"offsets": [{"partition": -1, "offset": 0}]})),  # out of range
        Written(Reply(200, {"offsets": [{"partition": 0, "offset": 1}] * 99})),  # too many
        Written(Reply(200, {"offsets": []}, delay_s=30)),  # slower than timeout_s
        Written(Drop()),  # the connection closes without an answer
        Raw(b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{"off', close=True),
    ]
    cmsod = await kafka_daemon(nursery, tmp_path, proxy, events__timeout_s=5)
    await run_schedules(cmsod, ["g1", "g2"])
    check_delivery(proxy, tmp_path)
    ids = [e["eventId"] for e in proxy.events()]
    assert len(ids) > len(set(ids))  # the unconfirmed batches came again: at least once
    assert cmsod.ctx.figures["emitter"].errors >= 6


async def test_a_missing_topic_is_an_error_retried_at_the_slowest_pace_until_it_exists(
    autojump_clock, nursery, tmp_path, caplog
) -> None:
    import logging

    proxy = FakeKafkaProxy()
    proxy.faults = [Reply(404, {"error_code": 40401, "message": "Topic not found."})] * 3
    caplog.set_level(logging.ERROR, logger="cmsod")
    logging.getLogger("cmsod").propagate = True
    try:
        # a day to approve: it must not expire (one more event) while the topic is missing
        cmsod = await kafka_daemon(
            nursery, tmp_path, proxy, events__retry_max_s=20, optimizer__approval_timeout_s=86400
        )
        client = await cmsod.connect()
        await client.ok("io.cmsod.Schedules.Create", schedule=request("nt", now=EPOCH))
        await outbox_empty(cmsod)
    finally:
        logging.getLogger("cmsod").propagate = False
    refused = [r for r in caplog.records if getattr(r, "event", "") == "events.sink_refused"]
    assert refused  # (3 refusals: the 4 requests below; the log may be captured twice)
    assert "HTTP 404 (error_code 40401) Topic not found." in refused[0].fields["reason"]
    assert len(proxy.requests) == 4
    assert not proxy.refused
    check_delivery(proxy, tmp_path)


async def test_the_retry_pace_of_a_refusal_is_the_cap_and_of_a_500_the_backoff(
    autojump_clock, nursery, tmp_path
) -> None:
    proxy = FakeKafkaProxy()
    taken_at: list[float] = []

    def timed(req):
        taken_at.append(trio.current_time())
        return FakeKafkaProxy.handle(proxy, req)

    proxy.handler = timed
    proxy.faults = [
        Reply(403, {"error_code": 40301, "message": "Not authorized to access topics"}),
        Reply(403, {"error_code": 40301, "message": "Not authorized to access topics"}),
        Reply(503, {"error_code": 50302, "message": "Broker not available"}),
        Reply(503, {"error_code": 50302, "message": "Broker not available"}),
    ]
    cmsod = await kafka_daemon(nursery, tmp_path, proxy, events__retry_max_s=30)
    client = await cmsod.connect()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("pace", now=EPOCH))
    await outbox_empty(cmsod)
    gaps = [round(b - a, 1) for a, b in zip(taken_at, taken_at[1:], strict=False)]
    assert gaps[:2] == [30.0, 30.0]  # refused: the cap at once
    assert 0.4 <= gaps[2] <= 1.1 and gaps[3] <= 2.2  # unavailable: the usual backoff
    check_delivery(proxy, tmp_path)


async def test_the_credentials_file_is_sent_and_the_url_shown_without_them(
    autojump_clock, nursery, tmp_path
) -> None:
    secret = tmp_path / "kafka.secret"
    secret.write_text("cmsod:s3cr3t:x\n")
    proxy = FakeKafkaProxy()
    proxy.faults = [Reply(403, {"error_code": 40301, "message": "Not authorized"})]
    cmsod = await kafka_daemon(nursery, tmp_path, proxy, events__credentials_file=str(secret))
    client = await cmsod.connect()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("auth", now=EPOCH))
    await outbox_empty(cmsod)
    assert proxy.requests[0].headers["authorization"] == "Basic Y21zb2Q6czNjcjN0Ong="
    assert cmsod.ctx.figures["emitter"].last_error.startswith(f"kafka rest proxy at {proxy.url}")
    check_delivery(proxy, tmp_path)


async def test_a_topic_refused_for_good_holds_only_its_own_events(
    autojump_clock, nursery, tmp_path
) -> None:
    """events.route_by: the proxy has no topic cm-events-east (yet); the events of the other
    topic keep going meanwhile, and east's follow, in order, once it exists."""
    proxy = FakeKafkaProxy(validate=validate_event)
    missing = {"/topics/cm-events-east"}

    def handle(req):
        if req.path in missing:
            return Reply(404, {"error_code": 40401, "message": "Topic not found."})
        return FakeKafkaProxy.handle(proxy, req)

    proxy.handler = handle
    cmsod = await kafka_daemon(
        nursery, tmp_path, proxy, events__route_by="targetGroup", events__retry_max_s=3600
    )
    client = await cmsod.connect()
    body = request("east", now=EPOCH, extra_domain_data={"targetGroup": "east"})
    await client.ok("io.cmsod.Schedules.Create", schedule=body)  # first: its batch goes first
    await client.wait_for("east", S.PENDING_APPROVAL)
    began = trio.current_time()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("plain", now=EPOCH))
    await client.wait_for("plain", S.PENDING_APPROVAL)

    async def plain_out() -> bool:
        ids = {e["eventId"] for e in stored_events(tmp_path) if e["eventCorrelationId"] == "plain"}
        return ids == {e["eventId"] for e in proxy.events("cm-events")}

    await wait_until(plain_out, "the other topic's events published", within_s=60)
    assert trio.current_time() - began < 60 and not proxy.events("cm-events-east")
    status = await client.ok("io.cmsod.Manager.Status")
    assert status["counts"]["eventsPending"] > 0
    missing.clear()  # the topic is created: east's events go at the next try
    await outbox_empty(cmsod)
    assert {e["eventCorrelationId"] for e in proxy.events("cm-events-east")} == {"east"}
    in_order_and_complete(proxy.events("cm-events-east"))


async def test_a_huge_answer_is_not_read_whole_and_the_batch_goes_again(
    autojump_clock, nursery, tmp_path
) -> None:
    """An answer announcing 100 MiB and sending 2 MiB (then nothing): read up to 1 MiB, an
    error saying so at once (not a timeout after the whole of it), the batch sent again."""
    proxy = FakeKafkaProxy()
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n" + b" " * (2 << 20)
    proxy.faults = [Raw(huge)]
    cmsod = await kafka_daemon(nursery, tmp_path, proxy, events__timeout_s=3600)
    client = await cmsod.connect()
    began = trio.current_time()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("huge", now=EPOCH))
    await outbox_empty(cmsod)
    assert trio.current_time() - began < 60  # not the 3600 s read timeout
    error = cmsod.ctx.figures["emitter"].last_error
    assert error == (
        f"kafka rest proxy at {proxy.url}: answer larger than 1048576 bytes (HTTP 200): not read"
    )
    check_delivery(proxy, tmp_path)


async def test_the_other_http_sinks_read_an_answer_up_to_the_cap(nursery) -> None:
    huge = Reply(200, b"[" * ((1 << 20) + 1))
    server = FakeHTTP(lambda request: huge)
    await nursery.start(server.serve)
    context = tls.context(config.TlsConfig())
    event = b'{"eventId":"e1"}'
    mr = MrSink.create(server.url, 10, context)
    with pytest.raises(PeerError, match="message router at .*: answer larger than 1048576"):
        await mr.publish("t", [("s", event)])
    receiver = CloudEventsSink.create(server.url, 10, context)
    with pytest.raises(PartialDelivery, match="answer larger than 1048576") as info:
        await receiver.post(event, {"content-type": "application/json"}, 3)  # the 4th event
    assert info.value.delivered == 3
    await mr.aclose()
    await receiver.aclose()


def test_the_answer_is_decoded_with_limits_and_names_what_is_wrong() -> None:
    where, topic = "kafka rest proxy at X", "t"

    def taken(answer, sent: int = 3) -> int:
        return KafkaSink.taken(where, topic, msgspec.json.encode(answer), sent)

    ok = {"partition": 1, "offset": 7, "error_code": None, "error": None}
    assert taken({"offsets": [ok] * 3, "key_schema_id": None, "value_schema_id": None}) == 3
    assert taken({"offsets": [{"partition": 1, "offset": 7}] * 3}) == 3  # Strimzi's shape
    with pytest.raises(PartialDelivery) as partial:
        taken({"offsets": [ok, {"error_code": 50002, "error": "RecordTooLarge"}, ok]})
    assert partial.value.delivered == 1 and partial.value.permanent
    assert "record 2 of 3 not taken (error_code 50002): RecordTooLarge" in str(partial.value)
    with pytest.raises(PartialDelivery) as partial:
        taken({"offsets": [{"error_code": 500, "message": "Expiring 1 record(s)"}, ok, ok]})
    assert partial.value.delivered == 0 and not partial.value.permanent
    with pytest.raises(PartialDelivery) as partial:
        taken({"offsets": [ok, {"partition": None, "offset": None}]})  # no entry for #3 either
    assert partial.value.delivered == 1 and not partial.value.permanent
    with pytest.raises(PartialDelivery) as partial:
        taken({"offsets": [ok, ok]})
    assert partial.value.delivered == 2 and "answered 2 of 3" in str(partial.value)
    with pytest.raises(PeerError, match=r">= 0 - at `\$\.offsets\[0\]\.offset`"):
        taken({"offsets": [{"partition": 1, "offset": -3}]})
    with pytest.raises(PeerError, match="answered 4 offsets for 3 records"):
        taken({"offsets": [ok] * 4})
    with pytest.raises(PeerError, match=r"Expected `array`.*\$\.offsets"):
        taken({"offsets": "all"})
    with pytest.raises(PeerError, match="length <= 65536"):
        taken({"offsets": [{"error_code": 1, "error": "x" * 70000}]})


def test_the_records_embed_each_envelope_byte_for_byte() -> None:
    body = b'{"eventId":"e1","eventCorrelationId":"s 1","event":{"a":[1,2.50]}}'
    encoded = KafkaSink.records([("s 1", body), ("s2", b"{}")])
    assert encoded == b'{"records":[{"key":"s 1","value":' + body + b'},{"key":"s2","value":{}}]}'


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[events]\nsink = 'kafka'\n",
            "events.url must be an http(s):// URL when events.sink = 'kafka'",
        ),
        (
            "[events]\nsink = 'kafka'\nurl = 'http://proxy:8082/topics/cm-events'\n",
            "events.url must be the Kafka REST proxy's base URL",
        ),
        (
            "[events]\nsink = 'kafka'\nurl = 'http://proxy:8082/topics'\n",
            "without /topics",
        ),
        ("[events]\nsink = 'kafka'\nurl = 'http://proxy:8082/?x=1'\n", "no query string"),
        ("[events]\nsink = 'kafka2'\n", "Invalid enum value 'kafka2' - at `$.events.sink`"),
    ],
)
def test_kafka_settings_are_checked(tmp_path, toml: str, message: str) -> None:
    path = tmp_path / "cmsod.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(path, env={})
    path.write_text("[events]\nsink = 'kafka'\nurl = 'https://bridge.kafka:8080/prefix/'\n")
    assert config.load(path, env={}).events.url == "https://bridge.kafka:8080/prefix/"


# -- the real daemon, killed while a batch is on the wire -------------------------------------


def test_kill_9_while_publishing_to_kafka_loses_nothing_and_keeps_each_schedule_in_order(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    proxy = FakeKafkaProxy(validate=validate_event)
    in_flight: list[list[str]] = []  # the eventIds of each POST the daemon died waiting for
    handle = proxy.handle

    down = True  # while the schedules are submitted: the outbox fills up

    def slow(req):  # every batch is written, then answered 0.4 s later: a kill lands inside
        if down:
            return Reset()
        reply = handle(req)
        return Reply(reply.status, reply.body, delay_s=0.4) if isinstance(reply, Reply) else reply

    proxy.handler = slow
    stop = proxy.in_thread()
    env = {
        "CMSOD_EVENTS__SINK": "kafka",
        "CMSOD_EVENTS__URL": proxy.url,
        "CMSOD_EVENTS__BATCH_SIZE": "3",
        "CMSOD_EVENTS__RETRY_MAX_S": "0.5",
    }
    ids = [f"kk{i}" for i in range(4)]
    try:
        daemon = Daemon(tmp_path, extra_env=env)
        now = datetime.now(UTC)
        for schedule_id in ids:
            body = request(schedule_id, now=now, nodes=[f"{schedule_id}-{n}" for n in range(3)])
            assert cmsoctl(tmp_path, "submit", "-", stdin=json.dumps(body))[0] == 0
        daemon.wait_log(r"event=schedule\.optimized", count=len(ids))
        seen = len(proxy.posts)
        down = False
        # 12 events in batches of 3: killed on the 1st POST of the first process, the 2nd of
        # the next, the 3rd of the one after; the last one publishes what is left
        for kill in range(3):
            proxy.wait_for(lambda n=seen + kill: len(proxy.posts) > n)  # written, unanswered
            in_flight.append(proxy.posts[-1])
            daemon.kill()
            seen = len(proxy.posts)
            daemon = Daemon(tmp_path, extra_env=env)
        # 4 schedules x 3 events (created, optimizing, pending approval), all written
        proxy.wait_for(lambda: len({e["eventId"] for e in proxy.events()}) == 12, 60)
        assert daemon.stop() == 0
    finally:
        stop()
    per_schedule = check_delivery(proxy, tmp_path)
    assert set(per_schedule) == set(ids)
    written = [e["eventId"] for e in proxy.events()]
    twice = {i for i in written if written.count(i) > 1}
    # only what was on the wire at a kill came again (at least once, same eventIds)
    assert twice and twice <= {i for post in in_flight for i in post}
