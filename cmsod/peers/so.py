"""The orchestrator (SO). `HttpSO` speaks CMSO's SO contract over HTTP; `LoopbackSO` is the
embedded default: it accepts every work flow and reports it `COMPLETE` once
`simulated_duration_s` has passed.

It is stateless on purpose: the request id carries the time the work flow finishes, so a
restarted daemon polling an id it handed out before the crash gets the right answer.
"""

from __future__ import annotations

import base64
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import msgspec

from cmsod.clock import WallClock
from cmsod.config import SoConfig
from cmsod.errors import NotDelivered, PeerError, Unconfirmed
from cmsod.peers import excerpt
from cmsod.peers.http1 import Broken, ConnectFailed, Http1Client, Response
from cmsod.wire.so import Accepted, CmResponses, StatusResponse


@dataclass(frozen=True)
class SoStatus:
    """One answer to a status poll: SO's requestState (or None when the answer had none)."""

    http_status: int
    request_state: str | None
    message: str | None = None
    finish_time: str | None = None  # RFC 1123, as SO writes it


class Orchestrator(Protocol):
    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        """Start the work flow; return SO's request id, or raise PeerError saying why not."""
        ...

    async def statuses(self, request_ids: Sequence[str]) -> list[SoStatus | PeerError]:
        """Poll many at once; each answer, or the PeerError that kept it from coming."""
        ...


@dataclass
class LoopbackSO:
    clock: WallClock
    simulated_duration_s: float = 5.0
    dispatched: list[tuple[str, str]] = field(default_factory=list)  # (key, vnf) for tests

    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        self.dispatched.append((key, vnf_name))
        finish_ms = self.clock.now_ms() + int(self.simulated_duration_s * 1000)
        return f"loopback-{uuid.uuid4().hex[:12]}-{finish_ms}"

    async def status(self, request_id: str) -> SoStatus:
        prefix, _, finish = request_id.rpartition("-")
        if not prefix.startswith("loopback-") or not finish.isdigit():
            return SoStatus(404, None, f"unknown request {request_id}")
        finish_ms = int(finish)
        if self.clock.now_ms() < finish_ms:
            return SoStatus(200, "IN_PROGRESS", "loop-back work flow running")
        return SoStatus(200, "COMPLETE", "Done.", formatdate(finish_ms / 1000, usegmt=True))

    async def statuses(self, request_ids: Sequence[str]) -> list[SoStatus | PeerError]:
        return [await self.status(r) for r in request_ids]


@dataclass
class HttpSO:
    """The CMSO SO contract over HTTP: `POST {url}{dispatch_path}` with the element's stored
    request, `GET {url}{status_path}` to poll, many polls down one connection at a time
    (`peers/http1.py`). Keep-alive connections with connect and read timeouts."""

    dispatch_path: str
    status_path: str
    client: Http1Client
    where: str

    @classmethod
    def from_config(
        cls, cfg: SoConfig, max_connections: int, ssl_context: ssl.SSLContext
    ) -> HttpSO:
        headers = {"X-FromAppId": "cmso", "Accept": "application/json"}
        if cfg.credentials_file:
            secret = Path(cfg.credentials_file).read_text().strip().encode()
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        client = Http1Client(
            cfg.url,
            headers,
            cfg.connect_timeout_s,
            cfg.read_timeout_s,
            max_connections,
            ssl_context,
        )
        return cls(cfg.dispatch_path, cfg.status_path, client, cfg.url.rstrip("/"))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        path = self.dispatch_path.replace("{vnfName}", quote(vnf_name, safe=""))
        headers = {"X-TransactionId": key, "Content-Type": "application/json"}
        try:
            response = await self.client.request("POST", path, headers, request)
        except ConnectFailed as exc:
            raise NotDelivered(f"orchestrator at {self.where}: {exc}") from None
        except Broken as exc:  # sent (or partly): the orchestrator may have acted on it
            raise Unconfirmed(f"no answer from the orchestrator at {self.where}: {exc}") from None
        body = response.body
        try:
            if response.status == 201:
                answers = msgspec.json.decode(body, type=CmResponses).cmResponses
                for answer in answers:
                    if answer.vnfName == vnf_name and answer.orchestratorRequestId:
                        return answer.orchestratorRequestId
                raise PeerError(f"Response did not contain vnfName={vnf_name}: {excerpt(body)}")
            if response.status == 200:
                accepted = msgspec.json.decode(body, type=Accepted)
                if str(accepted.status) == "202":
                    return accepted.entity.requestReferences.requestId
        except msgspec.DecodeError:
            pass
        raise PeerError(f"HTTP {response.status}: {excerpt(body)}")

    async def statuses(self, request_ids: Sequence[str]) -> list[SoStatus | PeerError]:
        """Poll these work flows down one connection (pipelined, `peers/http1.py`); a failure
        is a PeerError for each one it left without an answer (a lost answer to a GET changes
        nothing)."""
        requests = [
            self.client.encode(
                "GET", self.status_path.replace("{requestId}", quote(request_id, safe=""))
            )
            for request_id in request_ids
        ]
        try:
            answers: list[Response] = await self.client.exchange(requests)
            failure = None
        except ConnectFailed as exc:
            answers, failure = [], f"cannot reach the orchestrator at {self.where}: {exc}"
        except Broken as exc:
            answers, failure = exc.got, f"no answer from the orchestrator at {self.where}: {exc}"
        results: list[SoStatus | PeerError] = [_status(a) for a in answers]
        results += [PeerError(failure or "")] * (len(request_ids) - len(answers))
        return results


_status_decoder = msgspec.json.Decoder(StatusResponse)


def _status(response: Response) -> SoStatus:
    if response.status != 200:
        return SoStatus(response.status, None, excerpt(response.body))
    try:
        answer = _status_decoder.decode(response.body)
    except msgspec.DecodeError:
        return SoStatus(200, None, f"Bad Response: {excerpt(response.body)}")
    status = answer.request.requestStatus if answer.request else None
    if status is None:
        return SoStatus(200, None, "Bad Response: no request.requestStatus")
    return SoStatus(200, status.requestState, status.statusMessage, status.finishTime)
