"""What the Redis broker (DESIGN §9) costs and carries, side by side in one run.

For each backend, with one ``redis-server`` (no persistence) and fresh relays:

- *throughput*: two relays on one Redis, each fed by one max-rate emitter
  (``bench.loadgen``, ~200-byte ``state_change`` events) for ``--seconds``.
  The stream's rate is the slope of its seq (read from both relays'
  /healthz) over the middle of the run; both relays must deliver every event
  of the stream by the end, or the run fails.
- *latency*: 1,000 ev/s into relay A's socket, one picows client on relay B;
  against a single relay without a broker fed and read the same way. Latency
  is the client's receipt time minus the event's ``sent_at`` (taken before the
  send). The difference of the p50s and p99s is what the broker adds.
- *CPU per event*: at a fixed ``--cpu-rate`` into relay A, the relay's CPU
  time (user+system, /proc) over the events it relayed, with the broker
  (relay A, which publishes and relays; relay B, which only relays; and Redis)
  and without (one relay alone).

``python -m bench.broker --repeats 3`` prints a markdown table and the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import LOAD_CPUS, RELAY_CPUS, cpu_ns, percentile, pinned
from bench.procs import ROOT, free_port
from bench.resume import Relay

PY = sys.executable


#: Where each relay runs: relay B on the other core (relays of one stream live on
#: different hosts; here each gets a core, shared with the load and Redis).
_CPUS = {"a": RELAY_CPUS, "b": LOAD_CPUS, "single": RELAY_CPUS}


def _relay(backend: str, workdir: str, name: str, *extra: str) -> Relay:
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return Relay(backend, path, *extra, cpus=_CPUS[name])


class Redis:
    """A redis-server of our own on a free port, without persistence."""

    def __init__(self, workdir: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (make test-deps installs it)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class _Latency(WSListener):  # type: ignore[misc]
    """Records receipt minus ``sent_at`` (µs) of every event frame."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.events = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        now = time.time_ns()
        data = frame.get_payload_as_bytes()
        if data.startswith(b'{"type":"initial"'):
            if not self.ready.done():
                self.ready.set_result(None)
            return
        if b'"sent_at"' not in data:
            if data.startswith(b'{"type":"ping"'):
                transport.send(WSMsgType.TEXT, b'{"type":"pong"}')
            return
        # The whole batch of a write arrives in one read: frames are timed as
        # they are parsed, which is within microseconds of their arrival.
        self.events += 1
        self.samples.append((now - orjson.loads(data)["sent_at"]) / 1000)


def _emitters(targets: list[tuple[str, int]], rate: float, start: float, stop: float) -> list[
        subprocess.Popen[bytes]]:
    return [subprocess.Popen(
        pinned(LOAD_CPUS, [PY, "-m", "bench.loadgen", "--socket", path, "--emitter", str(em),
                           "--rate", str(rate), "--start-at", repr(start), "--stop-at",
                           repr(stop), "--size", "200"]),
        stdout=subprocess.PIPE, cwd=ROOT) for path, em in targets]


def _sent(procs: list[subprocess.Popen[bytes]]) -> int:
    total = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        total += int(orjson.loads(out.splitlines()[-1])["sent"])
    return total


def _wait_seq(relays: list[Relay], target: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while min(relay.health()["seq"] for relay in relays) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"relays did not reach seq {target}: "
                               f"{[relay.health()['seq'] for relay in relays]}")
        time.sleep(0.05)


