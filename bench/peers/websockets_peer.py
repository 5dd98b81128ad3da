"""The idiomatic alternative to fastrelay: the ``websockets`` library.

What a careful Python developer would write with the library's current API
(``websockets.asyncio.server.serve``): the datagram socket read with
``loop.add_reader`` and non-blocking ``recv`` (drained until EAGAIN, so it runs
on uvloop as well as asyncio), orjson to parse and serialize,
``websockets.asyncio.server.broadcast()`` to fan each event out (it never
waits on a client), a dict registry, an ``initial`` snapshot on connect and a
JSON ping every ``--ping-interval`` seconds. The library's own defaults are
kept (keepalive pings every 20 s, write limits, compression offered).

Run: ``python bench/peers/websockets_peer.py --port 3002 --socket /tmp/x.sock``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import os
import signal
import socket
import stat
import sys
import time
from typing import Any

import websockets
import websockets.version
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def _loads(data: str | bytes) -> Any:
        return orjson.loads(data)

    JSON_LIB = "orjson"
except ImportError:  # pragma: no cover - orjson is in bench/requirements.txt
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def _loads(data: str | bytes) -> Any:
        return json.loads(data)

    JSON_LIB = "json"

__all__ = ["main"]

DEFAULT_SOCKET = "/tmp/statemachine-events.sock"
MAX_DATAGRAM = 65536
# Bounded drain per wakeup, so a flood of datagrams cannot starve the clients.
DRAIN_BATCH = 256


def _loop_name() -> str:
    loop_type = type(asyncio.get_running_loop())
    return f"{loop_type.__module__}.{loop_type.__name__}"


class Relay:
    def __init__(self, socket_path: str, path: str, ping_interval: float) -> None:
        self.socket_path = socket_path
        self.path = path
        self.ping_interval = ping_interval
        self.clients: set[ServerConnection] = set()
        self.machines: dict[str, dict[str, Any]] = {}
        self.events = 0
        self.rejects = 0
        self.sock: socket.socket | None = None

    # -- datagrams ---------------------------------------------------------
    def open_socket(self) -> None:
        path = self.socket_path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise SystemExit(f"error: {path} exists and is not a socket")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self.on_readable)

    def close_socket(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def on_readable(self) -> None:
        assert self.sock is not None
        recv = self.sock.recv
        for _ in range(DRAIN_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            self.handle(data)

    def handle(self, data: bytes) -> None:
        try:
            event = _loads(data)
        except ValueError:
            self.rejects += 1
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.rejects += 1
            return
        self.events += 1
        machine_id = event.get("machine_id")
        if isinstance(machine_id, str):
            entry = self.machines.get(machine_id)
            if entry is None:
                entry = self.machines[machine_id] = {"id": machine_id, "current_state": None}
            if event["type"] == "state_change" and "previous_state" not in event:
                event["previous_state"] = entry["current_state"]
            if "state" in event:
                entry["current_state"] = event["state"]
            entry["last_activity"] = event.get("timestamp", time.time())
        broadcast(self.clients, _dumps(event), text=True)

    # -- clients -----------------------------------------------------------
    def snapshot(self) -> bytes:
        return _dumps({"type": "initial", "machines": list(self.machines.values()), "timestamp": time.time()})

    async def handler(self, ws: ServerConnection) -> None:
        # Snapshot, first frame and registration in one synchronous step:
        # broadcast() writes at once, so nothing can slip in between.
        broadcast([ws], self.snapshot(), text=True)
        self.clients.add(ws)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                kind: Any = message
                if message.startswith("{"):
                    with contextlib.suppress(ValueError):
                        parsed = _loads(message)
                        kind = parsed.get("type") if isinstance(parsed, dict) else None
                if kind == "refresh":
                    await ws.send(self.snapshot(), text=True)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.clients.discard(ws)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = _dumps(
                {
                    "status": "ok",
                    "backend": "websockets",
                    "loop": _loop_name(),
                    "json": JSON_LIB,
                    "clients": len(self.clients),
                    "machines": len(self.machines),
                    "events": self.events,
                    "rejects": self.rejects,
                }
            )
            headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return Response(http.HTTPStatus.OK.value, "OK", headers, body)
        if path != self.path:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            broadcast(self.clients, _dumps({"type": "ping", "timestamp": time.time()}), text=True)


async def run(args: argparse.Namespace) -> None:
    relay = Relay(args.socket, args.path, args.ping_interval)
    relay.open_socket()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ping_task = asyncio.create_task(relay.ping_loop())
    try:
        async with serve(
            relay.handler,
            args.host,
            args.port,
            process_request=relay.process_request,
            backlog=args.backlog,
        ):
            print(
                f"websockets relay: ws://{args.host}:{args.port}{args.path}, socket {args.socket}, "
                f"loop {_loop_name()}, websockets {websockets.version.version}, json {JSON_LIB}",
                flush=True,
            )
            await stop.wait()
    finally:
        ping_task.cancel()
        relay.close_socket()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="websockets-library relay (benchmark peer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3002)
    parser.add_argument("--socket", default=os.environ.get("FASTRELAY_SOCKET", DEFAULT_SOCKET))
    parser.add_argument("--path", default="/ws/events")
    parser.add_argument("--ping-interval", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=100, help="listen backlog (asyncio's default)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    args = parser.parse_args(argv)

    use_uvloop = args.loop == "uvloop"
    if args.loop == "auto":
        try:
            import uvloop  # noqa: F401

            use_uvloop = True
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
