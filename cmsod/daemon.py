"""`cmsod`: the daemon. Loads the config, locks the state directory, opens the store, starts
the actors in dependency order under one root nursery, then the control socket, then says
READY=1.

One daemon per state directory: `<state_dir>/cmsod.lock` is held with flock(2) for the
process's whole life (the kernel lets go when it ends, kill -9 included) and names the
holder's pid. A second daemon on the same directory exits with EX_IN_USE before it opens the
store or starts anything, so it can neither re-publish the outbox nor reconcile the first
one's dispatches. (Daemons sharing a PostgreSQL store each have their own state directory;
cmsod/store/fleet.py decides who does what in the store.)

Signals: SIGTERM/SIGINT stop it (STOPPING=1, no new dispatches; in-flight calls, then
publishing the events already committed, get `shutdown_grace_s`; then a clean exit); SIGHUP
reloads the config like `cmsoctl reload`.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import os
import resource
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import trio

from cmsod import __version__, config, log, systemd
from cmsod.actors import dispatcher, emitter, optimizer, poller, supervisor, tickets
from cmsod.actors.context import Context
from cmsod.clock import WallClock
from cmsod.control import metrics, server
from cmsod.errors import ConfigError
from cmsod.executor import Executor, ThreadExecutor
from cmsod.optimize.planner import Options, Planning
from cmsod.peers import tls
from cmsod.peers.alerts import Alertmanager
from cmsod.peers.sinks import sink_for
from cmsod.peers.so import HttpSO, LoopbackSO
from cmsod.peers.tm import tm_for
from cmsod.rest import auth as rest_auth
from cmsod.rest import server as rest
from cmsod.store import Store, fleet, views
from cmsod.store.store import LeaseLost

EX_CONFIG = 78
LAPSE_MARGIN_S = 0.05  # a heartbeat for a lapsing lease comes this long after its end
EX_IN_USE = 75  # EX_TEMPFAIL: another cmsod holds the state directory; retry once it is gone
LOCK_NAME = "cmsod.lock"
ACTORS = [  # dependency order: what others wake comes up first
    ("emitter", emitter.run),
    ("tickets", tickets.run),
    ("poller", poller.run),
    ("dispatcher", dispatcher.run),
    ("optimizer", optimizer.run),
]


PEER_KEYS = ("mode", "url", "credentials_file", "connect_timeout_s", "read_timeout_s")
ALARM_PEER_KEYS = (
    "url",
    "credentials_file",
    "connect_timeout_s",
    "read_timeout_s",
    "max_concurrent",
)
# The event sink is built once from these (sink_for): a change would be read but not used.
EVENT_SINK_KEYS = (
    "sink",
    "url",
    "timeout_s",
    "credentials_file",
    "cloudevents_mode",
    "path",
    "max_file_bytes",
    "keep_files",
)


def planning_for(cfg: config.Config) -> Planning:
    """Policies, inventory, options and freeze calendars from the configuration; raises
    ConfigError."""
    options = Options(cfg.optimizer.attribute or None, cfg.optimizer.attribute_limit or None)
    return Planning(
        config.load_policies(cfg.policies_dir),
        config.load_inventory(cfg.inventory_path),
        options,
        config.load_calendars(cfg),
    )


def build_context(
    cfg: config.Config, clock: WallClock, executor: Executor | None = None
) -> Context:
    """The store, peers and doorbells for one daemon (tests build theirs the same way, with an
    InlineExecutor so that nothing runs in a thread under MockClock)."""
    threaded = executor is None
    executor = executor or ThreadExecutor()

    def own_thread() -> Executor:  # the sink and the solver each get theirs, not the store's
        return ThreadExecutor() if threaded else executor

    store = Store(
        cfg.store_location,
        executor,
        clock,
        cfg.events.topic,
        cfg.events.source,
        cfg.events.route_by,
        lease_s=cfg.store.lease_s,
    )
    ssl_context = tls.context(cfg.tls)  # one for every peer
    connections = cfg.dispatcher.max_concurrent + cfg.poller.max_concurrent
    ctx = Context(
        config=cfg,
        store=store,
        clock=clock,
        so=(
            HttpSO.from_config(cfg.so, connections, ssl_context)
            if cfg.so.mode == "http"
            else LoopbackSO(clock, cfg.so.simulated_duration_s)
        ),
        tm=tm_for(cfg.tickets, ssl_context),
        sink=sink_for(cfg, cfg.events_dir, own_thread(), ssl_context),
        planning=planning_for(cfg),
        compute=own_thread(),
        alerts=Alertmanager(cfg.alarms, ssl_context) if cfg.alarms.url else None,
    )
    store.on_commit = ctx.bells.committed
    store.on_ticket_ops = ctx.bells.tickets.ring
    store.on_transitions = ctx.metrics.transitions
    return ctx


def make_reload(
    ctx: Context, config_path: Path | None, state_dir: str | None, store_url: str | None = None
):
    def reload() -> list[str]:
        try:
            new = config.load(config_path, state_dir=state_dir, store_url=store_url)
            return apply(new, planning_for(new))
        except ConfigError as exc:
            log.error("config.reload_failed", reason=str(exc))
            raise

    def apply(new: config.Config, planning: Planning) -> list[str]:
        old = ctx.config
        fixed = [
            name
            for name, before, after in [
                ("store.path", old.store_path, new.store_path),
                ("store.url", old.store_url, new.store_url),
                # (the store's connections' timeouts are derived from it when they open)
                ("store.lease_s", old.store.lease_s, new.store.lease_s),
                ("daemon.socket", old.socket_path, new.socket_path),
                ("daemon.state_dir", old.state_dir, new.state_dir),
                ("metrics.listen", old.metrics.listen, new.metrics.listen),
                ("tls", old.tls, new.tls),  # the peers' one SSL context is built at start-up
            ]
            if before != after
        ]
        # The peers' clients are built once, from these: a change would be read but not used.
        fixed += [
            f"{section}.{key}"
            for section in ("so", "tickets")
            for key in PEER_KEYS
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
        ]
        fixed += [
            f"alarms.{key}"
            for key in ALARM_PEER_KEYS
            if getattr(old.alarms, key) != getattr(new.alarms, key)
        ]
        fixed += [
            f"events.{key}"
            for key in EVENT_SINK_KEYS
            if getattr(old.events, key) != getattr(new.events, key)
        ]
        # The HTTP listener is built once too (socket, TLS, hypercorn's limits).
        fixed += [
            f"http.{key}"
            for key in config.HttpConfig.__struct_fields__
            if getattr(old.http, key) != getattr(new.http, key)
        ]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} cannot change without a restart")
        changed = [
            f"{section}.{key}"
            for section in config.Config.__struct_fields__
            for key in getattr(new, section).__struct_fields__
            if getattr(getattr(new, section), key) != getattr(getattr(old, section), key)
        ]
        if planning.calendars != ctx.planning.calendars:
            # (the periods in force, also when only a calendar file's content changed); the
            # holds they made are looked at again at once, against the new ones
            if not any(c.startswith("calendars.") for c in changed):
                changed.append("calendars")
            ctx.calendars_reloaded = True
        ctx.config = new
        ctx.planning = planning
        ctx.store.topic, ctx.store.source = new.events.topic, new.events.source
        ctx.store.route_by = new.events.route_by
        if isinstance(ctx.so, LoopbackSO):
            ctx.so.simulated_duration_s = new.so.simulated_duration_s
        log.set_level(new.daemon.log_level)
        for bell in ctx.bells.all():
            bell.ring()
        log.info("config.reloaded", changed=",".join(changed) or "nothing")
        return changed

    return reload


async def status_line(ctx: Context) -> str:
    counts = await ctx.store.read(views.status_counts)
    active = sum(
        n
        for status, n in counts["schedules"].items()
        if status
        in (
            "Pending Schedule",
            "Optimization In Progress",
            "Pending Approval",
            "Accepted",
            "Scheduled",
            "Notifications Initiated",
        )
    )
    elements = counts["elements"]
    return (
        f"STATUS={active} active schedules, {elements.get('Scheduled', 0) + elements.get('Scheduled Immediate', 0)}"
        f" elements waiting, {elements.get('Triggered', 0)} running, {counts['eventsPending']} events pending"
    )


async def run(
    ctx: Context, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """The daemon's life inside trio: returns after a clean stop."""
    cfg = ctx.config
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    # The listeners are bound first: a port in use (or a bad credentials or TLS file) is a
    # configuration error refused at once, before the store is opened or any work started.
    metrics_listeners = await metrics.listen(ctx) if cfg.metrics.address is not None else None
    try:
        http_bound = rest.listen(cfg.http) if cfg.http.listen else None
    except BaseException:
        for listener in metrics_listeners or ():
            listener.socket.close()
        raise
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        await ctx.store.open()
        log.info(
            "store.opened",
            path=cfg.store_shown,
            migrated=",".join(map(str, ctx.store.migrations_applied)) or None,
        )
        if ctx.store.postgres and cfg.events.sink == "file":
            # whichever daemon holds the events lease writes them, in its own state directory
            log.warning(
                "events.file_sink_shared",
                reason="several daemons: each writes the event files only while it publishes,"
                " so they end up split across hosts; use events.sink http, cloudevents or kafka",
            )
        await _log_resumed(ctx)
        lost = trio.Event()
        try:
            await _join_fleet(ctx)
            ctx.store.on_lease_lost = lost.set
            async with trio.open_nursery() as root:
                root.start_soon(_fleet, ctx, lost)
                if ctx.store.postgres and isinstance(ctx.store.executor, ThreadExecutor):
                    # (not under MockClock: a thread blocked in LISTEN lets virtual time race)
                    root.start_soon(ctx.store.listen, functools.partial(_ring_all, ctx))
                for name, actor in ACTORS:
                    await root.start(supervisor.supervise, name, actor, ctx)
                if metrics_listeners is not None:
                    await root.start(metrics.serve, ctx, metrics_listeners)
                path = await root.start(server.serve, ctx)
                http = await root.start(rest.serve, ctx, http_bound) if http_bound else None
                if http is None:
                    ctx.http_drained.set()
                systemd.notify("READY=1", await status_line(ctx))
                log.info(
                    "daemon.ready",
                    socket=str(path),
                    http=http,
                    version=__version__,
                    pid=os.getpid(),
                )
                task_status.started(path)
                watchdog_s = systemd.watchdog_interval_s()
                if watchdog_s:
                    root.start_soon(supervisor.watchdog, ctx, watchdog_s, supervisor.STALL_S)
                root.start_soon(_status_updates, ctx)
                await _handle_signals(ctx, signals, root.cancel_scope)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for peer in (ctx.so, ctx.tm, ctx.sink):
                    if hasattr(peer, "aclose"):
                        await peer.aclose()
                if ctx.store.owner is not None and not ctx.store.lease_lost:
                    try:  # what it still polls goes to the others now, not after its lease
                        await ctx.store.tx(fleet.leave, ctx.store.owner)
                    except Exception as exc:
                        log.warning("fleet.leave_failed", reason=str(exc))
                await ctx.store.close()
            log.info("daemon.stopped")


