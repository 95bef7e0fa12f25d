"""Configuration: TOML file, then `CMSOD_SECTION__KEY` environment overrides, into frozen Structs.

Unknown keys are errors (a typo must not fall back to a default silently). Every error names the
key path, e.g. `Expected int, got str - at $.poller.interval_s`. Durations carry their unit in
the key (`_s`). The defaults here are the embedded defaults: loop-back peers, events to a file.
"""

from __future__ import annotations

import datetime
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from cmsod import calendars
from cmsod.errors import ConfigError
from cmsod.optimize.policies import BUILTIN as BUILTIN_POLICIES
from cmsod.optimize.policies import TIME_ZONE_KEYS, Policy, zone
from cmsod.ticketing import DEFAULT_DISPATCH_ALLOWED, DEFAULT_TEMPLATE
from cmsod.wire.cmso import DEFAULT_MAX_ELEMENTS, MAX_ELEMENTS

POLICY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")

Seconds = Annotated[float, msgspec.Meta(ge=0, le=10 * 365 * 86400)]
Positive = Annotated[float, msgspec.Meta(gt=0, le=86400)]


def shown_url(url: str) -> str:
    """A peer's URL as logs, status and /health show it: scheme://host[:port][/path], never a
    user:password or a query string."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url.partition("@")[2] if "@" in url else url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def no_credentials_in(key: str, url: str) -> None:
    """A user:password in a peer's URL would show in error texts, logs, status and /health:
    refused, pointing at the section's credentials file."""
    if "@" in urlsplit(url).netloc:
        section = key.partition(".")[0]
        raise ValueError(
            f"{key} must not carry user:password ({shown_url(url)}): it would show in logs,"
            f" status and /health; put the line user:password in a file named by"
            f" {section}.credentials_file"
        )


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class DaemonConfig(Section, frozen=True):
    state_dir: str = ""  # "" = $STATE_DIRECTORY, else /var/lib/cmsod
    socket: str = ""  # "" = $RUNTIME_DIRECTORY/control.sock, else <state_dir>/control.sock
    log_format: Literal["logfmt", "json"] = "logfmt"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_s: Seconds = 10.0


STORE_URL_CREDENTIAL = "store-url"  # $CREDENTIALS_DIRECTORY/store-url (systemd LoadCredential=)


class StoreConfig(Section, frozen=True):
    path: str = ""  # "" = <state_dir>/cmsod.sqlite3
    # PostgreSQL instead of SQLite, several daemons sharing it: postgresql://user@host/db.
    # "" = $CREDENTIALS_DIRECTORY/store-url if there, else SQLite at `path`.
    url: str = ""
    # PostgreSQL: a daemon not heard of for this long loses its work to the others (its
    # heartbeat renews the lease every third of it); a transaction of its left idle (frozen,
    # cut off) for a third of it is ended by the server. Changes need a restart.
    lease_s: Annotated[float, msgspec.Meta(ge=3, le=3600)] = 15.0

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("store.url must be a postgresql:// URL")


class OptimizerConfig(Section, frozen=True):
    interval_s: Positive = 10.0  # sweep period; a new schedule wakes the optimizer at once
    allow_partial: bool = False
    policies: str = ""  # folder of <name>.toml policies, added to the built-in four
    inventory: str = ""  # TOML file of element data (time zone, attributes); "" = none
    attribute: str = ""  # an element attribute to limit, e.g. "site"
    attribute_limit: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0  # 0 = no limit
    # elements per request (Schedules.Create, Schedules.Plan, cmsod plan), at most
    max_elements: Annotated[int, msgspec.Meta(ge=1, le=MAX_ELEMENTS)] = DEFAULT_MAX_ELEMENTS
    # a schedule left `Pending Approval` this long after its plan is `Expired`; 0 = once its
    # first slot has passed (its start + [dispatcher] misfire_grace_s)
    approval_timeout_s: Seconds = 0.0


