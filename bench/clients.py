"""Client process: many picows WebSocket connections driven over stdin/stdout.

``python -m bench.clients`` reads one JSON command per line on stdin and answers
each with one JSON line on stdout:

- ``{"cmd": "connect", "url": U, "n": N, "probes": K, "stall": false}``: open
  connections until N are up (reconnecting any that closed), each counted
  only once its ``initial`` frame arrived; the first K of them are probes.
- ``{"cmd": "arm", "t0": T0, "t1": T1}``: reset counters; count event frames
  received inside [T0, T1) (time.time()), and keep probes' latencies there.
- ``{"cmd": "stats", "lat_file": PATH, "expect": E}``: counters; probes'
  latencies (µs, int32) written to PATH; how many live connections have
  received at least E events.
- ``{"cmd": "last"}``: per connection, events received and the receipt time
  (ns) of the latest one (for the one-event-to-everyone scenario).
- ``{"cmd": "resume"}``: stalled connections read again.
- ``{"cmd": "quit"}``.

Every connection answers the relay's JSON ping with ``{"type":"pong"}`` and
counts frames containing ``"sent_at"`` as events. Probes also parse each event
(orjson) to follow every emitter's count ``n`` (gaps, duplicates) and latency from
``sent_at``; the others only count, which keeps a client cheap enough that
one process can hold thousands. With ``stall`` the connections stop reading
from the socket right after their ``initial`` frame.
"""

from __future__ import annotations

import array
import asyncio
import os
import sys
import time
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import raise_nofile

__all__ = ["main"]

PONG = b'{"type":"pong"}'
MAX_LAT_SAMPLES = 3_000_000
CONNECT_CONCURRENCY = 32


class Proc:
    """Counters shared by all connections of this process."""

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.t0 = 0
        self.t1 = 0
        self.lat = array.array("i")
        self.closed = 0
        self.close_codes: dict[str, int] = {}
        self.pings = 0
        self.others = 0

    def arm(self, t0: float, t1: float) -> None:
        self.t0 = int(t0 * 1e9)
        self.t1 = int(t1 * 1e9)
        self.lat = array.array("i")
        self.closed = 0
        self.close_codes = {}
        self.pings = 0
        self.others = 0
        for c in self.conns:
            c.reset()