async def _join_fleet(ctx: Context) -> None:
    """Register this daemon (fleet.py) and take over what lapsed daemons left; on SQLite (one
    daemon: the state directory's lock) whatever a previous process left."""
    store = ctx.store
    me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    lease_ms = int(ctx.config.store.lease_s * 1000)
    home = f"{socket.gethostname()}:{ctx.config.state_dir.resolve()}"
    await store.tx(fleet.register, me, socket.gethostname(), os.getpid(), lease_ms, home)
    store.owner = me
    if store.postgres:
        store.lease_until = trio.current_time() + lease_ms / 1000
    done = await store.tx(
        fleet.heartbeat, me, lease_ms, ctx.config.so.resend_unconfirmed, not store.postgres
    )
    _took_over(ctx, done)
    log.info("fleet.joined", daemon=me, leases=",".join(sorted(done.held)) or None)


def _took_over(ctx: Context, done: fleet.Round) -> None:
    gained = done.held - ctx.store.held_leases  # (another daemon left or lapsed)
    ctx.store.held_leases = done.held
    for name in done.reconciled:
        log.warning(
            "element.reconciled",
            vnf=name,
            action="resend" if ctx.config.so.resend_unconfirmed else "marked Error",
        )
    if done.gone:
        log.warning(
            "fleet.took_over",
            daemons=",".join(done.gone),
            reconciled=len(done.reconciled),
            polls=done.polls,
            plans=done.plans,
        )
    if done.gone or done.reconciled or done.polls or gained:
        for bell in ctx.bells.all():
            bell.ring()


