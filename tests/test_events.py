"""CM events: the schema (positive and negative), the Message Router and CloudEvents sinks
against real HTTP servers on loopback that fail and come back, routing, rotation, unknown
schemas refused and kept, live watching, and a watcher too slow to keep."""

from __future__ import annotations

import copy
import json
import re
import sqlite3
from collections import defaultdict

import jsonschema
import msgspec
import pytest
import trio
import trio.testing

import cmsod.actors.context
from cmsod import cmevents
from cmsod.model import ScheduleStatus as S
from tests.cmso_requests import approval, request
from tests.conftest import EPOCH, start_daemon, validate_event, wait_until
from tests.fake_http import FakeHTTP, Reply, Request, Reset

DONE = (S.COMPLETED, S.COMPLETED_WITH_ERRORS)


def sample_event() -> dict:
    return json.loads(
        cmevents.encode(
            cmevents.build(
                "s1",
                1,
                [
                    cmevents.element_edit(
                        "s1", "node1", {"vnf-name": "node1", "status": "Triggered"}
                    )
                ],
                1796112284003,
                "urn:onap:cmsod",
            )
        )
    )


def mutate(path: list, value=None, delete=False):
    def apply(event: dict) -> dict:
        event = copy.deepcopy(event)
        target = event
        for key in path[:-1]:
            target = target[key]
        if delete:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return event

    return apply


PATCH = ["event", "push-change-update", "datastore-changes", "ietf-yang-patch:yang-patch"]


def test_the_schema_accepts_our_events_and_rejects_near_misses() -> None:
    validate_event(sample_event())
    bad = [
        mutate(["id"], "x"),  # an extra envelope member
        mutate([*PATCH, "edit", 0, "value"], "Triggered"),  # a string value
        mutate([*PATCH, "patch-id"], delete=True),
        mutate([*PATCH, "edit", 0, "operation"], "replace"),
        mutate([*PATCH, "edit", 0, "target"], "/somewhere/else"),
        mutate(["eventSchemaVersion"], "2.0"),
        mutate(["eventTime"], "2026-12-01T08:00:00Z"),
        mutate([*PATCH, "edit"], []),
    ]
    for change in bad:
        with pytest.raises(jsonschema.ValidationError):
            validate_event(change(sample_event()))


CAMBRIA_ENTRY = re.compile(rb"\s*(\d+)\.(\d+)\.")


def cambria_messages(body: bytes) -> list[tuple[str, bytes]]:
    """MR's `application/cambria` body, read as MR reads it: (key, message) pairs."""
    messages, at = [], 0
    while body[at:].strip():
        entry = CAMBRIA_ENTRY.match(body, at)
        assert entry, f"not cambria at byte {at}: {body[at : at + 40]!r}"
        key_end = entry.end() + int(entry[1])
        at = key_end + int(entry[2])
        assert at <= len(body), "a length runs past the end of the body"
        messages.append((body[entry.end() : key_end].decode(), body[key_end:at]))
    return messages


class Bus(FakeHTTP):
    """A Message Router: POST /events/{topic} with an `application/cambria` body (each event
    with its own key). `keys[topic]` records each event's key, `received[topic]` the events."""

    def __init__(self, validate: bool = True) -> None:
        super().__init__(self.handle)
        self.faults: list = []  # consumed one per publish call
        self.received: dict[str, list[dict]] = defaultdict(list)
        self.keys: dict[str, list[str]] = defaultdict(list)
        self.validate = validate  # (benchmarks measure the daemon, not the schema check)

    def handle(self, request: Request):
        topic = request.path.split("?")[0].removeprefix("/events/")
        fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, Reset | Reply):
            return fault
        assert request.headers["content-type"] == "application/cambria"
        messages = cambria_messages(request.body)
        taken = messages if fault is None else messages[:fault]  # fault = n: a partial publish
        for key, message in taken:
            event = json.loads(message)
            if self.validate:
                validate_event(event)
                assert key == event["eventCorrelationId"]  # each event keyed by its schedule
            self.keys[topic].append(key)
            self.received[topic].append(event)
        if fault is None:
            return Reply(200, {"count": len(messages), "serverTimeMs": 1})
        return Reply(
            500,
            {
                "status": 500,
                "mrstatus": 3007,
                "message": f"Partial publish: {fault} messages published before the failure",
            },
        )


