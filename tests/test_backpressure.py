"""Backpressure (issue 9): big snapshots, refresh floods and PING floods stay bounded.

What the relay owes (DESIGN §2): a client's outbound bytes are bounded and a
client over the bound is closed (1013, or aborted after --send-timeout) while
the relay's memory stays bounded; a client that reads sees its ``initial``
first and then every event in order, none missing, none twice, however big
the snapshot and however slow its link. These tests make the situations the
issue reported (a snapshot that does not fit the socket at once, 100 refreshes
in one packet, a PING flood from a client that never reads) and check exactly
that, with real relays, real sockets and real clients.

What the relay holds is its own accounting, sampled from /healthz through each
scenario (relayproc.OwedWatch): ``owed_bytes_max``, the most one client is owed
(its queue plus its transport's write buffer). It may exceed
``--max-client-buffer`` by the batch that crossed the bound and, for a client
closed in the middle of a snapshot, by that snapshot's tail (a close frame may
not cut into a frame); never by more (:func:`owed_allowance`).

The scenario bodies take a ``link`` (netns.Loopback or netns.SlowLink), so
test_slowlink.py runs the same bodies over a 20 Mbit/s loopback.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from clients import answer_ping
from netns import Loopback
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from relayproc import OwedWatch
from waiting import poll, until

MiB = 1024 * 1024
PONG = b'{"type":"pong"}'
LOOPBACK = Loopback()


# -- waiting and the relay's accounting ---------------------------------------------------


async def health(relay: Any) -> dict[str, Any]:
    """/healthz without blocking the test's loop (over a slow link it can wait a while)."""
    result: dict[str, Any] = await relay.ahealth()
    return result


async def closed_for_backpressure(relay: Any) -> int:
    closed = (await health(relay))["closed"]
    return int(closed.get("slow", 0)) + int(closed.get("timeout", 0))


#: --batch-cap for scenarios with large events, so that one batch is small
#: next to --max-client-buffer and the bound below says something.
BATCH_CAP = 64


async def snapshot_bytes(relay: Any) -> int:
    """About the size of the relay's ``initial`` frame now: its registry plus the envelope."""
    status, body, _ = await asyncio.to_thread(relay.get, "/api/machines")
    assert status == 200, body[:200]
    return len(body) + 256


def owed_allowance(max_client_buffer: int, snapshot: int, batch_cap: int, event_frame: int) -> int:
    """The most one client may be owed: its bound, the batch that crossed it, and the
    tail of a snapshot it was closed in the middle of."""
    return max_client_buffer + batch_cap * event_frame + snapshot


# -- emitters (separate processes, like the state machines they stand for) ----------------

FILL = textwrap.dedent("""
    import sys
    from fastrelay import Emitter
    e = Emitter(sys.argv[1])
    ok = 0
    for i in range(int(sys.argv[2])):
        ok += e.emit("state_change", f"m-{i:06d}", state="run", data={"j": i})
        if e.pending > 5000:  # stay well inside the emitter's backlog bound
            e.flush(60)
    print(ok, e.flush(60), sum(e.dropped.values()), flush=True)
""")

# Emits "tick" events carrying a counter `n` (0, 1, 2...) from one emitter, so
# arrival order is emission order; `rate` events/s (0: as fast as the backlog
# allows), `count` events, or (count 0) until its stdin closes.
PACER = textwrap.dedent("""
    import os, select, sys, time
    from fastrelay import Emitter
    path, rate, count, pad = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), "p" * int(sys.argv[4])
    e = Emitter(path)
    n = dropped = 0
    start = time.monotonic()
    print("started", flush=True)
    while not count or n < count:
        if rate:
            wait = start + n / rate - time.monotonic()
        else:
            wait = 0.001 if e.pending > 5000 else 0
        if wait > 0 and select.select([] if count else [sys.stdin], [], [], wait)[0]:
            break
        if not e.emit("tick", "pacer", n=n, pad=pad):
            dropped += 1
        n += 1
    print(n, e.flush(60), dropped + sum(e.dropped.values()), flush=True)
""")


