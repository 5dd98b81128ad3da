"""`fastrelay tail`: print each event on one readable line as it arrives."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

__all__ = ["format_event", "tail"]

_PONG = b'{"type":"pong"}'


def format_event(event: Any) -> str:
    """One line for a relayed message: time, type, machine, state change, remaining fields."""
    if not isinstance(event, dict):
        return repr(event)
    ts = event.get("timestamp")
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "--:--:--"
    if isinstance(ts, float):
        clock += f".{int((ts % 1) * 1000):03d}"
    kind = event.get("type", "?")
    if kind == "initial":
        machines = event.get("machines") or []
        lines = [f"{clock} initial {len(machines)} machine(s)"]
        for m in machines:
            lines.append(f"    {m.get('id')}: {m.get('current_state')}")
        return "\n".join(lines)
    parts = [clock, str(kind)]
    if "machine_id" in event:
        parts.append(str(event["machine_id"]))
    if "state" in event:
        parts.append(f"{event.get('previous_state')} -> {event['state']}")
    rest = {k: v for k, v in event.items()
            if k not in ("type", "timestamp", "machine_id", "state", "previous_state")}
    if rest:
        parts.append(orjson.dumps(rest).decode())
    return " ".join(parts)


class _Printer(WSListener):
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        try:
            event = orjson.loads(frame.get_payload_as_bytes())
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict) and event.get("type") == "ping":
            transport.send(WSMsgType.TEXT, _PONG)
            return
        self.out.write(format_event(event) + "\n")
        self.out.flush()


def _with_token(url: str, token: str | None) -> str:
    if not token:
        return url
    parts = urlsplit(url)
    query = (parts.query + "&" if parts.query else "") + urlencode({"token": token})
    return urlunsplit(parts._replace(query=query))


async def _tail(url: str, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    delay = 0.5
    transport = None
    while not stop.is_set():
        try:
            transport, _ = await ws_connect(lambda: _Printer(out), url)
        except Exception as exc:  # refused, reset, handshake error: keep tailing
            print(f"# cannot connect to {url}: {exc}; retrying in {delay:.1f} s", file=sys.stderr)
        else:
            delay = 0.5
            print(f"# connected to {url}", file=sys.stderr)
            gone = asyncio.ensure_future(transport.wait_disconnected())
            await asyncio.wait({gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                transport.send_close(WSCloseCode.GOING_AWAY)
                transport.disconnect()
                gone.cancel()
                return
            print("# disconnected", file=sys.stderr)
        pause = delay * (0.5 + random.random())
        await asyncio.wait({stopping}, timeout=pause)
        delay = min(delay * 2, 10.0)


def tail(url: str, *, token: str | None = None, out: TextIO = sys.stdout) -> int:
    """Follow ``url`` until SIGINT or SIGTERM, reconnecting with backoff; returns the exit code."""
    asyncio.run(_tail(_with_token(url, token), out))
    return 0
