"""What the actors share: the live config, the store, the clock, the peers, the doorbells and
the figures `cmsoctl status` and the watchdog read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from cmsod.clock import MAX_STEP_S, WallClock
from cmsod.config import Config
from cmsod.errors import PeerError
from cmsod.executor import Executor, InlineExecutor
from cmsod.metrics import Metrics
from cmsod.optimize.planner import Options, Planning
from cmsod.peers.alerts import Alertmanager
from cmsod.peers.sinks import EventSink
from cmsod.peers.so import Orchestrator
from cmsod.peers.tm import TicketSystem
from cmsod.store import Store, outboxes
from cmsod.ticketing import NewTicket, Opened


class Doorbell:
    """A wake-up that coalesces: many rings before the actor looks count as one."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[None](1)

    def ring(self) -> None:
        try:
            self._send.send_nowait(None)
        except trio.WouldBlock:
            pass

    async def wait(self, timeout_s: float) -> bool:
        """Until rung (True) or `timeout_s` passed (capped, so actors heartbeat and see clock
        steps)."""
        with trio.move_on_after(max(0.0, min(timeout_s, MAX_STEP_S))):
            await self._receive.receive()
            return True
        return False


@dataclass
class Bells:
    optimizer: Doorbell = field(default_factory=Doorbell)
    tickets: Doorbell = field(default_factory=Doorbell)
    dispatcher: Doorbell = field(default_factory=Doorbell)
    poller: Doorbell = field(default_factory=Doorbell)
    emitter: Doorbell = field(default_factory=Doorbell)
    watch: Doorbell = field(default_factory=Doorbell)  # events stored, or a watcher came

    def all(self) -> list[Doorbell]:
        return [
            self.optimizer,
            self.tickets,
            self.dispatcher,
            self.poller,
            self.emitter,
            self.watch,
        ]

    def committed(self) -> None:
        """This daemon committed (any commit may carry events)."""
        self.emitter.ring()
        self.watch.ring()


WATCH_QUEUE = 256


class Watcher:
    """One `cmsoctl watch`: a bounded queue the watch feed (emitter.py) fills without ever
    waiting. A watcher that falls WATCH_QUEUE events behind is dropped (counted and logged),
    never waited for."""

    def __init__(self, schedule_id: str | None, event_type: str | None) -> None:
        self.schedule_id = schedule_id
        self.event_type = event_type
        self.send, self.receive = trio.open_memory_channel[bytes](WATCH_QUEUE)
        self.dropped = False

    def wants(self, schedule_id: str, event_type: str) -> bool:
        return (self.schedule_id in (None, schedule_id)) and (self.event_type in (None, event_type))


class TicketDesk:
    """Request/reply to the tickets actor: open these change tickets, or say why not. The
    control socket never calls a peer itself; an approval waits here for its tickets."""

    Request = tuple[str, str, list[NewTicket], trio.MemorySendChannel["Opened | PeerError"]]

    def __init__(self, requests: trio.MemorySendChannel[Request]) -> None:
        self._requests = requests

    async def open(
        self, schedule_id: str, user_id: str, tickets: list[NewTicket], timeout_s: float
    ) -> Opened:
        reply_send, reply_receive = trio.open_memory_channel["Opened | PeerError"](1)
        with reply_receive:
            with trio.move_on_after(timeout_s):
                await self._requests.send((schedule_id, user_id, tickets, reply_send))
                answer = await reply_receive.receive()
                if isinstance(answer, PeerError):
                    raise answer
                return answer
        raise PeerError(f"the ticket system did not open the tickets within {timeout_s:g} s")


@dataclass
class ActorFigures:
    heartbeat: float = 0.0  # trio time of the last turn of the actor's loop
    restarts: int = 0
    done: int = 0  # units of work finished (schedules planned, elements dispatched, ...)
    errors: int = 0
    last_error: str | None = None
    peer_failing: bool = False  # the last call to its peer (SO, TM, sink) failed


@dataclass
class AlertSourceState:
    """What the alarm gate's last look at the alert source found (for `status`)."""

    ok: bool | None = None  # None: not asked yet
    last_error: str | None = None
    asked_ms: int | None = None  # when it was last asked (wall clock, ms)
    queries: int = 0  # queries asked in total
    firing: int = 0  # of those, found firing alerts


@dataclass
class Context:
    config: Config
    store: Store
    clock: WallClock
    so: Orchestrator
    tm: TicketSystem
    sink: EventSink
    planning: Planning = field(default_factory=lambda: Planning({}, {}, Options()))
    compute: Executor = field(default_factory=InlineExecutor)  # where plans are solved
    bells: Bells = field(default_factory=Bells)
    figures: dict[str, ActorFigures] = field(default_factory=dict)
    stopping: trio.Event = field(default_factory=trio.Event)  # SIGTERM: take no new work
    drained: trio.Event = field(default_factory=trio.Event)  # no dispatch call in flight any more
    # Stopping: when the daemon asked for the outbox to be flushed (trio time), and that an
    # emitter pass begun after the ask found it empty.
    flush_asked_at: float | None = None
    flushed: trio.Event = field(default_factory=trio.Event)
    # Stopping: the REST listener answered what was in progress (set at once when it is off).
    http_drained: trio.Event = field(default_factory=trio.Event)
    reload: Callable[[], list[str]] | None = None  # set by the daemon; returns what changed
    # A reload changed the calendars: the dispatcher releases their holds (look again now).
    calendars_reloaded: bool = False
    watchers: set[Watcher] = field(default_factory=set)
    # Where the watchers stand in the stored events; None while nobody watches.
    tail: outboxes.Tail | None = None
    ticket_desk: TicketDesk | None = None  # set by the tickets actor when it starts
    watchers_dropped: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    alerts: Alertmanager | None = None  # the alarm gate's alert source, when configured
    alert_source: AlertSourceState = field(default_factory=AlertSourceState)

    def beat(self, actor: str) -> ActorFigures:
        figures = self.figures.setdefault(actor, ActorFigures())
        figures.heartbeat = trio.current_time()
        return figures