async def fill_registry(relay: Any, machines: int) -> None:
    """Put ``machines`` distinct machines in the relay's registry, and wait until it holds them."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FILL, relay.socket_path, str(machines), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert out.split() == [str(machines).encode(), b"True", b"0"], out
    await until(lambda: _machines_at_least(relay, machines), 60, f"{machines} machines in the registry")


async def _machines_at_least(relay: Any, n: int) -> bool:
    return int((await health(relay))["machines"]) >= n


class Pacer:
    """A subprocess emitting numbered ``tick`` events (see PACER)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, relay: Any, rate: float, count: int = 0, pad: int = 16) -> Pacer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PACER, relay.socket_path, str(rate), str(count), str(pad),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"started"
        return cls(proc)

    async def stop(self) -> int:
        """Stop it (a pacer with a ``count`` ends by itself: this waits for it); returns
        how many events it emitted, having checked that none was dropped."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        out, _ = await asyncio.wait_for(self.proc.communicate(), 90)
        emitted, flushed, dropped = out.split()
        assert (flushed, dropped) == (b"True", b"0"), out
        return int(emitted)


# -- checking what a reading client receives ------------------------------------------------


@dataclass
class StreamCheck:
    """What one reading client saw: every frame valid JSON, ``initial`` first, then the
    pacer's counter ``n`` consecutive; after a later ``initial`` (a refresh) the counter
    may move on but never back."""

    name: str
    frames: int = 0
    initials: int = 0
    machines: int = 0  # in the first initial
    events: int = 0
    first_n: int | None = None
    last_n: int | None = None
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    closed: bool = False
    ended: str = ""  # how the connection ended, as the client saw it
    _rebased: bool = False

    def feed(self, payload: bytes) -> bool:
        """Check one text frame; True when it is a relay ping (to be answered)."""
        self.frames += 1
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self.error(f"frame {self.frames} ({len(payload)} bytes) is not JSON ({exc}): "
                       f"{payload[:60]!r}...{payload[-60:]!r}")
            return False
        if type(message) is not dict:
            self.error(f"frame {self.frames} is not an object: {payload[:60]!r}")
            return False
        kind = message.get("type")
        if kind == "ping":
            return True
        if kind == "initial":
            if self.initials == 0:
                self.machines = len(message.get("machines", ()))
            self.initials += 1
            self._rebased = True
            return False
        if self.initials == 0:
            self.error(f"frame {self.frames} came before the initial: {payload[:80]!r}")
            return False
        if kind != "tick":
            self.error(f"frame {self.frames}: unexpected {payload[:80]!r}")
            return False
        n = message.get("n")
        if self.last_n is None:
            self.first_n = n
        elif self._rebased and self.initials > 1:
            if n <= self.last_n:
                self.error(f"after refresh initial {self.initials}: n={n} after {self.last_n}: "
                           f"{payload[:120]!r}")
        elif n != self.last_n + 1:
            self.error(f"after n={self.last_n} came n={n} ({'duplicate' if n <= self.last_n else 'gap'})")
        self._rebased = False
        self.last_n = n
        self.events += 1
        return False

    def error(self, text: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(text)

    def summary(self) -> str:
        return (f"{self.name}: {self.frames} frames, {self.initials} initials ({self.machines} machines), "
                f"{self.events} events n={self.first_n}..{self.last_n}, closed={self.closed} "
                f"code={self.close_code} {self.ended}, errors={self.errors}")


class PicowsChecker(WSListener):  # type: ignore[misc]
    """A picows client feeding every frame to a StreamCheck and answering pings."""

    def __init__(self, check: StreamCheck) -> None:
        self.check = check
        self.transport: WSTransport | None = None
        self.disconnected = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.check.close_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type is WSMsgType.TEXT:
            if self.check.feed(frame.get_payload_as_bytes()):
                transport.send(WSMsgType.TEXT, PONG)
        elif frame.msg_type is not WSMsgType.PONG:
            self.check.error(f"unexpected frame type {frame.msg_type}")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.check.closed = True
        if not self.disconnected.done():
            self.disconnected.set_result(None)


async def picows_reader(link: Any, relay: Any, name: str) -> PicowsChecker:
    check = StreamCheck(name)
    _, listener = await ws_connect(
        lambda: PicowsChecker(check), relay.url, max_frame_size=64 * MiB,
        socket_factory=lambda _url: link.socket())
    return listener  # type: ignore[no-any-return]


async def open_socket(link: Any, relay: Any, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to the relay over ``link``."""
    sock = link.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
    return sock