class Conn(WSListener):
    def __init__(self, proc: Proc, probe: bool, stall: bool) -> None:
        self.proc = proc
        self.probe = probe
        self.stall = stall
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.alive = False
        self.reset()

    def reset(self) -> None:
        self.events = 0
        self.window = 0
        self.last_ns = 0
        self.seqs: dict[int, list[int]] = {}  # emitter -> [next expected, received, gaps, dups]

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.alive:
            self.proc.closed += 1
            code = "none"
            hs = transport.close_handshake
            if hs is not None and hs.recv is not None:
                code = str(hs.recv.code.value if hasattr(hs.recv.code, "value") else hs.recv.code)
            self.proc.close_codes[code] = self.proc.close_codes.get(code, 0) + 1
        self.alive = False
        if not self.ready.done():
            self.ready.set_result(False)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.time_ns()
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        data = frame.get_payload_as_bytes()
        if b'"sent_at"' in data:
            self.events += 1
            self.last_ns = now
            proc = self.proc
            in_window = proc.t0 <= now < proc.t1
            if in_window:
                self.window += 1
            if self.probe:
                ev = orjson.loads(data)
                em = ev.get("emitter")
                seq = ev.get("n")
                st = self.seqs.get(em)
                if st is None:
                    st = self.seqs[em] = [0, 0, 0, 0]
                st[1] += 1
                if seq == st[0]:
                    st[0] = seq + 1
                elif seq > st[0]:
                    st[2] += seq - st[0]
                    st[0] = seq + 1
                else:
                    st[3] += 1
                if in_window and len(proc.lat) < MAX_LAT_SAMPLES:
                    proc.lat.append(min(2**31 - 1, (now - ev["sent_at"]) // 1000))
        elif b'"ping"' in data:
            self.proc.pings += 1
            transport.send(WSMsgType.TEXT, PONG)
        elif b'"initial"' in data:
            if not self.ready.done():
                self.alive = True
                self.ready.set_result(True)
                if self.stall:
                    transport.underlying_transport.pause_reading()
        else:
            self.proc.others += 1


async def connect_all(
    proc: Proc, url: str, n: int, probes: int, stall: bool, timeout: float
) -> dict[str, Any]:
    t_start = time.monotonic()
    proc.conns = [c for c in proc.conns if c.alive]
    failures = 0
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    deadline = t_start + timeout

    async def one() -> None:
        nonlocal failures
        async with sem:
            for _attempt in range(5):
                if time.monotonic() > deadline:
                    return
                listener: Conn | None = None

                def factory() -> Conn:
                    nonlocal listener
                    listener = Conn(proc, False, stall)
                    return listener

                try:
                    await ws_connect(factory, url, websocket_handshake_timeout=30)
                    assert listener is not None
                    ok = await asyncio.wait_for(listener.ready, 30)
                    if ok:
                        proc.conns.append(listener)
                        return
                except Exception as exc:  # noqa: BLE001 - counted and retried
                    key = type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                failures += 1
                await asyncio.sleep(0.05)

    missing = n - len(proc.conns)
    if missing > 0:
        await asyncio.gather(*(one() for _ in range(missing)))
    for i, c in enumerate(proc.conns):
        c.probe = i < probes
    return {
        "connected": sum(1 for c in proc.conns if c.alive),
        "failures": failures,
        "errors": errors,
        "elapsed_s": time.monotonic() - t_start,
    }


def stats(proc: Proc, lat_file: str | None, expect: int | None = None) -> dict[str, Any]:
    per_emitter: dict[int, list[int]] = {}
    probe_conns = 0
    for c in proc.conns:
        if c.probe:
            probe_conns += 1
            for em, st in c.seqs.items():
                agg = per_emitter.setdefault(em, [0, 0, 0, 0])  # received, gaps, dups, max next
                agg[0] += st[1]
                agg[1] += st[2]
                agg[2] += st[3]
                agg[3] = max(agg[3], st[0])
    if lat_file:
        with open(lat_file, "wb") as f:
            proc.lat.tofile(f)
    return {
        "complete": sum(1 for c in proc.conns if c.alive and c.events >= expect)
        if expect is not None
        else None,
        "conns": len(proc.conns),
        "alive": sum(1 for c in proc.conns if c.alive),
        "events": sum(c.events for c in proc.conns),
        "window": sum(c.window for c in proc.conns),
        "probe_conns": probe_conns,
        "probe_per_emitter": {str(k): v for k, v in per_emitter.items()},
        "probe_events_by_conn": [sum(st[1] for st in c.seqs.values()) for c in proc.conns if c.probe],
        "lat_samples": len(proc.lat),
        "closed": proc.closed,
        "close_codes": proc.close_codes,
        "pings": proc.pings,
        "others": proc.others,
    }


async def amain() -> None:
    raise_nofile()
    proc = Proc()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def reply(obj: Any) -> None:
        out.write(orjson.dumps(obj).decode() + "\n")
        out.flush()

    reply({"hello": os.getpid()})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = orjson.loads(line)
        kind = cmd["cmd"]
        if kind == "connect":
            reply(
                await connect_all(
                    proc,
                    cmd["url"],
                    cmd["n"],
                    cmd.get("probes", 0),
                    cmd.get("stall", False),
                    cmd.get("timeout", 120),
                )
            )
        elif kind == "arm":
            proc.arm(cmd["t0"], cmd["t1"])
            reply({"ok": True, "alive": sum(1 for c in proc.conns if c.alive)})
        elif kind == "stats":
            reply(stats(proc, cmd.get("lat_file"), cmd.get("expect")))
        elif kind == "last":
            reply(
                {
                    "events": [c.events for c in proc.conns],
                    "last_ns": [c.last_ns for c in proc.conns],
                }
            )
        elif kind == "resume":
            for c in proc.conns:
                if c.alive and c.transport is not None:
                    c.transport.underlying_transport.resume_reading()
            reply({"ok": True})
        elif kind == "quit":
            for c in proc.conns:
                if c.transport is not None and c.alive:
                    c.alive = False
                    c.transport.disconnect(graceful=False)
            reply({"ok": True})
            break
        else:
            reply({"error": f"unknown command {kind}"})


def main() -> int:
    try:
        import uvloop

        uvloop.run(amain())
    except ImportError:
        asyncio.run(amain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