def in_order_and_complete(events: list[dict]) -> dict[str, list[int]]:
    """Per schedule, the sequence numbers of the distinct events, in arrival order."""
    seen: set[str] = set()
    per_schedule: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if event["eventId"] in seen:
            continue
        seen.add(event["eventId"])
        patch_id = event["event"]["push-change-update"]["datastore-changes"][
            "ietf-yang-patch:yang-patch"
        ]["patch-id"]
        schedule, _, n = patch_id.rpartition(":")
        per_schedule[schedule].append(int(n))
    for seqs in per_schedule.values():
        assert seqs == list(range(1, len(seqs) + 1)), seqs
    return per_schedule


async def run_schedules(cmsod, ids: list[str]) -> None:
    client = await cmsod.connect()
    for schedule_id in ids:
        nodes = [f"{schedule_id}-n1", f"{schedule_id}-n2"]  # its own: no schedule waits for another
        await client.ok(
            "io.cmsod.Schedules.Create", schedule=request(schedule_id, now=EPOCH, nodes=nodes)
        )
    for schedule_id in ids:
        await client.wait_for(schedule_id, S.PENDING_APPROVAL)
        await client.ok("io.cmsod.Schedules.Approve", scheduleId=schedule_id, approval=approval())
    for schedule_id in ids:
        await client.wait_for(schedule_id, *DONE)

    async def outbox_empty() -> bool:
        return (await client.ok("io.cmsod.Manager.Status"))["counts"]["eventsPending"] == 0

    await wait_until(outbox_empty, "every event delivered")


async def test_message_router_down_500_partial_and_back(autojump_clock, nursery, tmp_path) -> None:
    bus = Bus()
    await nursery.start(bus.serve)
    bus.faults = [
        Reset(),
        Reset(),
        Reply(500, {"status": 500, "mrstatus": 3002, "message": "unable"}),
        1,
        2,
        Reset(),
    ]
    cmsod = await start_daemon(
        nursery, tmp_path, events__sink="http", events__url=bus.url, events__batch_size=3
    )
    await run_schedules(cmsod, ["a", "b", "c"])
    stream = bus.received["cm-events"]
    per_schedule = in_order_and_complete(stream)
    health = await (await cmsod.connect()).ok("io.cmsod.Manager.Status")
    assert {c["name"]: c["healthy"] for c in health["components"]}[
        "Event Sink"
    ] is True  # recovered
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        stored = dict(
            db.execute("SELECT schedule_id, count(*) FROM events GROUP BY schedule_id").fetchall()
        )
    assert {s: len(seqs) for s, seqs in per_schedule.items()} == stored  # nothing lost
    assert cmsod.ctx.figures["emitter"].errors >= 6


async def test_a_sink_that_is_down_shows_in_the_health_report(
    autojump_clock, nursery, tmp_path
) -> None:
    bus = Bus()
    await nursery.start(bus.serve)
    bus.faults = [Reset()] * 1000
    cmsod = await start_daemon(nursery, tmp_path, events__sink="http", events__url=bus.url)
    client = await cmsod.connect()
    await client.ok("io.cmsod.Schedules.Create", schedule=request("quiet", now=EPOCH))

    async def sink_failing() -> bool:
        health = await client.ok("io.cmsod.Manager.Status")
        return {c["name"]: c["status"] for c in health["components"]}["Event Sink"] == "FAILED"

    await wait_until(sink_failing, "the sink reported failing")
    health = await client.ok("io.cmsod.Manager.Status")
    assert health["actors"]["emitter"]["lastError"].startswith("message router at")
    assert health["counts"]["eventsPending"] > 0  # kept, waiting


async def test_a_partial_publish_is_not_resent_whole(autojump_clock, nursery, tmp_path) -> None:
    bus = Bus()
    await nursery.start(bus.serve)
    bus.faults = [2]  # of the first batch only two are taken
    cmsod = await start_daemon(
        nursery, tmp_path, events__sink="http", events__url=bus.url, events__batch_size=10
    )
    await run_schedules(cmsod, ["p"])
    ids = [e["eventId"] for e in bus.received["cm-events"]]
    assert len(ids) == len(set(ids))  # the two taken were not sent again
    in_order_and_complete(bus.received["cm-events"])