async def websockets_client(link: Any, relay: Any) -> websockets.ClientConnection:
    """A real `websockets` client over ``link``, its own keepalive off (the relay pings)."""
    sock = await open_socket(link, relay)
    return await websockets.connect(relay.url, sock=sock, ping_interval=None,
                                    max_size=64 * MiB, open_timeout=30)


async def read_checked(ws: websockets.ClientConnection, check: StreamCheck,
                       on_initial: Callable[[], Awaitable[None]] | None = None) -> None:
    """Read ``ws`` until it closes, checking each frame and answering pings."""
    try:
        while True:
            message = await ws.recv(decode=False)  # bytes: no decoding of a 7 MB initial
            initials = check.initials
            if check.feed(message):
                await answer_ping(ws)
            elif check.initials > initials and on_initial is not None:
                await on_initial()
    except websockets.ConnectionClosed as exc:
        check.ended = repr(exc)
    finally:
        check.closed = True
        check.close_code = ws.close_code


# -- raw WebSocket clients that never read --------------------------------------------------

_MASK = b"\x5a\xa5\x3c\xc3"


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.3); payloads under 126 bytes."""
    assert len(payload) < 126
    body = bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + _MASK + body


async def raw_handshake(link: Any, relay: Any, rcvbuf: int = 4096,
                        target: str = "/ws/events") -> socket.socket:
    """Complete a WebSocket handshake on a raw socket with a small receive buffer.

    The caller then sends what it likes and reads nothing (or reads later with
    :func:`read_to_close`). Bytes after the 101 response are left in the socket.
    """
    sock = await open_socket(link, relay, rcvbuf)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # one byte at a time: leave the frames unread
        byte = await asyncio.wait_for(loop.sock_recv(sock, 1), 30)
        assert byte, f"relay closed during the handshake: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def read_to_close(sock: socket.socket, timeout: float) -> tuple[list[bytes], int | str]:
    """Read server frames until a close frame or the end: (text payloads, close code, or
    how it ended: "eof"/"reset"/"timeout" after N bytes). Keeps the first 32 bytes of each
    text payload."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    texts: list[bytes] = []
    deadline = loop.time() + timeout
    total = 0

    async def need(n: int) -> str | None:
        nonlocal total
        while len(buf) < n:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20),
                                               max(deadline - loop.time(), 0.01))
            except ConnectionResetError:
                return f"reset after {total} bytes"
            except asyncio.TimeoutError:
                return f"timeout after {total} bytes"
            if not chunk:
                return f"eof after {total} bytes"
            total += len(chunk)
            buf.extend(chunk)
        return None

    while True:
        if ended := await need(2):
            return texts, ended
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        head = 2
        if length == 126:
            if ended := await need(4):
                return texts, ended
            length, head = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if ended := await need(10):
                return texts, ended
            length, head = int.from_bytes(buf[2:10], "big"), 10
        if ended := await need(head + length):
            return texts, ended
        payload = bytes(buf[head:head + min(length, 32)])
        del buf[:head + length]
        if opcode == 0x8:
            return texts, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        if opcode == 0x1:
            texts.append(payload)