def _ring_all(ctx: Context) -> None:
    """Another daemon stored work (NOTIFY): every actor looks at the store again, but the
    poller: it polls only this daemon's work flows, which another's commit never adds to
    (work taken over is this daemon's own heartbeat's, which rings it)."""
    for bell in ctx.bells.all():
        if bell is not ctx.bells.poller:
            bell.ring()


async def _fleet(ctx: Context, lost: trio.Event) -> None:
    """The heartbeat: renew this daemon's lease every third of it, take over lapsed daemons'
    work. Once its own work was taken over (LeaseLost, here or in any write) the daemon stops
    with an error: systemd starts it again, as a new daemon.

    It also beats just after the first other daemon's lease ends (a daemon alive renews long
    before): a dead daemon's work is taken over when its lease ends, within one lease of its
    death, not up to a third of a lease later at the next regular beat."""
    store = ctx.store
    assert store.owner is not None
    if not store.postgres:  # one daemon (the state directory's lock): nobody to take over
        await lost.wait()
    wait_s = ctx.config.store.lease_s / 3
    while not lost.is_set():
        lease_ms = int(ctx.config.store.lease_s * 1000)
        with trio.move_on_after(wait_s):
            await lost.wait()
        if lost.is_set():
            break
        try:
            began = trio.current_time()
            done = await store.tx(
                fleet.heartbeat, store.owner, lease_ms, ctx.config.so.resend_unconfirmed
            )
            store.lease_until = began + lease_ms / 1000
        except LeaseLost:
            break
        except Exception as exc:  # the database is away: try again at the next beat
            log.warning("fleet.heartbeat_failed", reason=str(exc))
            wait_s = ctx.config.store.lease_s / 3
            continue
        _took_over(ctx, done)
        wait_s = ctx.config.store.lease_s / 3
        if done.next_lapse_ms is not None:
            until_lapse_s = (done.next_lapse_ms - ctx.clock.now_ms()) / 1000 + LAPSE_MARGIN_S
            wait_s = max(LAPSE_MARGIN_S, min(wait_s, until_lapse_s))
    log.error("fleet.lease_lost", daemon=store.owner)
    raise LeaseLost(f"daemon {store.owner}: its work was taken over by another daemon")