class Receiver(FakeHTTP):
    """A CloudEvents HTTP receiver: binary mode, or batch mode (a JSON array of structured
    events). `posts` counts the requests it took."""

    def __init__(self) -> None:
        super().__init__(self.handle)
        self.faults: list = []
        self.received: list[dict] = []
        self.posts = 0

    def handle(self, request: Request):
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            return fault
        self.posts += 1
        if request.headers["content-type"] == "application/cloudevents-batch+json":
            for structured in request.json():
                assert structured.pop("datacontenttype") == "application/json"
                self.take(structured.pop("data"), structured)
        else:
            assert request.headers["content-type"] == "application/json"
            headers = request.headers.items()
            self.take(request.json(), {k[3:]: v for k, v in headers if k.startswith("ce-")})
        return Reply(202, b"")

    def take(self, data: dict, ce: dict[str, str]) -> None:
        assert ce["specversion"] == "1.0"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ce["time"])
        assert ce["dataschema"] == "urn:org.onap.ncmp:cm-network-avc-event.rfc8641:1.0"
        assert ce["partitionkey"] == ce["correlationid"]
        assert list(data) == ["push-change-update"]
        self.received.append(
            {  # the legacy envelope again, to check it whole
                "eventId": ce["id"],
                "eventCorrelationId": ce["correlationid"],
                "eventSource": ce["source"],
                "eventType": ce["type"],
                "eventSchema": "org.onap.ncmp:cm-network-avc-event.rfc8641",
                "eventSchemaVersion": "1.0",
                "eventTime": ce["time"].replace("Z", "+0000"),
                "event": data,
            }
        )
        validate_event(self.received[-1])


async def test_cloudevents_binary_mode_with_failures(autojump_clock, nursery, tmp_path) -> None:
    receiver = Receiver()
    await nursery.start(receiver.serve)
    receiver.faults = [Reset(), Reply(503, b"later"), None, Reply(500, b"oops")]
    cmsod = await start_daemon(
        nursery, tmp_path, events__sink="cloudevents", events__url=receiver.url
    )
    await run_schedules(cmsod, ["ce1", "ce2"])
    per_schedule = in_order_and_complete(receiver.received)
    assert set(per_schedule) == {"ce1", "ce2"}


async def test_cloudevents_batch_mode_with_failures(autojump_clock, nursery, tmp_path) -> None:
    receiver = Receiver()
    await nursery.start(receiver.serve)
    receiver.faults = [Reset(), Reply(503, b"later"), None, Reply(500, b"oops")]
    cmsod = await start_daemon(
        nursery,
        tmp_path,
        events__sink="cloudevents",
        events__url=receiver.url,
        events__cloudevents_mode="batch",
    )
    await run_schedules(cmsod, ["cb1", "cb2"])
    per_schedule = in_order_and_complete(receiver.received)  # (a failed batch comes again)
    assert set(per_schedule) == {"cb1", "cb2"}
    assert receiver.posts < len(receiver.received) / 2  # many events per POST


async def test_routing_by_target_group(autojump_clock, nursery, tmp_path) -> None:
    cmsod = await start_daemon(nursery, tmp_path, events__route_by="targetGroup")
    client = await cmsod.connect()
    body = request("routed", now=EPOCH, extra_domain_data={"targetGroup": "east"})
    await client.ok("io.cmsod.Schedules.Create", schedule=body)
    await client.ok("io.cmsod.Schedules.Create", schedule=request("plain", now=EPOCH))
    await client.wait_for("routed", S.PENDING_APPROVAL)
    await client.wait_for("plain", S.PENDING_APPROVAL)

    async def written() -> bool:
        return (await client.ok("io.cmsod.Manager.Status"))["counts"]["eventsPending"] == 0

    await wait_until(written, "events written")
    east = [
        json.loads(line)
        for line in (tmp_path / "events" / "cm-events-east.jsonl").read_text().splitlines()
    ]
    plain = [
        json.loads(line)
        for line in (tmp_path / "events" / "cm-events.jsonl").read_text().splitlines()
    ]
    assert {e["eventCorrelationId"] for e in east} == {"routed"}
    assert {e["eventCorrelationId"] for e in plain} == {"plain"}


async def test_the_event_file_rotates_by_size(autojump_clock, nursery, tmp_path) -> None:
    cmsod = await start_daemon(nursery, tmp_path, events__max_file_bytes=4096, events__keep_files=3)
    await run_schedules(cmsod, ["r1", "r2", "r3"])
    files = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert files == [
        "cm-events.jsonl",
        "cm-events.jsonl.1",
        "cm-events.jsonl.2",
        "cm-events.jsonl.3",
    ]
    assert all((tmp_path / "events" / f).stat().st_size <= 4096 for f in files)