def throughput(backend: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fr-broker-") as workdir:
        redis = Redis(workdir)
        relays: list[Relay] = []
        try:
            relays = [_relay(backend, workdir, name, "--broker", redis.url,
                            "--history", "10000")
                      for name in ("a", "b")]
            start = time.time() + 1.0
            procs = _emitters([(relays[0].socket_path, 1), (relays[1].socket_path, 2)], 0,
                              start, start + seconds)
            samples: list[tuple[float, int]] = []
            while time.time() < start + seconds:
                samples.append((time.monotonic(), relays[1].health()["seq"]))
                time.sleep(0.1)
            sent = _sent(procs)
            _wait_seq(relays, sent)
            # The middle half of the run: start-up and the tail excluded.
            n = len(samples)
            (t0, s0), (t1, s1) = samples[n // 4], samples[3 * n // 4]
            health = [relay.health() for relay in relays]
            return {"events_per_s": (s1 - s0) / (t1 - t0), "sent": sent,
                    "delivered": [h["seq"] for h in health],
                    "rejects": sum(sum(h["rejects"].values()) for h in health)}
        finally:
            for relay in relays:
                relay.stop()
            redis.stop()


async def _latency_run(feed: Relay, read: Relay, seconds: float) -> list[float]:
    listener: _Latency | None = None

    def factory() -> _Latency:
        nonlocal listener
        listener = _Latency()
        return listener

    transport, _ = await ws_connect(factory, read.url, max_frame_size=1 << 24)
    assert listener is not None
    await asyncio.wait_for(listener.ready, 10)
    start = time.time() + 0.5
    procs = _emitters([(feed.socket_path, 1)], 1000, start, start + seconds)
    sent = await asyncio.to_thread(_sent, procs)
    deadline = time.monotonic() + 10
    while listener.events < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    transport.disconnect()
    assert listener.events == sent, (listener.events, sent)
    # The first 200 ms (connections warming up) are left out.
    return sorted(listener.samples[200:])


def latency(backend: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fr-broker-") as workdir:
        redis = Redis(workdir)
        relays: list[Relay] = []
        try:
            single = _relay(backend, workdir, "single")
            relays.append(single)
            alone = asyncio.run(_latency_run(single, single, seconds))
            single.stop()
            relays.clear()
            a = _relay(backend, workdir, "a", "--broker", redis.url)
            relays.append(a)
            b = _relay(backend, workdir, "b", "--broker", redis.url)
            relays.append(b)
            brokered = asyncio.run(_latency_run(a, b, seconds))
        finally:
            for relay in relays:
                relay.stop()
            redis.stop()
    return {
        "single_p50_us": percentile(alone, 0.5), "single_p99_us": percentile(alone, 0.99),
        "broker_p50_us": percentile(brokered, 0.5), "broker_p99_us": percentile(brokered, 0.99),
    }


def cpu(backend: str, rate: float, seconds: float, write_delay: float) -> dict[str, Any]:
    delay = ("--write-delay", str(write_delay))
    with tempfile.TemporaryDirectory(prefix="fr-broker-") as workdir:
        redis = Redis(workdir)
        relays: list[Relay] = []
        try:
            single = _relay(backend, workdir, "single", *delay)
            relays.append(single)
            alone = _cpu_run([single], single, rate, seconds)[0]
            single.stop()
            relays.clear()
            a = _relay(backend, workdir, "a", "--broker", redis.url, *delay)
            b = _relay(backend, workdir, "b", "--broker", redis.url, *delay)
            relays.extend([a, b])
            relay_a, relay_b, in_redis = _cpu_run([a, b], a, rate, seconds, redis.proc.pid)
        finally:
            for relay in relays:
                relay.stop()
            redis.stop()
    return {"single_us": alone, "broker_a_us": relay_a, "broker_b_us": relay_b,
            "redis_us": in_redis}


def _cpu_run(relays: list[Relay], feed: Relay, rate: float, seconds: float,
             *others: int) -> list[float]:
    pids = [relay.proc.pid for relay in relays] + list(others)
    base = relays[0].health()["seq"]
    before = [cpu_ns(pid) for pid in pids]
    start = time.time() + 0.3
    procs = _emitters([(feed.socket_path, 1)], rate, start, start + seconds)
    sent = _sent(procs)
    _wait_seq(relays, base + sent)
    after = [cpu_ns(pid) for pid in pids]
    return [(b - a) / 1000 / sent for a, b in zip(before, after, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--cpu-rate", type=float, default=20_000)
    parser.add_argument("--write-delay", type=float, default=0.002,
                        help="the second CPU measurement's --write-delay, for all its relays")
    parser.add_argument("--backends", default="cython,python")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for backend in args.backends.split(","):
        runs: dict[str, list[dict[str, Any]]] = {"throughput": [], "latency": [], "cpu": [],
                                                 "cpu_delay": []}
        for _ in range(args.repeats):
            runs["throughput"].append(throughput(backend, args.seconds))
            runs["latency"].append(latency(backend, args.latency_seconds))
            runs["cpu"].append(cpu(backend, args.cpu_rate, args.seconds, 0.0))
            runs["cpu_delay"].append(cpu(backend, args.cpu_rate, args.seconds, args.write_delay))
        results[backend] = {
            kind: {key: statistics.median(run[key] for run in kinds)
                   for key in kinds[0] if isinstance(kinds[0][key], (int, float))}
            for kind, kinds in runs.items()
        }
        results[backend]["runs"] = runs  # type: ignore[assignment]
    print("| backend | stream ev/s (2 relays) | p50 single / broker (µs) | "
          "p99 single / broker (µs) | p99 added (ms) | CPU µs/event: single | "
          "broker A / B / Redis | with --write-delay: single | broker A / B / Redis |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, r in results.items():
        t, lat, c, d = r["throughput"], r["latency"], r["cpu"], r["cpu_delay"]
        print(f"| {backend} | {t['events_per_s']:,.0f} | {lat['single_p50_us']:.0f} / "
              f"{lat['broker_p50_us']:.0f} | {lat['single_p99_us']:.0f} / "
              f"{lat['broker_p99_us']:.0f} | "
              f"{(lat['broker_p99_us'] - lat['single_p99_us']) / 1000:.2f} | "
              f"{c['single_us']:.2f} | {c['broker_a_us']:.2f} / {c['broker_b_us']:.2f} / "
              f"{c['redis_us']:.2f} | {d['single_us']:.2f} | {d['broker_a_us']:.2f} / "
              f"{d['broker_b_us']:.2f} / {d['redis_us']:.2f} |")
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
