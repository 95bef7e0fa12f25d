"""The alert source of the alarm gate: Prometheus Alertmanager's API v2,
`GET /api/v2/alerts?active=true&silenced=false&inhibited=false&filter=...`, over the h11
client (peers/http1.py; [tls] applies). The answer is decoded into `wire.alertmanager`."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from urllib.parse import urlencode

import msgspec

from cmsod.alarms import Query
from cmsod.config import AlarmsConfig, shown_url
from cmsod.errors import PeerError
from cmsod.peers.http1 import Broken, ConnectFailed, Http1Client
from cmsod.wire.alertmanager import GettableAlert, GettableAlerts

ALERTS_PATH = "/api/v2/alerts"


class AlertSourceFailed(PeerError):
    """Alertmanager could not be asked, or answered something that is not its alerts."""


class AlertSourceUnreachable(AlertSourceFailed):
    """No connection to Alertmanager: the batch's other queries would fail the same way."""


class Alertmanager:
    def __init__(self, cfg: AlarmsConfig, ssl_context: ssl.SSLContext | None) -> None:
        headers = {"Accept": "application/json"}
        if cfg.credentials_file:
            secret = Path(cfg.credentials_file).read_text().strip().encode()
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        self.where = shown_url(cfg.url)
        self.client = Http1Client(
            cfg.url,
            headers,
            cfg.connect_timeout_s,
            cfg.read_timeout_s,
            cfg.max_concurrent,
            ssl_context if cfg.url.startswith("https") else None,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def alerts(self, query: Query) -> list[GettableAlert]:
        """The alerts matching every matcher of the query that are active, not silenced and
        not inhibited."""
        params = [("active", "true"), ("silenced", "false"), ("inhibited", "false")]
        params += [("filter", matcher) for matcher in query]
        path = f"{ALERTS_PATH}?{urlencode(params)}"
        try:
            response = await self.client.request("GET", path)
        except ConnectFailed as exc:
            raise AlertSourceUnreachable(f"Alertmanager at {self.where}: {exc}") from None
        except Broken as exc:
            raise AlertSourceFailed(f"Alertmanager at {self.where}: {exc}") from None
        if response.status != 200:
            text = response.body[:200].decode("utf-8", "replace")
            raise AlertSourceFailed(
                f"Alertmanager at {self.where} answered {response.status}: {text}"
            )
        try:
            return msgspec.json.decode(response.body, type=GettableAlerts)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise AlertSourceFailed(
                f"Alertmanager at {self.where}: not a list of alerts: {exc}"
            ) from None
