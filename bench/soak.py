"""Soak: continuous emit, client churn and a few slow clients; RSS and descriptors over time.

    python bench/soak.py 600 --backend cython          # ten minutes
    python bench/soak.py 60 --backend python --rate 1000

One relay subprocess; one emitter process at a fixed rate; one client process
that keeps a pool of readers, replaces a slice of it every second (half closed
politely, half aborted), and keeps a few clients that never read (the relay
must close them with 1013 or by its send timeout; they are replaced). Every
--sample seconds the relay's VmRSS, open descriptors and counters are printed;
the summary compares the first and last thirds after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

EMITTER = r"""
import sys, time
from fastrelay import Emitter
path, rate = sys.argv[1], float(sys.argv[2])
e = Emitter(path)
machines = [f"soak-{i:03d}" for i in range(200)]
states = ["idle", "queued", "running", "uploading", "done"]
i = 0
start = time.monotonic()
while True:
    target = start + i / rate
    now = time.monotonic()
    if target > now:
        time.sleep(target - now)
    m = machines[i % len(machines)]
    if i % 4 == 0:
        e.emit("state_change", m, state=states[(i // 4) % len(states)], data={"n": i})
    else:
        e.emit("activity", m, progress=(i % 100) / 100, pad="x" * 120)
    i += 1
"""

CHURN = r"""
import asyncio, random, sys
from picows import WSListener, WSMsgType, ws_connect
url, pool, churn, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

class Reader(WSListener):
    def on_ws_frame(self, transport, frame):
        if (frame.msg_type == WSMsgType.TEXT and frame.payload_size < 64
                and b'"ping"' in frame.get_payload_as_bytes()):
            transport.send(WSMsgType.TEXT, b'{"type":"pong"}')
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

async def connect():
    transport, _ = await ws_connect(Reader, url)
    return transport

async def slow_client():
    # Connects, then never reads again. With reading paused it cannot see the
    # relay's close, so it gives up after a while and starts over.
    while True:
        try:
            transport = await connect()
        except Exception:
            await asyncio.sleep(1)
            continue
        transport.underlying_transport.pause_reading()
        try:
            await asyncio.wait_for(transport.wait_disconnected(), 20)
        except asyncio.TimeoutError:
            transport.disconnect(graceful=False)

async def main():
    readers = [await connect() for _ in range(pool)]
    tasks = [asyncio.create_task(slow_client()) for _ in range(slow)]
    while True:
        await asyncio.sleep(1)
        for _ in range(churn):
            victim = readers.pop(random.randrange(len(readers)))
            victim.disconnect(graceful=random.random() < 0.5)
            try:
                readers.append(await connect())
            except Exception:
                pass

asyncio.run(main())
"""

_STARTED = re.compile(r"-> (ws://\S+) \(backend (\w+)")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _health(http: str) -> dict:
    with urllib.request.urlopen(http + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("duration", type=float, help="seconds to run")
    parser.add_argument("--backend", default="cython", choices=("cython", "python"))
    parser.add_argument("--rate", type=float, default=2000, help="events per second")
    parser.add_argument("--pool", type=int, default=50, help="reading clients kept connected")
    parser.add_argument("--churn", type=int, default=10, help="readers replaced per second")
    parser.add_argument("--slow", type=int, default=3, help="clients that never read")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds excluded from the flatness check (default 10%% of duration)")
    args = parser.parse_args()
    # SIGTERM runs the finally below too, so the helper processes never linger.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    workdir = tempfile.mkdtemp(prefix="fastrelay-soak-")
    sock = os.path.join(workdir, "soak.sock")
    relay = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--port", "0", "--socket", sock,
         "--log-dir", os.path.join(workdir, "logs"), "--backend", args.backend,
         "--ping-interval", "5", "--heartbeat-interval", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = relay.stdout.readline()
    match = _STARTED.search(line)
    if not match:
        relay.kill()
        print(f"relay did not start: {line!r}", file=sys.stderr)
        return 1
    url = match.group(1)
    http = url.split("/ws/")[0].replace("ws://", "http://")
    helpers = [
        subprocess.Popen([sys.executable, "-c", EMITTER, sock, str(args.rate)]),
        subprocess.Popen([sys.executable, "-c", CHURN, url, str(args.pool), str(args.churn),
                          str(args.slow)]),
    ]
    print(f"# soak {args.duration:.0f}s backend={args.backend} rate={args.rate:.0f}/s "
          f"pool={args.pool} churn={args.churn}/s slow={args.slow} python={sys.version.split()[0]} "
          f"date={time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'t_s':>6} {'rss_mib':>8} {'fds':>5} {'clients':>7} {'accepted':>10} "
          f"{'relayed':>12} {'slow':>5} {'timeout':>7} {'unresp':>6} {'normal':>7}")
    samples = []
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < args.duration:
            time.sleep(min(args.sample, max(args.duration - elapsed, 0.1)))
            t = time.monotonic() - started
            health = _health(http)
            rss = _rss_kib(relay.pid) / 1024
            fds = _fds(relay.pid)
            closed = health["closed"]
            samples.append((t, rss, fds))
            print(f"{t:6.0f} {rss:8.1f} {fds:5d} {health['clients']:7d} "
                  f"{health['events']['accepted']:10d} {health['events']['relayed']:12d} "
                  f"{closed['slow']:5d} {closed['timeout']:7d} {closed['unresponsive']:6d} "
                  f"{closed['normal']:7d}", flush=True)
    finally:
        for proc in helpers:
            proc.kill()
        relay.send_signal(signal.SIGTERM)
        relay.wait(10)
    warmup = args.warmup if args.warmup is not None else args.duration * 0.1
    steady = [s for s in samples if s[0] >= warmup]
    if len(steady) >= 3:
        third = max(len(steady) // 3, 1)
        first, last = steady[:third], steady[-third:]
        rss_first = sum(s[1] for s in first) / len(first)
        rss_last = sum(s[1] for s in last) / len(last)
        fds_first = sum(s[2] for s in first) / len(first)
        fds_last = sum(s[2] for s in last) / len(last)
        print(f"# after {warmup:.0f}s warm-up: RSS {min(s[1] for s in steady):.1f}-"
              f"{max(s[1] for s in steady):.1f} MiB (first third avg {rss_first:.1f}, last third "
              f"avg {rss_last:.1f}); fds {min(s[2] for s in steady)}-{max(s[2] for s in steady)} "
              f"(first third avg {fds_first:.1f}, last third avg {fds_last:.1f})")
    return 0


if __name__ == "__main__":
    random.seed(1)
    raise SystemExit(main())