async def websockets_non_reader(link: Any, relay: Any) -> websockets.ClientConnection:
    """A `websockets` client that stops reading right after its handshake."""
    ws = await websockets_client(link, relay)
    ws.transport.pause_reading()
    return ws


# -- 1. a snapshot that does not fit the socket at once ----------------------------------------


async def non_readers_are_closed_and_memory_bounded(relay_factory: Any, link: Any,
                                                    machines: int = 40_000) -> None:
    """Two clients that never read (a raw socket, a paused `websockets` client) join a
    relay with a large registry while a stream of events flows: both are closed for
    backpressure, the relay's memory stays within its bound, and two readers get
    every event in order."""
    bound = 1 * MiB
    relay = relay_factory.start("--max-client-buffer", str(bound), "--batch-cap", str(BATCH_CAP),
                                link=link)
    await fill_registry(relay, machines)
    snapshot = await snapshot_bytes(relay)
    async with OwedWatch(relay) as owed:
        readers = [await picows_reader(link, relay, f"reader{i}") for i in range(2)]
        await until(lambda: all(r.check.initials for r in readers), 30, "readers' initials")
        raw = await raw_handshake(link, relay)
        paused = await websockets_non_reader(link, relay)
        await until(lambda: _clients_at_least(relay, 4), 10, "4 clients")
        # ~45 MB of events: were the non-readers' buffers unbounded, what the
        # relay owes them would show it. Paced (8 MB/s in 4 KB events) so that
        # the two readers, in this process and bound to 1 MiB like everyone,
        # keep up even on a busy machine.
        pacer = await Pacer.start(relay, rate=2000, count=11_000, pad=4000)
        emitted = await pacer.stop()
        await poll(lambda: all(r.check.events >= emitted for r in readers), 60)
        closed = await poll(lambda: _at_least(closed_for_backpressure(relay), 2), 20)
    summaries = "\n".join(r.check.summary() for r in readers)
    state = f"{owed.describe()}; closed={(await health(relay))['closed']}\n{summaries}"
    assert closed, "both non-readers should be closed for backpressure (slow/timeout)\n" + state
    for reader in readers:
        assert not reader.check.errors, state
        assert (reader.check.first_n, reader.check.last_n) == (0, emitted - 1), state
        assert reader.check.machines >= machines, state
    assert owed.worst() <= owed_allowance(bound, snapshot, BATCH_CAP, 4200), state
    raw.close()
    paused.transport.abort()  # closed by the relay; a close handshake would wait on paused reading
    for reader in readers:
        reader.transport.disconnect()


async def _clients_at_least(relay: Any, n: int) -> bool:
    return int((await health(relay))["clients"]) >= n


async def _at_least(value: Awaitable[int], n: int) -> int | bool:
    got = await value
    return got if got >= n else False


async def readers_of_a_large_snapshot_get_every_event(relay_factory: Any, link: Any, clients: int,
                                                      machines: int, rate: float, events_after: int,
                                                      *extra: str) -> list[StreamCheck]:
    """``clients`` real `websockets` clients connect, all at once, to a relay whose registry
    holds ``machines`` while events flow at ``rate``: each gets its initial first, then the
    events' counter with no gap and no duplicate, until it has ``events_after`` of them."""
    relay = relay_factory.start(*extra, link=link)
    await fill_registry(relay, machines)
    pacer = await Pacer.start(relay, rate=rate)
    checks = [StreamCheck(f"ws{i}") for i in range(clients)]
    sockets = await asyncio.gather(*(websockets_client(link, relay) for _ in checks))
    tasks = [asyncio.create_task(read_checked(ws, check)) for ws, check in zip(sockets, checks, strict=True)]
    try:
        await until(lambda: all(c.events >= events_after or c.closed for c in checks), 60,
                    f"every client to get its initial and {events_after} events")
    finally:
        await pacer.stop()
        await asyncio.gather(*(ws.close() for ws in sockets))
        await asyncio.gather(*tasks)
    report = "\n".join(c.summary() for c in checks)
    for check in checks:
        assert not check.errors, report
        assert check.initials == 1 and check.machines >= machines, report
        assert check.events >= events_after, report
        assert check.close_code in (1000, None), report
    return checks