async def _log_resumed(ctx: Context) -> None:
    """One line with the work this start takes over from the store (all 0 on a first start)."""
    counts = await ctx.store.read(views.status_counts)
    elements, schedules = counts["elements"], counts["schedules"]
    log.info(
        "daemon.resumed",
        scheduled=elements.get("Scheduled", 0) + elements.get("Scheduled Immediate", 0),
        running=elements.get("Triggered", 0),
        to_plan=schedules.get("Pending Schedule", 0) + schedules.get("Optimization In Progress", 0),
        events_pending=counts["eventsPending"],
    )


async def _status_updates(ctx: Context) -> None:
    while True:
        await trio.sleep(10)
        systemd.notify(await status_line(ctx))


async def _handle_signals(ctx: Context, signals, root_scope: trio.CancelScope) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            # CLOCK_MONOTONIC itself: trio's clock has an offset of its own
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
            try:
                assert ctx.reload is not None
                ctx.reload()
                systemd.notify("READY=1", "STATUS=configuration reloaded")
            except ConfigError as exc:
                systemd.notify("READY=1", f"STATUS=reload failed, old configuration kept: {exc}")
            continue
        systemd.notify("STOPPING=1")
        grace = ctx.config.daemon.shutdown_grace_s
        log.info("daemon.stopping", signal=signal.Signals(signum).name, grace_s=grace)
        ctx.stopping.set()
        ctx.bells.dispatcher.ring()
        with trio.move_on_after(grace):
            # no dispatch call in flight and their answers committed; then their events
            # published (a sink that is down leaves them for the next start: grace ends it)
            await ctx.drained.wait()
            ctx.flush_asked_at = trio.current_time()
            ctx.bells.emitter.ring()
            await ctx.flushed.wait()
            await ctx.http_drained.wait()  # REST requests in progress answered (its own grace)
        root_scope.cancel()
        return