async def test_an_unknown_schema_is_refused_logged_and_kept(
    autojump_clock, nursery, tmp_path, caplog
) -> None:
    import logging

    cmsod = await start_daemon(nursery, tmp_path)
    alien = sample_event()
    alien["eventSchemaVersion"] = "9.9"

    def insert(tx) -> None:
        tx.execute(
            "INSERT INTO events (schedule_id, topic, body, created_ms) VALUES (?, ?, ?, ?)",
            ("s1", "cm-events", json.dumps(alien).encode(), 0),
        )

    caplog.set_level(logging.ERROR, logger="cmsod")
    logging.getLogger("cmsod").propagate = True
    try:
        await cmsod.ctx.store.tx(insert)
        await run_schedules(cmsod, ["after"])
    finally:
        logging.getLogger("cmsod").propagate = False
    refused = [r for r in caplog.records if getattr(r, "event", "") == "events.refused"]
    assert refused and alien["eventId"] in refused[0].fields["reason"]
    assert (
        "UnknownEventSchema" not in refused[0].fields["reason"]
        and "9.9" in refused[0].fields["reason"]
    )
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        (reason,) = db.execute("SELECT refused FROM events WHERE refused IS NOT NULL").fetchone()
    assert "unknown eventSchema" in reason
    status = await (await cmsod.connect()).ok("io.cmsod.Manager.Status")
    assert status["counts"]["eventsRefused"] == 1
    lines = (tmp_path / "events" / "cm-events.jsonl").read_text()
    assert alien["eventId"] not in lines and '"after"' in lines  # the rest went on


async def test_building_an_event_of_an_unknown_schema_raises() -> None:
    with pytest.raises(cmevents.UnknownEventSchema):
        cmevents.build("s", 1, [], 0, "src", schema="org.example:other", version="1.0")


async def watch(cmsod, **filters):
    client = await cmsod.connect()
    await client.send_raw(
        msgspec.json.encode(
            {"method": "io.cmsod.Events.Watch", "parameters": filters, "more": True}
        )
        + b"\0"
    )
    return client


async def test_watching_events_live_with_filters(autojump_clock, nursery, tmp_path) -> None:
    cmsod = await start_daemon(nursery, tmp_path)
    everything = await watch(cmsod)
    only_w2 = await watch(cmsod, scheduleId="w2")
    await trio.testing.wait_all_tasks_blocked()
    await run_schedules(cmsod, ["w1", "w2"])
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        total = db.execute("SELECT count(*) FROM events").fetchone()[0]
        for_w2 = db.execute("SELECT count(*) FROM events WHERE schedule_id = 'w2'").fetchone()[0]
    got_all = [msgspec.json.decode(await everything.receive_raw()) for _ in range(total)]
    got_w2 = [msgspec.json.decode(await only_w2.receive_raw()) for _ in range(for_w2)]
    assert all(r["continues"] is True for r in got_all)
    assert {r["parameters"]["event"]["eventCorrelationId"] for r in got_w2} == {"w2"}
    in_order_and_complete([r["parameters"]["event"] for r in got_all])
    reply = await (await cmsod.connect()).call("io.cmsod.Events.Watch")
    assert (
        reply["error"] == "org.varlink.service.InvalidParameter"
        and reply["parameters"]["parameter"] == "more"
    )