async def test_clients_that_never_read_a_large_snapshot_are_closed_and_memory_stays_bounded(
        relay_factory):
    await non_readers_are_closed_and_memory_bounded(relay_factory, LOOPBACK)


async def test_readers_of_a_large_snapshot_get_every_event_in_order(relay_factory):
    # 40,000 machines make a ~4.5 MB initial, more than loopback's socket takes
    # at once, so events arrive while the snapshot is still being written.
    await readers_of_a_large_snapshot_get_every_event(
        relay_factory, LOOPBACK, clients=4, machines=40_000, rate=2000, events_after=2000)


# -- 3. refresh amplification ------------------------------------------------------------------


async def refresh_flood_is_bounded(relay_factory: Any, link: Any, machines: int = 50_000) -> None:
    """100 refresh frames in one TCP send from a client that does not read: at most one
    snapshot is pending for it, the relay's memory stays bounded, it is closed with 1013
    once events push it over its bound, and other clients get every event in order."""
    bound = 1 * MiB
    # A long send timeout, so the flooder can read its backlog afterwards and count.
    relay = relay_factory.start("--max-client-buffer", str(bound), "--send-timeout", "60", link=link)
    await fill_registry(relay, machines)
    snapshot = await snapshot_bytes(relay)
    async with OwedWatch(relay) as owed:
        readers = [await picows_reader(link, relay, f"reader{i}") for i in range(2)]
        await until(lambda: all(r.check.initials for r in readers), 30, "readers' initials")
        flooder = await raw_handshake(link, relay)
        pacer = await Pacer.start(relay, rate=2000, pad=200)
        await asyncio.get_running_loop().sock_sendall(
            flooder, masked_frame(0x1, b'{"type":"refresh"}') * 100)
        closed = await poll(lambda: _at_least(closed_for_backpressure(relay), 1), 30)
        emitted = await pacer.stop()
    state = f"{owed.describe()}; closed={(await health(relay))['closed']}"
    await poll(lambda: all(r.check.events >= emitted for r in readers), 60)
    state += "\n" + "\n".join(r.check.summary() for r in readers)
    # 300-byte events at 2000/s: the default batch cap makes a small batch here.
    assert owed.worst() <= owed_allowance(bound, snapshot, 1024, 400), state
    assert closed, "the refresh flooder should be closed for backpressure\n" + state
    for reader in readers:
        assert not reader.check.errors, state
        assert (reader.check.first_n, reader.check.last_n) == (0, emitted - 1), state
    texts, code = await read_to_close(flooder, 60)
    initials = sum(t.startswith(b'{"type":"initial"') for t in texts)
    state += f"\nflooder read {len(texts)} text frames, {initials} initials, then {code}"
    # Its own initial, plus at most one more: refreshes while one is queued are no-ops.
    assert 1 <= initials <= 2, state
    assert code == 1013, state
    flooder.close()
    for reader in readers:
        reader.transport.disconnect()


async def spaced_refreshes_each_get_an_initial(relay_factory: Any, link: Any,
                                               machines: int = 50_000) -> None:
    relay = relay_factory.start(link=link)
    await fill_registry(relay, machines)
    pacer = await Pacer.start(relay, rate=200)
    ws = await websockets_client(link, relay)
    check = StreamCheck("refresher")
    refreshes = 0

    async def refresh_again() -> None:
        nonlocal refreshes
        if refreshes < 3:
            refreshes += 1
            await ws.send('{"type":"refresh"}')

    reader = asyncio.create_task(read_checked(ws, check, on_initial=refresh_again))
    try:
        await until(lambda: check.initials >= 4 and check.events >= 20 or check.closed, 60,
                    "3 refresh replies and events after them")
    finally:
        await pacer.stop()
        await ws.close()
        await reader
    assert not check.errors, check.summary()
    assert check.initials == 4 and refreshes == 3, check.summary()
    assert check.close_code == 1000, check.summary()


