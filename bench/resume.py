"""What resume costs: the time one client takes to receive a replay, and a full history's RSS.

For each backend, side by side in one run:

- *replay*: 10,000 events (~200 bytes) in the history; one picows client
  connects with ``?epoch=E&since=0`` and reads until it has the last one. Wall
  time from the connect to the last event, median over ``--repeats``.
- *memory*: two relays, one after the other in the same run: one with the default ``--history-bytes``
  (16 MiB; ``--history 100000`` so the bytes bound is the one that binds) and
  one with ``--history 0``, each fed the same 12,000 events of ~2 KiB. The
  base is the second one's RSS after the same load (its batch slots, output
  buffer and registry touched exactly as much), so the difference is what a
  full history costs. The RSS added since an empty history (same relay, before
  the load) is printed too: it also counts the working buffers the load first
  touches, and the allocator slack the load leaves, which a relay without
  history pays as well.

``python -m bench.resume --repeats 5`` prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RELAY_CPUS, pinned

_STARTED = re.compile(r"-> (ws://\S+) \(backend (\w+)")


class _Reader(WSListener):  # type: ignore[misc]
    def __init__(self, last: int) -> None:
        self.last = last
        self.count = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        if b'"seq"' in data and not data.startswith(b'{"type":"resumed"'):
            self.count += 1
            if orjson.loads(data)["seq"] == self.last and not self.done.done():
                self.done.set_result(time.perf_counter())


class Relay:
    def __init__(self, backend: str, workdir: str, *extra: str, cpus: str = RELAY_CPUS) -> None:
        self.socket_path = os.path.join(workdir, f"{backend}.sock")
        self.proc = subprocess.Popen(
            pinned(cpus, [sys.executable, "-m", "fastrelay", "serve", "--port", "0",
                                "--socket", self.socket_path, "--log-dir",
                                os.path.join(workdir, "logs"), "--backend", backend, *extra]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        match = _STARTED.search(self.proc.stdout.readline())
        assert match, "relay did not start"
        self.url = match.group(1)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url.replace("ws://", "http://").replace(
                "/ws/events", "/healthz"), timeout=10) as r:
            return dict(orjson.loads(r.read()))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fill(self, count: int, pad: int) -> None:
        import socket

        target = self.health()["seq"] + count
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.connect(self.socket_path)
        for i in range(count):
            payload = orjson.dumps({"type": "tick", "machine_id": f"m{i % 100}", "n": i,
                                    "pad": "p" * pad})
            while True:
                try:
                    sock.send(payload)
                    break
                except BlockingIOError:
                    time.sleep(0.0005)
        sock.close()
        deadline = time.monotonic() + 60
        while self.health()["seq"] < target:
            assert time.monotonic() < deadline, "the relay did not take the events"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _replay(relay: Relay, epoch: str, last: int) -> float:
    reader: _Reader | None = None

    def factory() -> _Reader:
        nonlocal reader
        reader = _Reader(last)
        return reader

    started = time.perf_counter()
    transport, _ = await ws_connect(factory, f"{relay.url}?epoch={epoch}&since=0",
                                    max_frame_size=1 << 24)
    assert reader is not None
    finished = await asyncio.wait_for(reader.done, 60)
    assert reader.count == last, (reader.count, last)
    transport.disconnect()
    return finished - started


def measure(backend: str, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fr-resume-") as workdir:
        relay = Relay(backend, workdir)
        try:
            relay.fill(10_000, 150)
            health = relay.health()
            times = [asyncio.run(_replay(relay, health["epoch"], health["seq"]))
                     for _ in range(repeats)]
        finally:
            relay.stop()
        full = _loaded_rss(backend, workdir, "100000")
        base = _loaded_rss(backend, workdir, "0")
    history = full["history"]
    return {
        "replay_ms": statistics.median(times) * 1e3,
        "replay_all_ms": [round(t * 1e3, 1) for t in times],
        "history_mib": history["bytes"] / 2**20,
        "history_events": history["events"],
        "rss_base_mib": base["after"] / 1024,
        "rss_full_mib": full["after"] / 1024,
        "rss_over_base_mib": (full["after"] - base["after"]) / 1024,
        "rss_added_since_empty_mib": (full["after"] - full["before"]) / 1024,
    }


def _loaded_rss(backend: str, workdir: str, history: str) -> dict[str, Any]:
    """RSS (KiB) of a relay with ``--history history`` before and after 12,000 ~2 KiB events."""
    relay = Relay(backend, workdir, "--history", history)
    try:
        relay.fill(10, 10)  # warm: the first events allocate the batch buffers
        before = relay.rss_kib()
        relay.fill(12_000, 2000)
        return {"before": before, "after": relay.rss_kib(), "history": relay.health()["history"]}
    finally:
        relay.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="cython,python")
    args = parser.parse_args(argv)
    print("| backend | 10,000-event replay, median ms | runs ms | full history | RSS with it MiB "
          "| RSS with --history 0, same load MiB | over that base MiB | added since empty MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for backend in args.backends.split(","):
        r = measure(backend, args.repeats)
        print(f"| {backend} | {r['replay_ms']:.1f} | {r['replay_all_ms']} | "
              f"{r['history_events']:,} events, {r['history_mib']:.1f} MiB | "
              f"{r['rss_full_mib']:.1f} | {r['rss_base_mib']:.1f} | "
              f"{r['rss_over_base_mib']:.1f} | {r['rss_added_since_empty_mib']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