class DispatcherConfig(Section, frozen=True):
    lead_time_s: Seconds = 1.0  # the SO call is made this long before the element's start
    misfire_grace_s: Seconds = 300.0  # later than start + grace is `Past due`, never dispatched
    dispatch_immediate: bool = True  # CMSO's cmso.cm.dispatch.immediate.enabled
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    # The failure threshold of a schedule whose request sets none (maxFailures,
    # maxFailureRatio in schedulingInfo): past it the rollout is Halted. -1 / 1.0: none.
    max_failures: Annotated[int, msgspec.Meta(ge=-1)] = -1
    max_failure_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0


class PollerConfig(Section, frozen=True):
    interval_s: Positive = 10.0  # each running work flow's status is asked this often
    jitter: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = 0.1  # +/- this fraction, spreads load
    error_backoff_max_s: Positive = 300.0  # connection errors: interval doubling up to this
    execution_timeout_s: Seconds = (
        86400.0  # no end state this long after dispatch: Failed; 0 = never
    )
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 50


PathTemplate = Annotated[str, msgspec.Meta(pattern=r"^/[^\s]*$", max_length=500)]


class SoConfig(Section, frozen=True):
    mode: Literal["loopback", "http"] = "loopback"
    simulated_duration_s: Seconds = 5.0  # loop-back: how long a work flow "runs"
    url: str = ""  # http: e.g. http://so:8080/onap/so/infra/orchestrationRequests/v7
    dispatch_path: PathTemplate = "/schedule/{vnfName}"
    status_path: PathTemplate = "/{requestId}"
    credentials_file: str = ""  # one line user:password for basic auth; "" = none
    connect_timeout_s: Positive = 5.0
    read_timeout_s: Positive = 30.0
    # A dispatch that never reached SO is tried again until the element's misfire grace ends,
    # waiting 0.25 s, 0.5 s, ... up to retry_max_s between tries.
    retry_max_s: Positive = 30.0
    connect_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3  # re-sends of an unconfirmed
    resend_unconfirmed: bool = False  # re-send an unconfirmed dispatch (the SO de-duplicates)
    pipeline_depth: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 32  # status GETs per write

    def __post_init__(self) -> None:
        if self.mode == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError("so.url must be an http:// or https:// URL when so.mode = 'http'")
        no_credentials_in("so.url", self.url)


TicketState = Annotated[str, msgspec.Meta(pattern=r"^[^|]*\|[^|]*$", max_length=200)]


class TicketsConfig(Section, frozen=True):
    # builtin: cmsod is the ticket system (tickets in SQLite, checked there); http: CMSO's TM
    # contract; loopback: approve everything, check nothing (for tests).
    mode: Literal["builtin", "http", "loopback"] = "builtin"
    vnfs_per_ticket: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 1
    # `approvalStatus|status` pairs that let an element be dispatched
    dispatch_allowed: tuple[TicketState, ...] = DEFAULT_DISPATCH_ALLOWED
    # ticket fields (category, type, summary, reason, description); domain data overrides
    template: dict[str, Annotated[str, msgspec.Meta(max_length=4096)]] = {}
    url: str = ""  # http: the ticket system's base URL
    create_path: PathTemplate = "/tm/create"
    get_path: PathTemplate = "/tm/get"
    update_path: PathTemplate = "/tm/update"
    close_path: PathTemplate = "/tm/close"  # cancel goes here too, as in CMSO
    active_path: PathTemplate = "/ticketmgt/v1/activetickets"
    credentials_file: str = ""  # one line user:password for basic auth; "" = none
    connect_timeout_s: Positive = 5.0
    read_timeout_s: Positive = 30.0
    connect_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    create_timeout_s: Positive = 60.0  # an approval waits this long for its tickets at most
    retry_base_s: Positive = 1.0  # a failed ticket operation is retried after this, doubling
    retry_max_s: Positive = 300.0

    def __post_init__(self) -> None:
        if self.mode == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError("tickets.url must be an http(s):// URL when tickets.mode = 'http'")
        no_credentials_in("tickets.url", self.url)
        unknown = set(self.template) - set(DEFAULT_TEMPLATE)
        if unknown:
            raise ValueError(
                f"tickets.template: unknown field(s) {sorted(unknown)}; "
                f"known: {sorted(DEFAULT_TEMPLATE)}"
            )


