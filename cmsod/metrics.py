"""The daemon's Prometheus metrics (docs/metrics.md lists them with their meaning).

Two kinds, on purpose:

- Counts of what happened while this process ran (transitions, peer calls, solve times,
  dispatch lateness): prometheus_client instruments in this daemon's own registry, fed from
  the few places where those things happen (the store's commit, the actors' peer calls).
  Counters start again at zero with the process, as Prometheus expects.
- Figures that must be right after a restart (schedules by status, the outboxes, actor
  restarts): read at scrape time from the store and the supervisor's figures, and handed to
  `exposition` as a `Snapshot`; nothing is kept here that could drift from the store.

No trio here and no I/O: the scrape reads the store off the event loop first
(`control/metrics.py`), then `exposition` only formats.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes: text format 0.0.4

# No `*_created` series beside every counter and histogram: they double the scrape and say
# only when this process started. (A process-wide switch of prometheus_client.)
disable_created_metrics()

# The gates that may hold an element back from dispatch (DESIGN.md §2.8); their series exist
# from the start, at 0, so a dashboard shows a gate that never held anything.
GATES = (  # cmsod.gates
    "immediate",
    "misfire",
    "stop",
    "freeze",
    "failures",
    "calendar",
    "blackout",
    "alarm",
    "ticket",
)
PEER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENESS_BUCKETS = (0.0, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
SOLVE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class Outbox:
    depth: int  # rows not yet sent
    oldest_age_s: float  # age of the oldest of them; 0 when there are none


@dataclass(frozen=True)
class Snapshot:
    """What a scrape reads from the store and the supervisor."""

    schedules: Mapping[str, int] = field(default_factory=dict)  # status -> count
    outboxes: Mapping[str, Outbox] = field(default_factory=dict)  # "events", "tickets"
    restarts: Mapping[str, int] = field(default_factory=dict)  # actor -> restarts
    held: Mapping[str, int] = field(default_factory=dict)  # gate -> elements it holds now
    gates_on: Mapping[str, bool] = field(default_factory=dict)  # switch-like gates: freeze


def cause(exc: BaseException) -> str:
    """An error's cause as a label value: the class name in snake case (NotDelivered ->
    not_delivered; a plain PeerError, a peer that answered badly -> peer_error)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


class Metrics:
    """One daemon's instruments, in a registry of its own (two daemons in one test process
    never mix their counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.element_transitions = Counter(
            "cmsod_element_transitions",
            "Elements that entered each status (committed transitions).",
            ["status"],
            registry=r,
        )
        self.schedule_transitions = Counter(
            "cmsod_schedule_transitions",
            "Schedules that entered each status (committed transitions).",
            ["status"],
            registry=r,
        )
        self.dispatch_lateness = Histogram(
            "cmsod_dispatch_lateness_seconds",
            "How long after an element's planned start (an immediate one's creation) its"
            " orchestrator call went out; early (the lead time) counts as 0.",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.peer_duration = Histogram(
            "cmsod_peer_call_duration_seconds",
            "Calls to the orchestrator (so), ticket system (tickets) and event sink (sink),"
            " failed ones included.",
            ["peer", "operation"],
            buckets=PEER_BUCKETS,
            registry=r,
        )
        self.peer_errors = Counter(
            "cmsod_peer_call_errors",
            "Failed peer calls by cause (not_delivered, unconfirmed, unavailable, peer_error, ...).",
            ["peer", "operation", "cause"],
            registry=r,
        )
        self.solve_duration = Histogram(
            "cmsod_optimizer_solve_seconds",
            "Time the optimizer took to plan one schedule.",
            buckets=SOLVE_BUCKETS,
            registry=r,
        )
        self.held = Gauge(
            "cmsod_elements_held",
            "Elements due now that a gate holds back from dispatch, by gate.",
            ["gate"],
            registry=r,
        )
        self.gate_on = Gauge(
            "cmsod_gate_on",
            "1 while a switch-like gate (pause, freeze, alarm, ...) is on, else 0.",
            ["gate"],
            registry=r,
        )
        self.alert_source_up = Gauge(
            "cmsod_alert_source_up",
            "1 while the alarm gate's Alertmanager answered its last queries, 0 while it"
            " failed (absent until first asked, or with no alarm gate).",
            registry=r,
        )
        self.set_gates({}, {})

    # -- the hooks --------------------------------------------------------------------------

    def transitions(self, changes: Iterable[tuple[str, str]]) -> None:
        """After a commit: ("schedule" | "element", new status) for each transition in it."""
        for kind, status in changes:
            counter = self.element_transitions if kind == "element" else self.schedule_transitions
            counter.labels(status).inc()

    @contextmanager
    def call(self, peer: str, operation: str) -> Iterator[None]:
        """Time one peer call; an exception is counted by its cause and passes on. A cancelled
        call (BaseException) is neither timed nor counted: it did not end."""
        began = time.monotonic()
        try:
            yield
        except Exception as exc:
            self.peer_duration.labels(peer, operation).observe(time.monotonic() - began)
            self.peer_failed(peer, operation, exc)
            raise
        self.peer_duration.labels(peer, operation).observe(time.monotonic() - began)

    def peer_failed(self, peer: str, operation: str, exc: BaseException) -> None:
        """A failure that came back as a value (a batch call's per-item answer)."""
        self.peer_errors.labels(peer, operation, cause(exc)).inc()

    def set_gates(self, held: Mapping[str, int], on: Mapping[str, bool]) -> None:
        """The one call for the dispatch gates: how many elements each gate holds now, and which
        switch-like gates are on. Gates not named are 0."""
        for gate in {*GATES, *held, *on}:
            self.held.labels(gate).set(held.get(gate, 0))
            self.gate_on.labels(gate).set(1 if on.get(gate) else 0)

    # -- the scrape -------------------------------------------------------------------------

    def exposition(self, snapshot: Snapshot) -> bytes:
        """The Prometheus text exposition of everything, with `snapshot`'s figures."""
        self.set_gates(snapshot.held, snapshot.gates_on)
        return generate_latest(_Scrape(self.registry, snapshot_families(snapshot)))


def snapshot_families(snapshot: Snapshot) -> list[Metric]:
    schedules = GaugeMetricFamily(
        "cmsod_schedules", "Schedules in the store by status.", labels=["status"]
    )
    for status, n in sorted(snapshot.schedules.items()):
        schedules.add_metric([status], n)
    depth = GaugeMetricFamily(
        "cmsod_outbox_depth",
        "Rows waiting to be sent: CM events (events), ticket operations (tickets).",
        labels=["outbox"],
    )
    age = GaugeMetricFamily(
        "cmsod_outbox_oldest_age_seconds",
        "Age of the oldest row waiting in each outbox; 0 when it is empty.",
        labels=["outbox"],
    )
    for name, box in sorted(snapshot.outboxes.items()):
        depth.add_metric([name], box.depth)
        age.add_metric([name], box.oldest_age_s)
    restarts = CounterMetricFamily(
        "cmsod_actor_restarts", "Times the supervisor restarted each actor.", labels=["actor"]
    )
    for actor, n in sorted(snapshot.restarts.items()):
        restarts.add_metric([actor], n)
    return [schedules, depth, age, restarts]


class _Scrape(Collector):
    """The registry's instruments and one scrape's snapshot families, for generate_latest."""

    def __init__(self, registry: CollectorRegistry, families: list[Metric]) -> None:
        self.registry = registry
        self.families = families

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from self.families
