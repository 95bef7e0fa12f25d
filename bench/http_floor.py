"""The floor under any app on hypercorn here: a minimal ASGI app that answers every request
with a fixed body (no routing, no auth, no store), served by hypercorn's trio worker with
the daemon's settings (HTTP/1.1, no access log), under the same client as bench/http.py
(`--concurrent` connections at once, `--per-connection` kept-alive GETs each).
Usage: python bench/http_floor.py [--concurrent 1000] [--per-connection 5] [--bytes 1688]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root instead of bench/: bench/http.py's name would hide the standard `http`.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import socket  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402

from bench.machine import describe  # noqa: E402


def serve(sock: socket.socket, size: int) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    body = b"x" * size
    headers = [(b"content-type", b"application/json"), (b"content-length", str(size).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = config.errorlog = None
    config.alpn_protocols = ["http/1.1"]
    config.backlog = 1024
    trio.run(hypercorn_serve, app, config)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=5)
    parser.add_argument("--bytes", type=int, default=1688)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    server = multiprocessing.get_context("fork").Process(
        target=serve, args=(sock, args.bytes), daemon=True
    )
    server.start()
    from bench.http import concurrent_gets  # the same raw-socket client

    address = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        elapsed, size = trio.run(
            concurrent_gets, address, "hello", args.concurrent, args.per_connection
        )
    finally:
        server.kill()
    total = args.concurrent * args.per_connection
    print(describe())
    print(
        f"minimal ASGI app on hypercorn (trio worker, HTTP/1.1): {args.concurrent} connections"
        f" x {args.per_connection} GETs ({size:,} bytes): {total:,} in {elapsed:.2f} s"
        f" = {total / elapsed:,.0f} requests/s"
    )


if __name__ == "__main__":
    main()