class EventsConfig(Section, frozen=True):
    sink: Literal["file", "http", "cloudevents", "kafka"] = "file"
    path: str = ""  # file: "" = <state_dir>/events; one <topic>.jsonl file per topic
    topic: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,200}$")] = "cm-events"
    source: str = "urn:onap:cmsod"
    route_by: str = ""  # a schedule domain-data name: its value v sends to <topic>-<v>
    # http: Message Router base URL; cloudevents: the receiver's URL; kafka: the Kafka REST
    # Proxy's (or Strimzi Kafka Bridge's) base URL, events going to POST {url}/topics/{topic}
    url: str = ""
    cloudevents_mode: Literal["binary", "batch"] = "binary"  # batch: one POST per batch
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 500
    timeout_s: Positive = 10.0
    retry_max_s: Positive = 10.0  # a failing sink is retried after 0.5 s, doubling up to this
    max_file_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024
    keep_files: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    credentials_file: str = ""  # http/cloudevents/kafka: one line user:password for basic auth

    def __post_init__(self) -> None:
        no_credentials_in("events.url", self.url)
        if self.sink != "file" and not self.url.startswith(("http://", "https://")):
            raise ValueError(
                f"events.url must be an http(s):// URL when events.sink = '{self.sink}'"
            )
        if self.sink == "kafka":
            path = urlsplit(self.url).path.rstrip("/")
            if path.endswith("/topics") or "/topics/" in path:
                raise ValueError(
                    "events.url must be the Kafka REST proxy's base URL (events go to "
                    f"POST {{url}}/topics/{{topic}}), without /topics: {self.url!r}"
                )
            if urlsplit(self.url).query:
                raise ValueError(f"events.url: no query string for the kafka sink: {self.url!r}")


class TlsConfig(Section, frozen=True):
    """How every https peer (SO, ticket system, event sinks) is trusted and authenticated:
    one SSL context built from this serves them all (peers/tls.py)."""

    ca_file: str = ""  # PEM file of the CAs to trust, instead of the system's; "" = the system's
    client_cert: str = ""  # PEM certificate (chain) shown to peers that ask for one; "" = none
    client_key: str = ""  # its private key, if not in client_cert
    verify: bool = True  # false: accept any certificate and host name (never in production)

    def __post_init__(self) -> None:
        if self.client_key and not self.client_cert:
            raise ValueError("tls.client_key is set but tls.client_cert is not")


class ControlConfig(Section, frozen=True):
    socket_mode: Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}$")] = "0660"
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = (
        16 * 1024 * 1024
    )
    idle_timeout_s: Positive = 60.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1024
    socket_group: str = ""  # chgrp the socket to this group; "" = the daemon's own group
    # Who may change state. root and the daemon's own user always may; members of
    # `operator_group` may too; everyone else who can open the socket gets `others`.
    operator_group: str = ""
    others: Literal["read-only", "operator"] = "read-only"


