"""The change-ticket system (TM).

`HttpTM` speaks CMSO's TM contract (reference/cmso.md §6): every call a POST with basic auth;
create answers `{"changeId"}`, get answers the ticket, update/close answer 200, and a close of
a ticket TM already closed (400 SVC40006 "... is in Closed status") counts as done. It also
asks TM's active-tickets service when elements are unavailable (§4.2 step 2).

`LocalTM` serves the `builtin` and `loopback` modes: cmsod itself is the ticket system, so a
ticket is created by naming it and every later operation is already done by the transaction
that recorded it (tests/test_tickets.py shows both modes against the HTTP one).
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import msgspec

from cmsod.config import TicketsConfig
from cmsod.errors import NotDelivered, PeerError, Unavailable, Unconfirmed
from cmsod.peers import excerpt
from cmsod.ticketing import APPROVED, OPEN, Op
from cmsod.wire.cmso import TicketData
from cmsod.wire.tm import (
    ActiveTicketsRequest,
    ActiveTicketsResponse,
    Created,
    TicketInfo,
    already_closed,
)


class TicketsFailed(PeerError):
    """TM answered the active-tickets request with FAILED: the schedule cannot be planned."""


class TicketSystem(Protocol):
    async def create(self, body: dict[str, Any]) -> str:
        """Open a change ticket; return its changeId, or raise PeerError."""
        ...

    async def get(self, change_id: str) -> tuple[str | None, str | None]:
        """The ticket's (approvalStatus, status); PeerError when it cannot be found."""
        ...

    async def send(self, op: Op, body: bytes) -> None:
        """Update, close or cancel; PeerError to be retried later."""
        ...

    async def active_tickets(self, request: ActiveTicketsRequest) -> list[TicketData]: ...


class LocalTM:
    async def create(self, body: dict[str, Any]) -> str:
        return f"CHG{uuid.uuid4().hex[:12].upper()}"

    async def get(self, change_id: str) -> tuple[str | None, str | None]:
        return APPROVED, OPEN

    async def send(self, op: Op, body: bytes) -> None:
        return None

    async def active_tickets(self, request: ActiveTicketsRequest) -> list[TicketData]:
        return []  # the ticket book in the store is the source (book.book_busy)


@dataclass
class HttpTM:
    url: str
    cfg: TicketsConfig
    client: httpx.AsyncClient

    @classmethod
    def from_config(cls, cfg: TicketsConfig, ssl_context: ssl.SSLContext) -> HttpTM:
        auth = None
        if cfg.credentials_file:
            user, _, password = Path(cfg.credentials_file).read_text().strip().partition(":")
            auth = httpx.BasicAuth(user, password)
        client = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=cfg.max_concurrent, max_keepalive_connections=cfg.max_concurrent
            ),
            headers={"X-FromAppId": "cmso", "Accept": "application/json"},
            verify=ssl_context,  # the one TLS configuration of every peer (peers/tls.py)
            trust_env=False,  # every peer is reached directly, as SO is
        )
        return cls(cfg.url.rstrip("/"), cfg, client)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def create(self, body: dict[str, Any]) -> str:
        response = await self._post(self.cfg.create_path, msgspec.json.encode(body))
        if response.status_code == 200:
            try:
                change_id = msgspec.json.decode(response.content, type=Created).changeId
            except msgspec.DecodeError:
                change_id = None
            if change_id:
                return change_id
            raise PeerError(f"no changeId in TM's answer: {excerpt(response.content)}")
        raise PeerError(f"TM answered HTTP {response.status_code}: {excerpt(response.content)}")

    async def get(self, change_id: str) -> tuple[str | None, str | None]:
        response = await self._post(self.cfg.get_path, msgspec.json.encode({"changeId": change_id}))
        if response.status_code >= 500:
            raise Unavailable(
                f"TM answered HTTP {response.status_code}: {excerpt(response.content)}"
            )
        if response.status_code != 200:
            raise PeerError(f"TM answered HTTP {response.status_code}: {excerpt(response.content)}")
        try:
            info = msgspec.json.decode(response.content, type=TicketInfo)
        except msgspec.DecodeError as exc:
            raise PeerError(
                f"TM's answer does not decode ({exc}): {excerpt(response.content)}"
            ) from None
        return info.approvalStatus, info.status

    async def send(self, op: Op, body: bytes) -> None:
        path = self.cfg.update_path if op in (Op.UPDATE, Op.RESCHEDULE) else self.cfg.close_path
        response = await self._post(path, body)
        if response.status_code == 200:
            return
        if (
            response.status_code == 400
            and op in (Op.CLOSE, Op.CANCEL)
            and already_closed(response.content)
        ):
            return
        raise PeerError(f"TM answered HTTP {response.status_code}: {excerpt(response.content)}")

    async def active_tickets(self, request: ActiveTicketsRequest) -> list[TicketData]:
        response = await self._post(self.cfg.active_path, msgspec.json.encode(request))
        if response.status_code != 200:
            raise PeerError(
                f"active tickets: TM answered HTTP {response.status_code}: "
                f"{excerpt(response.content)}"
            )
        try:
            answer = msgspec.json.decode(response.content, type=ActiveTicketsResponse)
        except msgspec.DecodeError as exc:
            raise PeerError(f"active tickets: the answer does not decode: {exc}") from None
        if answer.status == "FAILED":
            raise TicketsFailed(f"active tickets: TM answered FAILED: {answer.errorMessage or ''}")
        if answer.status != "COMPLETED":
            raise PeerError(f"active tickets: TM answered {answer.status}, not COMPLETED")
        return answer.elements

    async def _post(self, path: str, body: bytes) -> httpx.Response:
        try:
            return await self.client.post(
                self.url + path, content=body, headers={"Content-Type": "application/json"}
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise NotDelivered(f"cannot reach the ticket system at {self.url}: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise Unconfirmed(f"no answer from the ticket system at {self.url}: {exc!r}") from exc


def tm_for(cfg: TicketsConfig, ssl_context: ssl.SSLContext) -> TicketSystem:
    return HttpTM.from_config(cfg, ssl_context) if cfg.mode == "http" else LocalTM()