async def test_a_refresh_flood_keeps_one_snapshot_pending_and_memory_bounded(relay_factory):
    await refresh_flood_is_bounded(relay_factory, LOOPBACK)


async def test_spaced_refreshes_each_get_a_fresh_initial(relay_factory):
    await spaced_refreshes_each_get_an_initial(relay_factory, LOOPBACK)


# -- 4. PING flood -----------------------------------------------------------------------------


def flood(sock: socket.socket, frames: bytes, repeat: int, stop: threading.Event) -> tuple[int, str]:
    """Send ``frames`` ``repeat`` times on a blocking socket; stops early when the relay
    stops taking them (send timeout) or drops the connection. Returns (sends, why)."""
    sent = 0
    try:
        for sent in range(repeat):  # noqa: B007
            if stop.is_set():
                return sent, "stopped"
            sock.sendall(frames)
    except TimeoutError:
        return sent, "relay stopped reading"
    except OSError as exc:
        return sent, type(exc).__name__
    return repeat, "done"


async def ping_flood_is_bounded(relay_factory: Any, link: Any, pings: int = 400_000) -> None:
    """A client that never reads sends ``pings`` WebSocket PINGs: the relay's memory stays
    bounded, the flooder is closed for backpressure, other clients keep getting events."""
    bound = 1 * MiB
    relay = relay_factory.start("--max-client-buffer", str(bound), link=link)
    await fill_registry(relay, 1000)
    snapshot = await snapshot_bytes(relay)
    async with OwedWatch(relay) as owed:
        readers = [await picows_reader(link, relay, f"reader{i}") for i in range(2)]
        await until(lambda: all(r.check.initials for r in readers), 30, "readers' initials")
        flooder = await raw_handshake(link, relay)
        flooder.setblocking(True)
        flooder.settimeout(5)  # the relay may stop reading a client it has given up on
        # Few events: the bound must hold between fan-outs too, not only when one happens.
        pacer = await Pacer.start(relay, rate=2, pad=64)
        per_send = 4000  # ~420 KB of 100-byte pings per send
        stop = threading.Event()
        frames = masked_frame(0x9, b"x" * 100) * per_send
        flooding = asyncio.create_task(
            asyncio.to_thread(flood, flooder, frames, pings // per_send, stop))
        closed = await poll(lambda: _at_least(closed_for_backpressure(relay), 1), 60)
        stop.set()
        sends, why = await asyncio.wait_for(flooding, 30)
    # The others still get events after the flood.
    mark = max(r.check.events for r in readers)
    await poll(lambda: all(r.check.events >= mark + 4 for r in readers), 30)
    emitted = await pacer.stop()
    state = f"{owed.describe()}; closed={(await health(relay))['closed']}"
    await poll(lambda: all(r.check.events >= emitted for r in readers), 30)
    state += f"; flooder: {sends * per_send} pings sent, then {why}\n"
    state += "\n".join(r.check.summary() for r in readers)
    assert closed, "the ping flooder should be closed for backpressure\n" + state
    # Its PONGs are owed bytes too: at most the latest PING is answered, and
    # what waits for the flooder stays within its bound.
    assert owed.worst() <= owed_allowance(bound, snapshot, 1024, 200), state
    for reader in readers:
        assert not reader.check.errors, state
        assert (reader.check.first_n, reader.check.last_n) == (0, emitted - 1), state
    flooder.close()
    for reader in readers:
        reader.transport.disconnect()


async def test_a_ping_flood_from_a_client_that_never_reads_is_bounded(relay_factory):
    await ping_flood_is_bounded(relay_factory, LOOPBACK)