# host:port, the host an IPv4 address, a name, or an IPv6 address in brackets; "" = off
ListenAddress = Annotated[
    str,
    msgspec.Meta(pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", max_length=300),
]


class MetricsConfig(Section, frozen=True):
    listen: ListenAddress = ""  # e.g. "127.0.0.1:9464"; "" = no /metrics listener
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 16
    timeout_s: Positive = 10.0  # a scrape must send its request and take its answer in this

    def __post_init__(self) -> None:
        if self.listen and not 0 <= int(self.listen.rpartition(":")[2]) <= 65535:
            raise ValueError("metrics.listen: the port must be 0 to 65535")

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, None when off."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class HttpConfig(Section, frozen=True):
    """CMSO's REST API (cmsod/rest): off unless `listen` is set."""

    listen: str = ""  # "host:port", e.g. "0.0.0.0:8443"; "" = no HTTP listener
    credentials_file: str = ""  # users and their salted password hashes (cmsod http-user)
    certfile: str = ""  # TLS: both files given = HTTPS only
    keyfile: str = ""
    client_ca: str = ""  # mutual TLS: client certificates signed by this CA name a user
    require_client_cert: bool = False  # with client_ca: refuse clients without a certificate
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 16 * 1024 * 1024
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 16 * 1024
    request_timeout_s: Positive = 30.0  # the whole request body must arrive within this
    idle_timeout_s: Positive = 5.0  # a kept-alive connection with no request is closed
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 2048

    def __post_init__(self) -> None:
        if not self.listen:
            return
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"http.listen must be host:port, not {self.listen!r}")
        if not self.credentials_file:
            raise ValueError("http.credentials_file is needed when http.listen is set")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("http.certfile and http.keyfile go together")
        if self.client_ca and not self.certfile:
            raise ValueError("http.client_ca needs http.certfile and http.keyfile (TLS)")
        if self.require_client_cert and not self.client_ca:
            raise ValueError("http.require_client_cert needs http.client_ca")


class CalendarsConfig(Section, frozen=True):
    """Freeze calendars: periods no change may run in (cmsod/calendars.py has the format)."""

    # TOML files of [[deny]] periods, read at start-up and by every reload
    files: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=4096)], ...],
        msgspec.Meta(max_length=calendars.MAX_FILES),
    ] = ()
    timezone: Annotated[str, msgspec.Meta(max_length=100)] = "UTC"  # of the inline periods
    # inline periods, as in a file: [[calendars.deny]] name = ..., date = ... or from/to
    deny: Annotated[tuple[calendars.Deny, ...], msgspec.Meta(max_length=calendars.MAX_PERIODS)] = ()

    def __post_init__(self) -> None:
        self.inline()  # said now, naming the period and the field

    def inline(self) -> list[calendars.Period]:
        content = calendars.CalendarFile(list(self.deny), self.timezone)
        return calendars.compile_file(content, "cmsod.toml")


MatcherTemplate = Annotated[
    str,
    msgspec.Meta(pattern=r'^[A-Za-z_][A-Za-z0-9_]*(=|!=|=~|!~)"([^"\\]|\\.)*"$', max_length=1000),
]


class AlarmsConfig(Section, frozen=True):
    """The alarm gate: Prometheus Alertmanager (API v2) is asked before each dispatch whether
    alerts fire on the element or its site (cmsod/peers/alerts.py)."""

    url: str = ""  # e.g. http://alertmanager:9093; "" = no alarm gate
    # Each query is a list of matchers, ANDed (Alertmanager's filter); the element is held
    # when any query finds an active alert. `{name}` is one of the element's attributes
    # (`{vnfName}` its name); a query naming an attribute the element lacks is skipped for it.
    queries: Annotated[
        tuple[
            Annotated[tuple[MatcherTemplate, ...], msgspec.Meta(min_length=1, max_length=20)], ...
        ],
        msgspec.Meta(max_length=20),
    ] = (('instance="{vnfName}"',),)
    on_error: Literal["hold", "go"] = "hold"  # Alertmanager unreachable or a bad answer
    recheck_s: Positive = 60.0  # a held element is asked about again after this
    connect_timeout_s: Positive = 2.0
    read_timeout_s: Positive = 5.0
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8  # queries at once
    credentials_file: str = ""  # one line user:password for basic auth; "" = none

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError("alarms.url must be an http:// or https:// URL")
        no_credentials_in("alarms.url", self.url)


