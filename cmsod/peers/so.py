"""The orchestrator (SO). `HttpSO` speaks CMSO's SO contract over HTTP; `LoopbackSO` is the
embedded default: it accepts every work flow and reports it `COMPLETE` once
`simulated_duration_s` has passed.

It is stateless on purpose: the request id carries the time the work flow finishes, so a
restarted daemon polling an id it handed out before the crash gets the right answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import msgspec

from cmsod.clock import WallClock
from cmsod.config import SoConfig
from cmsod.errors import NotDelivered, PeerError, Unconfirmed
from cmsod.peers import excerpt
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

    async def status(self, request_id: str) -> SoStatus: ...


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


@dataclass
class HttpSO:
    """The CMSO SO contract over HTTP: `POST {url}{dispatch_path}` with the element's stored
    request, `GET {url}{status_path}` to poll. One long-lived client (keep-alive, timeouts)."""

    url: str
    dispatch_path: str
    status_path: str
    client: httpx.AsyncClient

    @classmethod
    def from_config(cls, cfg: SoConfig, max_connections: int) -> HttpSO:
        auth = None
        if cfg.credentials_file:
            user, _, password = Path(cfg.credentials_file).read_text().strip().partition(":")
            auth = httpx.BasicAuth(user, password)
        client = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"X-FromAppId": "cmso", "Accept": "application/json"},
        )
        return cls(cfg.url.rstrip("/"), cfg.dispatch_path, cfg.status_path, client)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def dispatch(self, vnf_name: str, request: bytes, key: str) -> str:
        path = self.dispatch_path.replace("{vnfName}", quote(vnf_name, safe=""))
        response = await self._send(
            "POST",
            path,
            content=request,
            headers={"X-TransactionId": key, "Content-Type": "application/json"},
        )
        body = response.content
        try:
            if response.status_code == 201:
                answers = msgspec.json.decode(body, type=CmResponses).cmResponses
                for answer in answers:
                    if answer.vnfName == vnf_name and answer.orchestratorRequestId:
                        return answer.orchestratorRequestId
                raise PeerError(f"Response did not contain vnfName={vnf_name}: {excerpt(body)}")
            if response.status_code == 200:
                accepted = msgspec.json.decode(body, type=Accepted)
                if str(accepted.status) == "202":
                    return accepted.entity.requestReferences.requestId
        except msgspec.DecodeError:
            pass
        raise PeerError(f"HTTP {response.status_code}: {excerpt(body)}")

    async def status(self, request_id: str) -> SoStatus:
        path = self.status_path.replace("{requestId}", quote(request_id, safe=""))
        try:
            response = await self._send("GET", path)
        except NotDelivered as exc:
            raise PeerError(str(exc)) from exc
        except Unconfirmed as exc:  # a lost answer to a GET changes nothing: try again later
            raise PeerError(str(exc)) from exc
        if response.status_code != 200:
            return SoStatus(response.status_code, None, excerpt(response.content))
        try:
            answer = msgspec.json.decode(response.content, type=StatusResponse)
        except msgspec.DecodeError:
            return SoStatus(200, None, f"Bad Response: {excerpt(response.content)}")
        status = answer.request.requestStatus if answer.request else None
        if status is None:
            return SoStatus(200, None, "Bad Response: no request.requestStatus")
        return SoStatus(200, status.requestState, status.statusMessage, status.finishTime)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.client.request(method, self.url + path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise NotDelivered(f"cannot reach the orchestrator at {self.url}: {exc!r}") from exc
        except httpx.HTTPError as exc:  # sent (or partly): the orchestrator may have acted on it
            raise Unconfirmed(f"no answer from the orchestrator at {self.url}: {exc!r}") from exc