def _raise_file_limit(wanted: int) -> None:
    """Enough descriptors for every allowed control connection plus the store and peers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class StateDirInUse(Exception):
    pass


def lock_state_dir(state_dir: Path) -> int:
    """Hold `<state_dir>/cmsod.lock` for this process's life and write our pid into it;
    returns the descriptor (kept open: closing it, or dying, releases the lock). Raises
    StateDirInUse naming the holder's pid if another process has it."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)  # no O_TRUNC: not ours yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise StateDirInUse(
            f"state directory {state_dir} is in use by cmsod pid {holder} (lock {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmsod",
        description="Change-management schedule optimizer daemon.",
        epilog=(
            "cmsod plan REQUEST.json [--unavailability FILE] [--json]: plan offline (see cmsod plan -h);"
            " cmsod http-user NAME LEVEL: a line for [http] credentials_file"
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (default: $CONFIGURATION_DIRECTORY/cmsod.toml or /etc/cmsod/cmsod.toml if present)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep everything (database, socket, events) under this folder, on the embedded defaults unless --config is given",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="a postgresql:// URL to share with other daemons, instead of [store] url (the"
        " password is better in a credentials file: $CREDENTIALS_DIRECTORY/store-url)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="only validate the configuration; exit 0 if good, 78 if not",
    )
    parser.add_argument("--version", action="version", version=f"cmsod {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        from cmsod import plan_cli

        return plan_cli.main(argv[1:])
    if argv[:1] == ["http-user"]:
        return rest_auth.main(argv[1:])
    args = parser().parse_args(argv)
    config_path = (
        args.config if args.config else (None if args.state_dir else config.default_config_path())
    )
    try:
        cfg = config.load(config_path, state_dir=args.state_dir, store_url=args.store)
        cfg.store_url  # noqa: B018 - a credential file that cannot be read is a config error
        planning_for(cfg)  # policy, inventory, TLS and credentials files are configuration too
        tls.context(cfg.tls)
        if cfg.so.credentials_file and not os.access(cfg.so.credentials_file, os.R_OK):
            raise ConfigError(f"so.credentials_file {cfg.so.credentials_file}: cannot read it")
        if cfg.alarms.credentials_file and not os.access(cfg.alarms.credentials_file, os.R_OK):
            raise ConfigError(
                f"alarms.credentials_file {cfg.alarms.credentials_file}: cannot read it"
            )
        if cfg.events.credentials_file and not os.access(cfg.events.credentials_file, os.R_OK):
            raise ConfigError(
                f"events.credentials_file {cfg.events.credentials_file}: cannot read it"
            )
        if cfg.http.listen:
            rest_auth.Credentials(Path(cfg.http.credentials_file)).load()
    except ConfigError as exc:
        print(f"cmsod: invalid config {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"cmsod: configuration ok ({config_path or 'embedded defaults'})")
        return 0
    try:
        # Before anything that reads or writes the state. On PostgreSQL the store is shared
        # (fleet.py guards it); the lock still keeps the socket and event files one daemon's.
        lock_state_dir(cfg.state_dir)
    except StateDirInUse as exc:
        print(f"cmsod: {exc}", file=sys.stderr)
        return EX_IN_USE
    except OSError as exc:
        print(f"cmsod: cannot lock state directory {cfg.state_dir}: {exc}", file=sys.stderr)
        return 1
    log.setup(cfg.daemon.log_level, cfg.daemon.log_format)
    _raise_file_limit(
        cfg.control.max_connections + cfg.http.max_connections + cfg.metrics.max_connections + 256
    )
    log.info(
        "daemon.started",
        version=__version__,
        config=str(config_path or "embedded defaults"),
        state_dir=str(cfg.state_dir),
    )

    async def start() -> None:
        ctx = build_context(cfg, WallClock())
        ctx.reload = make_reload(ctx, config_path, args.state_dir, args.store)
        await run(ctx)

    try:
        trio.run(start)
    except ConfigError as exc:  # found at start-up, before any work: a listen port in use
        print(f"cmsod: cannot start: {exc}", file=sys.stderr)
        systemd.notify(f"STATUS=refused: {exc}")
        return EX_CONFIG
    except Exception:
        log.error("daemon.failed", exc_info=True)
        systemd.notify("STATUS=failed, see the log")
        return 1
    return 0