class SupervisorConfig(Section, frozen=True):
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5
    window_s: Positive = 60.0
    backoff_max_s: Positive = 10.0


class Config(Section, frozen=True):
    daemon: DaemonConfig = DaemonConfig()
    store: StoreConfig = StoreConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    dispatcher: DispatcherConfig = DispatcherConfig()
    poller: PollerConfig = PollerConfig()
    so: SoConfig = SoConfig()
    tickets: TicketsConfig = TicketsConfig()
    events: EventsConfig = EventsConfig()
    tls: TlsConfig = TlsConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    http: HttpConfig = HttpConfig()
    calendars: CalendarsConfig = CalendarsConfig()
    alarms: AlarmsConfig = AlarmsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()

    # -- derived paths ------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir or os.environ.get("STATE_DIRECTORY") or "/var/lib/cmsod")

    @property
    def socket_path(self) -> Path:
        if self.daemon.socket:
            return self.state_dir / self.daemon.socket
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        return Path(runtime) / "control.sock" if runtime else self.state_dir / "control.sock"

    @property
    def store_path(self) -> Path:
        return self.state_dir / (self.store.path or "cmsod.sqlite3")

    @property
    def store_url(self) -> str:
        """The PostgreSQL URL ([store] url, else the systemd credential), "" for SQLite."""
        if self.store.url:
            return self.store.url
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            path = Path(credentials) / STORE_URL_CREDENTIAL
            try:
                url = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                return ""
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
            if not url.startswith(("postgresql://", "postgres://")):
                raise ConfigError(f"{path}: not a postgresql:// URL")
            return url
        return ""

    @property
    def store_location(self) -> str:
        """What the Store opens: the PostgreSQL URL, else the SQLite file."""
        return self.store_url or str(self.store_path)

    @property
    def store_shown(self) -> str:
        """The store as it may be logged or shown: never the password."""
        from cmsod.store.backend import redact

        return redact(self.store_url) if self.store_url else str(self.store_path)

    @property
    def events_dir(self) -> Path:
        return self.state_dir / (self.events.path or "events")

    @property
    def policies_dir(self) -> Path | None:
        return _configured(self.optimizer.policies, "policies", Path.is_dir)

    @property
    def inventory_path(self) -> Path | None:
        return _configured(self.optimizer.inventory, "inventory.toml", Path.is_file)


def _configured(value: str, default_name: str, exists: Callable[[Path], bool]) -> Path | None:
    """A configured path, else <$CONFIGURATION_DIRECTORY or /etc/cmsod>/<default_name> if it
    exists, else None."""
    if value:
        return Path(value)
    candidate = Path(os.environ.get("CONFIGURATION_DIRECTORY") or "/etc/cmsod") / default_name
    return candidate if exists(candidate) else None


