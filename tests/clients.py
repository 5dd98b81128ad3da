"""WebSocket clients for the tests: the `websockets` library and picows."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import orjson
import websockets
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PONG = '{"type":"pong"}'


async def answer_ping(ws: websockets.ClientConnection) -> None:
    """Send PONG unless this side has started closing.

    On a closing connection `websockets` makes ``send`` wait until the close
    completes (up to its close_timeout), and a reader task waiting there stops
    reading: the relay's close frame, behind the rest of a lagging stream, is
    then never read and the connection ends as 1006 instead of 1000.
    """
    if ws.state is websockets.State.OPEN:
        await ws.send(PONG)


async def connect(url: str, **kwargs: Any) -> websockets.ClientConnection:
    """A `websockets` client; its own keepalive is off so only the relay's pings exist."""
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("max_size", 2**24)
    return await websockets.connect(url, **kwargs)


async def recv_json(ws: websockets.ClientConnection, timeout: float = 5.0) -> Any:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_events(ws: websockets.ClientConnection, n: int, timeout: float = 10.0,
                      answer_pings: bool = True) -> list[dict[str, Any]]:
    """The next ``n`` messages that are not pings (pings are answered)."""
    events: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(events) < n:
        remaining = deadline - asyncio.get_running_loop().time()
        message = orjson.loads(await asyncio.wait_for(ws.recv(), max(remaining, 0)))
        if message.get("type") == "ping":
            if answer_pings:
                await answer_ping(ws)
            continue
        events.append(message)
    return events


async def expect_silence(ws: websockets.ClientConnection, seconds: float) -> None:
    """Assert that nothing but pings arrives for ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            message = orjson.loads(await asyncio.wait_for(ws.recv(), remaining))
        except asyncio.TimeoutError:
            return
        assert message.get("type") == "ping", f"unexpected message {message}"


class Collector(WSListener):  # type: ignore[misc]
    """A picows client that keeps every non-ping message and answers pings."""

    def __init__(self, expected: int = 0, answer_pings: bool = True) -> None:
        self.messages: list[Any] = []
        self.expected = expected
        self.answer_pings = answer_pings
        self.done = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        if message.get("type") == "ping":
            if self.answer_pings:
                transport.send(WSMsgType.TEXT, PONG.encode())
            return
        self.messages.append(message)
        if self.expected and len(self.messages) >= self.expected and not self.done.done():
            self.done.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") != "initial"]


def raise_fd_limit() -> None:
    """Room for a thousand client sockets in the test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 8192):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))


async def picows_client(url: str, expected: int = 0, **kwargs: Any) -> Collector:
    _, listener = await ws_connect(lambda: Collector(expected, **kwargs), url)
    return listener  # type: ignore[no-any-return]
