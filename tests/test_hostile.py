"""Hostile input against the real daemon process: hypothesis-generated control messages
(random bytes, invalid UTF-8, deep nesting, huge numbers, wrong types, valid methods with
hostile parameters). Every one gets a clear error or a valid answer; none gets an internal
error; the daemon keeps serving; the store stays intact and holds nothing half-done."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmsod.control.api import METHODS
from tests.cmso_requests import request
from tests.conftest import EPOCH
from tests.procs import Daemon

tally: Counter[str] = Counter()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    state = tmp_path_factory.mktemp("hostile")
    d = Daemon(state)
    yield d
    assert d.stop() == 0
    with sqlite3.connect(state / "cmsod.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # whatever hypothesis managed to create is whole: every schedule has its elements
        assert db.execute(
            "SELECT count(*) FROM schedules s WHERE NOT EXISTS (SELECT 1 FROM elements e WHERE e.schedule = s.id)"
        ).fetchone() == (0,)
    print(
        f"hostile input: {sum(tally.values())} messages tried, {tally['error']} errors answered, "
        f"{tally['ok']} valid answers, {tally['closed']} connections closed, 0 crashes"
    )


def send(daemon: Daemon, payload: bytes) -> dict | None:
    """One message on a fresh connection: the reply, or None when the daemon closed it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.state_dir / "control.sock"))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while b"\0" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
    return json.loads(data[: data.index(b"\0")])


def check(daemon: Daemon, payload: bytes) -> None:
    reply = send(daemon, payload)
    if reply is None:
        tally["closed"] += 1
    elif "error" in reply:
        assert reply["error"] != "io.cmsod.InternalError", reply  # every error is a clear one
        assert isinstance(reply["error"], str) and reply["parameters"]
        tally["error"] += 1
    else:
        tally["ok"] += 1
    assert daemon.proc.poll() is None  # still running


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
methods = st.sampled_from(sorted(METHODS)) | st.text(max_size=40)
parameter_names = st.sampled_from(
    ["schedule", "scheduleId", "approval", "filters", "status", "limit", "after", "eventType"]
) | st.text(max_size=10)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=300))
def test_random_bytes(daemon, data: bytes) -> None:
    check(daemon, data.replace(b"\0", b"") + b"\0")


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]),
    st.integers(0, 50),
)
def test_invalid_utf8(daemon, bad: bytes, where: int) -> None:
    text = b'{"method":"io.cmsod.Schedules.Get","parameters":{"scheduleId":"abc"}}'
    check(daemon, text[:where] + bad + text[where:] + b"\0")


@pytest.mark.parametrize("depth", [100, 10_000, 200_000])
def test_deep_nesting(daemon, depth: int) -> None:
    check(
        daemon,
        b'{"method":"io.cmsod.Schedules.List","parameters":{"after":'
        + b"[" * depth
        + b"]" * depth
        + b"}}\0",
    )


@pytest.mark.parametrize(
    "number", ["1e400", "-1e400", "1" * 5000, "123456789012345678901234567890"]
)
def test_huge_numbers(daemon, number: str) -> None:
    check(
        daemon,
        f'{{"method":"io.cmsod.Schedules.List","parameters":{{"limit":{number}}}}}\0'.encode(),
    )
    body = request("huge", now=EPOCH)
    text = json.dumps(body).replace(
        '"normalDurationInSeconds": 3600', f'"normalDurationInSeconds": {number}'
    )
    check(
        daemon,
        f'{{"method":"io.cmsod.Schedules.Create","parameters":{{"schedule":{text}}}}}\0'.encode(),
    )


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(methods, st.dictionaries(parameter_names, json_values, max_size=4), st.booleans())
def test_methods_with_hostile_parameters(daemon, method: str, parameters: dict, more: bool) -> None:
    message = {"method": method, "parameters": parameters}
    if more:
        message["more"] = more
    if method == "io.cmsod.Events.Watch" and more:
        return  # a valid watch streams until closed: covered by the events tests
    check(daemon, json.dumps(message).encode() + b"\0")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from(["domain", "scheduleId", "userId", "domainData", "schedulingInfo"]), json_values
)
def test_create_with_one_hostile_field(daemon, field: str, value) -> None:
    body = request("hostile-create", now=EPOCH)
    body[field] = value
    check(
        daemon,
        json.dumps(
            {"method": "io.cmsod.Schedules.Create", "parameters": {"schedule": body}}
        ).encode()
        + b"\0",
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from(
        [
            "normalDurationInSeconds",
            "additionalDurationInSeconds",
            "concurrencyLimit",
            "policyId",
            "vnfDetails",
            "elements",
        ]
    ),
    json_values,
)
def test_create_with_hostile_scheduling_info(daemon, field: str, value) -> None:
    body = request("hostile-info", now=EPOCH)
    body["schedulingInfo"][field] = value
    check(
        daemon,
        json.dumps(
            {"method": "io.cmsod.Schedules.Create", "parameters": {"schedule": body}}
        ).encode()
        + b"\0",
    )


def test_still_serving_after_all_that(daemon) -> None:
    reply = send(daemon, b'{"method":"io.cmsod.Manager.Status"}\0')
    assert reply and reply["parameters"]["healthy"] is True
    assert not [
        line for line in daemon.lines if "event=control.failed" in line or "level=error" in line
    ]