async def test_a_slow_watcher_is_dropped_and_the_daemon_goes_on(
    autojump_clock, nursery, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(cmsod.actors.context, "WATCH_QUEUE", 4)
    daemon = await start_daemon(nursery, tmp_path)
    sleepy = await watch(daemon)  # never reads
    await trio.testing.wait_all_tasks_blocked()
    await run_schedules(
        daemon, [f"busy{i}" for i in range(60)]
    )  # far more than socket + queue hold
    assert daemon.ctx.watchers_dropped == 1 and not daemon.ctx.watchers
    await sleepy.aclose()


async def test_a_sink_down_for_an_hour_loses_nothing_and_slows_nothing(
    autojump_clock, nursery, tmp_path
) -> None:
    bus = Bus()
    await nursery.start(bus.serve)
    bus.faults = [Reset()] * 10_000  # down
    cmsod = await start_daemon(nursery, tmp_path, events__sink="http", events__url=bus.url)
    client = await cmsod.connect()
    began = trio.current_time()
    for schedule_id in ("h1", "h2"):
        body = request(schedule_id, now=EPOCH, nodes=[f"{schedule_id}-a"], minutes_from_now=None)
        await client.ok("io.cmsod.Schedules.Create", schedule=body)
    for schedule_id in ("h1", "h2"):  # the work goes on while the sink is down
        await client.wait_for(schedule_id, *DONE)
    assert trio.current_time() - began < 600
    await trio.sleep(3600 - (trio.current_time() - began))
    assert not bus.received["cm-events"]
    bus.faults = []  # back after an hour
    client = await cmsod.connect()

    async def drained() -> bool:
        return (await client.ok("io.cmsod.Manager.Status"))["counts"]["eventsPending"] == 0

    await wait_until(drained, "the backlog delivered")
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        stored = dict(
            db.execute("SELECT schedule_id, count(*) FROM events GROUP BY schedule_id").fetchall()
        )
    assert {
        s: len(n) for s, n in in_order_and_complete(bus.received["cm-events"]).items()
    } == stored


async def pile_up(cmsod, ids: list[str]) -> None:
    """Schedules created and planned (3 events each, interleaved in the outbox)."""
    client = await cmsod.connect()
    for schedule_id in ids:
        body = request(schedule_id, now=EPOCH, nodes=[f"{schedule_id}-a"], minutes_from_now=600)
        await client.ok("io.cmsod.Schedules.Create", schedule=body)
    for schedule_id in ids:
        await client.wait_for(schedule_id, S.PENDING_APPROVAL)


async def outbox_empty(cmsod) -> None:
    client = await cmsod.connect()

    async def empty() -> bool:
        return (await client.ok("io.cmsod.Manager.Status"))["counts"]["eventsPending"] == 0

    await wait_until(empty, "every event delivered")


@pytest.mark.parametrize("retry_max_s", [None, 2.0])
async def test_after_an_outage_a_500_and_partial_publishes_the_backlog_follows_soon(
    autojump_clock, nursery, tmp_path, retry_max_s
) -> None:
    bus = Bus()
    outage_ends = trio.current_time() + 20
    taken_at: list[float] = []

    def down_then_flaky(req: Request):
        if trio.current_time() < outage_ends:
            return Reset()  # a 20 s outage
        before = len(bus.received["cm-events"])
        reply = Bus.handle(bus, req)  # then: a 500 and two partial publishes (bus.faults)
        if len(bus.received["cm-events"]) > before:
            taken_at.append(trio.current_time())
        return reply

    bus.handler = down_then_flaky
    bus.faults = [Reply(500, {"status": 500, "mrstatus": 3002, "message": "unable"}), 2, 3]
    await nursery.start(bus.serve)
    limit = {} if retry_max_s is None else {"events__retry_max_s": retry_max_s}
    cmsod = await start_daemon(nursery, tmp_path, events__sink="http", events__url=bus.url, **limit)
    cap = cmsod.ctx.config.events.retry_max_s
    assert cap <= 30
    await pile_up(cmsod, ["o1", "o2", "o3"])
    await outbox_empty(cmsod)
    # back up at 20 s: one retry may wait a full cap, the 500 another; each partial publish
    # took some events, so the rest go after 0.5 s (the old backoff doubled on to 60 s)
    assert taken_at[-1] - outage_ends <= 2 * cap + 1.5
    ids = [e["eventId"] for e in bus.received["cm-events"]]
    assert len(ids) == len(set(ids)) == 9  # the partial publishes: exactly the rest re-sent
    in_order_and_complete(bus.received["cm-events"])


async def test_a_backlog_goes_in_batches_across_schedules_in_order(
    autojump_clock, nursery, tmp_path
) -> None:
    bus = Bus()
    bus.faults = [Reset()] * 1000  # down while 20 schedules make 60 events
    await nursery.start(bus.serve)
    cmsod = await start_daemon(
        nursery, tmp_path, events__sink="http", events__url=bus.url, events__batch_size=25
    )
    ids = [f"b{i:02}" for i in range(20)]
    await pile_up(cmsod, ids)
    with sqlite3.connect(tmp_path / "cmsod.sqlite3") as db:
        outbox = [json.loads(b)["eventId"] for (b,) in db.execute("SELECT body FROM events")]
    assert len(outbox) == 60
    bus.requests.clear()
    bus.faults = [7]  # back, and the first batch is taken only in part
    await outbox_empty(cmsod)
    posts = [cambria_messages(r.body) for r in bus.requests if r.method == "POST"]
    # batches of 25 events of many schedules each (not one POST per schedule's run), the
    # partial one re-sent from its first event not taken: 7 of 25, then 25, 25, 3
    assert [len(p) for p in posts] == [25, 25, 25, 3]
    sent = [json.loads(m)["eventId"] for p in posts for _, m in p]
    assert sent[:7] + sent[25:] == outbox  # commit order, nothing twice, nothing lost
    assert len({json.loads(m)["eventCorrelationId"] for _, m in posts[1]}) > 5
    assert bus.keys["cm-events"] == [e["eventCorrelationId"] for e in bus.received["cm-events"]]
    assert set(in_order_and_complete(bus.received["cm-events"])) == set(ids)
