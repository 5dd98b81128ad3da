"""The original relay design, kept as the benchmark's reference point.

This is the design fastrelay replaces, written the way it was meant to work
(not a strawman): a FastAPI app on uvicorn, one ``/ws/events`` WebSocket
endpoint, the datagram socket read one datagram at a time with
``loop.sock_recvfrom`` (which ties it to the stdlib asyncio loop: uvloop does
not implement that call), stdlib ``json``, a dict registry of machines, an
``initial`` snapshot on connect, a JSON ping every ``--ping-interval`` seconds,
and per event one awaited ``send_text`` (2 s timeout) to each client in turn.

Run: ``python bench/peers/original.py --port 3002 --socket /tmp/x.sock``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

__all__ = ["main", "build_app"]

DEFAULT_SOCKET = "/tmp/statemachine-events.sock"
SEND_TIMEOUT = 2.0


class Relay:
    """Registry, client set and the two background loops of the original design."""

    def __init__(self, socket_path: str, ping_interval: float) -> None:
        self.socket_path = socket_path
        self.ping_interval = ping_interval
        self.clients: set[WebSocket] = set()
        self.machines: dict[str, dict[str, Any]] = {}
        self.events = 0
        self.rejects = 0
        self.dropped_clients = 0
        self.sock: socket.socket | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "initial",
            "machines": list(self.machines.values()),
            "timestamp": time.time(),
        }

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

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def broadcast(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        dead: list[WebSocket] = []
        for ws in list(self.clients):
            try:
                await asyncio.wait_for(ws.send_text(text), SEND_TIMEOUT)
            except Exception:
                dead.append(ws)
        for ws in dead:
            if ws in self.clients:
                self.clients.discard(ws)
                self.dropped_clients += 1

    def update_registry(self, event: dict[str, Any]) -> None:
        machine_id = event.get("machine_id")
        if not isinstance(machine_id, str):
            return
        entry = self.machines.get(machine_id)
        if entry is None:
            entry = {"id": machine_id, "current_state": None}
            self.machines[machine_id] = entry
        if event.get("type") == "state_change" and "previous_state" not in event:
            event["previous_state"] = entry["current_state"]
        if "state" in event:
            entry["current_state"] = event["state"]
        entry["last_activity"] = event.get("timestamp", time.time())

    async def datagram_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            data, _addr = await loop.sock_recvfrom(self.sock, 4096)
            try:
                event = json.loads(data.decode())
            except (UnicodeDecodeError, ValueError):
                self.rejects += 1
                continue
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                self.rejects += 1
                continue
            self.events += 1
            self.update_registry(event)
            await self.broadcast(event)

    async def ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            await self.broadcast({"type": "ping", "timestamp": time.time()})


def _loop_name() -> str:
    loop_type = type(asyncio.get_running_loop())
    return f"{loop_type.__module__}.{loop_type.__name__}"


def build_app(relay: Relay) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        relay.open_socket()
        relay.tasks = [
            asyncio.create_task(relay.datagram_loop()),
            asyncio.create_task(relay.ping_loop()),
        ]
        yield
        for task in relay.tasks:
            task.cancel()
        relay.close_socket()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "backend": "original",
            "loop": _loop_name(),
            "clients": len(relay.clients),
            "machines": len(relay.machines),
            "events": relay.events,
            "rejects": relay.rejects,
            "dropped_clients": relay.dropped_clients,
        }

    @app.websocket("/ws/events")
    async def events(websocket: WebSocket) -> None:
        await websocket.accept()
        # Snapshot and registration in one step, so the client misses nothing
        # between the two; the send starts writing before the loop switches.
        relay.clients.add(websocket)
        try:
            await websocket.send_text(json.dumps(relay.snapshot()))
            while True:
                text = await websocket.receive_text()
                try:
                    msg = json.loads(text)
                except ValueError:
                    msg = text
                kind = msg.get("type") if isinstance(msg, dict) else msg
                if kind == "refresh":
                    await websocket.send_text(json.dumps(relay.snapshot()))
                # pong and anything else: nothing to do
        except WebSocketDisconnect:
            pass
        except Exception:
            pass
        finally:
            relay.clients.discard(websocket)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="original relay design (benchmark peer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3002)
    parser.add_argument("--socket", default=os.environ.get("FASTRELAY_SOCKET", DEFAULT_SOCKET))
    parser.add_argument("--ping-interval", type=float, default=10.0)
    args = parser.parse_args(argv)

    relay = Relay(args.socket, args.ping_interval)
    app = build_app(relay)
    print(
        f"original relay: ws://{args.host}:{args.port}/ws/events, socket {args.socket}, "
        f"loop asyncio, uvicorn {uvicorn.__version__}",
        flush=True,
    )
    # loop="asyncio": uvloop has no sock_recvfrom, which this design relies on.
    uvicorn.run(app, host=args.host, port=args.port, loop="asyncio", log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
