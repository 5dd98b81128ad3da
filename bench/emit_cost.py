"""What one ``Emitter.emit`` costs the emitting process: `python bench/emit_cost.py`.

Measurements, not tests (tests/test_emitter.py checks behaviour only). Two cases:

* no relay: the socket path does not exist; every call returns False;
* a burst: 10,000 emits in a tight loop to a real ``fastrelay serve`` (default
  options), the way tests/test_emitter.py's burst test emits them; how long the
  loop took, the slowest single call, and how many events were still waiting
  in the emitter's backlog when the loop ended (the loop never waits for the relay).

Prints the conditions (Python, backend, CPUs, max_dgram_qlen) with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastrelay.emit import Emitter

__all__ = ["main"]

_STARTED = re.compile(r"relaying (\S+) -> (ws://\S+) \(backend (\w+)")


def _qlen() -> str:
    try:
        return Path("/proc/sys/net/unix/max_dgram_qlen").read_text().strip()
    except OSError:
        return "?"


def _percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def no_relay(calls: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        emitter = Emitter(os.path.join(d, "nobody.sock"), hold=0)
        durations = []
        for _ in range(calls):
            started = time.perf_counter()
            emitter.emit("state_change", "m", state="x")
            durations.append(time.perf_counter() - started)
    durations.sort()
    print(f"no relay, {calls} calls: median {statistics.median(durations) * 1e6:.1f} us, "
          f"p99 {_percentile(durations, 0.99) * 1e6:.1f} us, max {durations[-1] * 1e6:.1f} us")


def burst(events: int, backend: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fr-emitcost-") as d:
        socket_path = os.path.join(d, "relay.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastrelay", "serve", "--port", "0", "--socket", socket_path,
             "--log-dir", os.path.join(d, "logs"), "--backend", backend],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            running = None
            for line in proc.stdout:
                running = _STARTED.search(line)
                if running:
                    break
            if running is None:
                raise SystemExit("the relay did not start")
            emitter = Emitter(socket_path)
            worst = 0.0
            started = time.perf_counter()
            for i in range(events):
                t = time.perf_counter()
                emitter.emit("burst", "b", n=i)
                worst = max(worst, time.perf_counter() - t)
            loop_s = time.perf_counter() - started
            pending = emitter.pending
            flushed = emitter.flush(30)
            print(f"burst to a {running.group(3)} relay, {events} events: loop {loop_s * 1e3:.1f} ms "
                  f"({events / loop_s:,.0f}/s), slowest emit {worst * 1e6:.0f} us, "
                  f"{pending} pending at loop end, all flushed: {flushed}, "
                  f"dropped {sum(emitter.dropped.values())}")
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--backend", default="auto", choices=["auto", "cython", "python"])
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"net.unix.max_dgram_qlen {_qlen()}")
    no_relay(args.calls)
    burst(args.events, args.backend)


if __name__ == "__main__":
    main()
