"""`cmsod plan REQUEST.json`: plan a CMSO v1 request offline (no daemon, nothing stored) and
print CMSO's optimizer response; the objective and the solve time go to stderr."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

from cmsod import config, lifecycle, plans
from cmsod.errors import ConfigError, RequestError
from cmsod.optimize.planner import Options, Planning, optimizer_response
from cmsod.optimize.problem import Busy, problem_for
from cmsod.wire.cmso import ActiveTickets, ScheduleRequest, TicketData

EX_DATAERR, EX_NOINPUT, EX_CONFIG = 65, 66, 78


def read_unavailability(path: Path) -> dict[str, list[Busy]]:
    """CMSO's ActiveTicketsResponse (`{"elements": [...]}`) or a bare list of its entries."""
    data = path.read_bytes()
    try:
        tickets = msgspec.json.decode(data, type=list[TicketData])
    except msgspec.ValidationError:
        tickets = msgspec.json.decode(data, type=ActiveTickets).elements
    busy: dict[str, list[Busy]] = {}
    for ticket in tickets:
        try:
            start, end = (
                lifecycle.parse_time_ms(ticket.startTime),
                lifecycle.parse_time_ms(ticket.endTime),
            )
        except ValueError:
            raise ValueError(f"ticket {ticket.id}: bad startTime/endTime") from None
        for element in ticket.elementIds:
            busy.setdefault(element, []).append(Busy(start, end, f"ticket {ticket.id}"))
    return busy


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmsod plan", description=__doc__)
    parser.add_argument(
        "request", type=Path, metavar="REQUEST.json", help="CMSO v1 schedule request (JSON)"
    )
    parser.add_argument(
        "--unavailability",
        type=Path,
        metavar="FILE",
        help="tickets/blackouts: CMSO ActiveTicketsResponse JSON",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="for policies, inventory and the attribute limit",
    )
    parser.add_argument(
        "--at",
        metavar="TIME",
        help="plan as if now were this ISO-8601 time; without a zone, UTC (default: now)",
    )
    parser.add_argument("--json", action="store_true", help="one compact JSON document")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
        planning = Planning(
            config.load_policies(cfg.policies_dir),
            config.load_inventory(cfg.inventory_path),
            Options(cfg.optimizer.attribute or None, cfg.optimizer.attribute_limit or None),
            config.load_calendars(cfg),
        )
    except ConfigError as exc:
        print(f"cmsod plan: invalid config {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        request = msgspec.json.decode(args.request.read_bytes(), type=ScheduleRequest)
        busy = read_unavailability(args.unavailability) if args.unavailability else {}
        now_ms = lifecycle.parse_time_ms(args.at) if args.at else int(time.time() * 1000)
    except OSError as exc:
        print(f"cmsod plan: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EX_NOINPUT
    except (msgspec.DecodeError, ValueError) as exc:
        print(f"cmsod plan: {exc}", file=sys.stderr)
        return EX_DATAERR
    try:
        new = lifecycle.validate_request(request, cfg.optimizer.max_elements)
    except RequestError as exc:
        print(f"cmsod plan: {exc.status} {exc.message_id}: {exc.text}", file=sys.stderr)
        return EX_DATAERR
    if new.immediate:
        print(
            "cmsod plan: an immediate request (no change window) has nothing to plan",
            file=sys.stderr,
        )
        return EX_DATAERR
    problem = problem_for(new, now_ms, busy)
    result = planning.plan(problem)
    response = optimizer_response(problem, result)
    if args.json:
        sys.stdout.write(msgspec.json.encode(response).decode() + "\n")
    else:
        sys.stdout.write(
            msgspec.json.format(msgspec.json.encode(response), indent=2).decode() + "\n"
        )
    fingerprint = plans.of_placement(new.schedule_id, result.placed, result.duration_ms)
    print(
        f"objective {result.objective} ({len(result.placed)} scheduled, {len(result.unplaced)} not); "
        f"solved in {result.solve_ms:.1f} ms; plan {fingerprint or 'none'}",
        file=sys.stderr,
    )
    return 0
