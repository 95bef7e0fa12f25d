"""Property-based tests of the REST API from its OpenAPI document (schemathesis), against the
real `cmsod` process with its HTTP listener on. Every generated request must be answered
without a 5xx, with a status, headers and body that the document allows. Bounded: a few
examples per operation (CMSOD_SCHEMA_EXAMPLES raises it for a longer local run)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
import schemathesis
import schemathesis.checks
from hypothesis import HealthCheck, settings

from cmsod.rest.auth import hash_password
from tests.cmso_requests import request
from tests.procs import Daemon

DOCUMENT = Path(__file__).parent.parent / "docs" / "openapi.json"
EXAMPLES = int(os.environ.get("CMSOD_SCHEMA_EXAMPLES", "25"))
PASSWORD = "schema-test"

schema = schemathesis.openapi.from_path(DOCUMENT)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE], max_examples=EXAMPLES, deterministic=True
)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("schema")
    users = state / "users"
    users.write_text(f"tester:approve:{hash_password(PASSWORD, 4)}\n")
    daemon = Daemon(
        state,
        extra_env={
            "CMSOD_HTTP__LISTEN": "127.0.0.1:0",
            "CMSOD_HTTP__CREDENTIALS_FILE": str(users),
        },
    )
    line = daemon.wait_log(r"event=http\.listening")[0]
    match = re.search(r"address=(\S+)", line)
    assert match is not None
    url = f"http://{match[1]}"
    # something to find: a schedule waiting for approval
    body = request("known", now=datetime.now(UTC))
    created = requests.post(
        f"{url}/cmso/v1/schedules/known", json=body, auth=("tester", PASSWORD), timeout=10
    )
    assert created.status_code == 202, created.text
    try:
        yield url
    finally:
        assert daemon.stop() == 0
        assert not [line for line in daemon.lines if "http.failed" in line]


# What the document promises. Not `positive_data_acceptance`: a body the schema allows may
# still break one of CMSO's rules (a 400 with its requestError, which the document lists).
CHECKS = [
    getattr(schemathesis.checks, name)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    )
]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, auth=("tester", PASSWORD), timeout=10, checks=CHECKS)