def load_policies(directory: Path | None) -> dict[str, Policy]:
    """The built-in policies, then every <name>.toml in the folder (which may replace one);
    a bad file is a ConfigError naming the file and the key."""
    policies: dict[str, Policy] = dict(BUILTIN_POLICIES)
    if directory is None:
        return policies
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such policy folder")
    for path in sorted(directory.glob("*.toml")):
        if not POLICY_NAME.match(path.stem):
            raise ConfigError(f"{path}: a policy file name must be a plain name")
        try:
            policy = msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), Policy)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (msgspec.ValidationError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        policies[path.stem] = msgspec.structs.replace(policy, name=path.stem)
    return policies


class Inventory(msgspec.Struct, forbid_unknown_fields=True):
    elements: dict[
        Annotated[str, msgspec.Meta(max_length=1024)],
        dict[
            Annotated[str, msgspec.Meta(max_length=256)],
            Annotated[str, msgspec.Meta(max_length=1024)],
        ],
    ] = {}


def load_inventory(path: Path | None) -> dict[str, dict[str, str]]:
    """Element data by element name: `[elements."node1"]` tables of `timezone = ...`, `site = ...`."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        elements = msgspec.convert(data, Inventory).elements
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for name, element_data in elements.items():  # said now, naming it, not at each plan
        for key in (k for k in TIME_ZONE_KEYS if k in element_data):
            try:
                zone(element_data[key])
            except ValueError as exc:
                raise ConfigError(f"{path}: element {name!r}: {exc}") from None
    return elements


def _toml_times(value: object) -> object:
    """TOML's own dates and local times as the strings a calendar period takes."""
    if isinstance(value, dict):
        return {k: _toml_times(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_toml_times(v) for v in value]
    if isinstance(value, datetime.datetime):  # one with an offset: refused, as a string
        return value.strftime("%Y-%m-%dT%H:%M") if value.tzinfo is None else value.isoformat()
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def _deny_line(text: str, index: int) -> str:
    """Where the index-th [[deny]] table starts in a file, as ' (line N)'."""
    heads = [
        n
        for n, line in enumerate(text.splitlines(), 1)
        if re.match(r"^\s*\[\[\s*(calendars\s*\.\s*)?deny\s*\]\]", line)
    ]
    return f" (line {heads[index]})" if 0 <= index < len(heads) else ""


def load_calendars(cfg: Config) -> calendars.Calendars:
    """Every deny period: the files of [calendars] in order, then the inline ones. A bad one
    is a ConfigError naming the file, the line of its [[deny]] table and the field."""
    periods: list[calendars.Period] = []
    for name in cfg.calendars.files:
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
            data = _toml_times(tomllib.loads(text))
        except OSError as exc:
            raise ConfigError(f"calendar {path}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"calendar {path}: not valid TOML: {exc}") from None
        try:
            content = msgspec.convert(data, calendars.CalendarFile)
            periods += calendars.compile_file(content, path.name)
        except (msgspec.ValidationError, ValueError) as exc:
            index = re.search(r"deny\[(\d+)\]", str(exc))
            line = _deny_line(text, int(index.group(1))) if index else ""
            raise ConfigError(f"calendar {path}{line}: {exc}") from None
    return calendars.Calendars((*periods, *cfg.calendars.inline()))


ENV_PREFIX = "CMSOD_"


def default_config_path() -> Path | None:
    """$CONFIGURATION_DIRECTORY/cmsod.toml under systemd, else /etc/cmsod/cmsod.toml if present."""
    conf_dir = os.environ.get("CONFIGURATION_DIRECTORY")
    candidate = Path(conf_dir) / "cmsod.toml" if conf_dir else Path("/etc/cmsod/cmsod.toml")
    return candidate if candidate.exists() else None


def load(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    state_dir: str | None = None,
    store_url: str | None = None,
) -> Config:
    """Read the file (None: embedded defaults), apply env overrides, then a --state-dir flag."""
    env = os.environ if env is None else env
    data: dict = {}
    where = "embedded defaults"
    if path is not None:
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = _toml_times(tomllib.loads(text))  # type: ignore[assignment]
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        try:
            msgspec.convert(data, Config)
        except msgspec.ValidationError as exc:
            index = re.search(r"deny\[(\d+)\]", str(exc))
            line = _deny_line(text, int(index.group(1))) if index else ""
            raise ConfigError(f"{where}{line}: {exc}") from None

    overrides = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if not section or not key:
            continue
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{name}: [{section}] is not a table")
        data[section][key] = value
        overrides.append(name)
    if state_dir is not None:
        data.setdefault("daemon", {})["state_dir"] = state_dir
    if store_url is not None:
        data.setdefault("store", {})["url"] = store_url
    try:
        # Environment values are strings: convert them loosely ("5" -> 5, "true" -> True).
        return msgspec.convert(data, Config, strict=not overrides)
    except msgspec.ValidationError as exc:
        source = f"{where} with {', '.join(sorted(overrides))}" if overrides else where
        raise ConfigError(f"{source}: {exc}") from None
