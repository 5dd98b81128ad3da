"""How fast the dashboard follows the relay: `python bench/dashboard_update.py [--flood]`.

Measurements, not tests (tests/test_dashboard.py checks what the page shows):

* update: a ``state_change`` is emitted, and the time until the machine's row
  carries the new state is taken inside the page (performance.now() read just
  before the emit, a MutationObserver on the row), over ``--changes`` changes;
* --flood: ``--rate`` events/s from 200 machines for ``--seconds`` from another
  process; the rate reached, and the page's animation-frame gaps meanwhile.

A real ``fastrelay serve`` (``--backend``), headless Debian Chromium
(scripts/ensure-chromium.sh) driven by playwright. Prints the conditions with
the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from playwright.sync_api import sync_playwright

__all__ = ["main"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
_STARTED = re.compile(r"relaying (\S+) -> (ws://\S+) \(backend (\w+)")

_FLOOD = r"""
import orjson, socket, sys, time
path, rate, seconds, machines = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
states = ["idle", "queued", "running", "waiting", "saving", "done", "error"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # blocking: paced by the relay, never dropped
tick, sent, total, k = 0.01, 0, int(rate * seconds), 0
print("started", flush=True)
start = time.perf_counter()
while sent < total:
    k += 1
    due = min(total, int(k * rate * tick))
    while sent < due:
        i = sent % machines
        s.sendto(orjson.dumps({"type": "state_change", "machine_id": f"f-{i:03d}",
                               "state": states[(sent // machines + i) % len(states)],
                               "timestamp": time.time(), "data": {"n": sent}}), path)
        sent += 1
    delay = start + k * tick - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
print(orjson.dumps({"sent": sent, "elapsed": time.perf_counter() - start}).decode(), flush=True)
"""


def start_relay(backend: str, workdir: Path, *extra: str) -> tuple[subprocess.Popen[str], str, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--port", "0", "--backend", backend,
         "--socket", str(workdir / "relay.sock"), "--log-dir", str(workdir / "logs"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        started = _STARTED.search(line)
        if started:
            http = started.group(2).split("/ws/")[0].replace("ws://", "http://", 1)
            return proc, started.group(1), http, started.group(3)
    raise SystemExit("the relay did not start")


def open_dashboard(page: Any, http: str) -> None:
    page.goto(http + "/")
    page.wait_for_function("() => window.fastrelayDashboard && fastrelayDashboard.connected"
                           " && fastrelayDashboard.stats.initials >= 1", timeout=10_000)


def update(page: Any, sock: socket.socket, socket_path: str, changes: int) -> None:
    def state(s: str) -> None:
        sock.sendto(orjson.dumps({"type": "state_change", "machine_id": "lat-1", "state": s,
                                  "timestamp": time.time()}), socket_path)

    state("s-init")
    page.wait_for_selector('tr[data-machine-id="lat-1"][data-state="s-init"]', timeout=10_000)
    page.evaluate("""() => {
        const tr = document.querySelector('tr[data-machine-id="lat-1"]');
        window.__changes = [];
        new MutationObserver(() => window.__changes.push({t: performance.now(), s: tr.dataset.state}))
            .observe(tr, {attributes: true, attributeFilter: ['data-state']});
    }""")
    latencies = []
    for i in range(changes):
        s = f"s-{i}"
        t0 = page.evaluate("performance.now()")  # before the emit: an upper bound
        state(s)
        page.wait_for_function("(s) => window.__changes.some(c => c.s === s)", arg=s, timeout=10_000)
        latencies.append(page.evaluate("(s) => window.__changes.find(c => c.s === s).t", s) - t0)
        time.sleep(0.05)  # a lone change each time, not a burst
    latencies.sort()
    print(f"state change -> row updated, {changes} changes one at a time: "
          f"median {latencies[len(latencies) // 2]:.1f} ms, max {latencies[-1]:.1f} ms")


def flood(page: Any, socket_path: str, rate: int, seconds: float, machines: int = 200) -> None:
    page.evaluate("""() => {
        const d = window.__frames = {on: true, last: 0, max: 0, gaps: 0, sum: 0};
        const f = (t) => {
            if (d.last) { const g = t - d.last; d.gaps++; d.sum += g; if (g > d.max) d.max = g; }
            d.last = t;
            if (d.on) requestAnimationFrame(f);
        };
        requestAnimationFrame(f);
    }""")
    before = page.evaluate("fastrelayDashboard.stats.events")
    proc = subprocess.Popen([sys.executable, "-c", _FLOOD, socket_path, str(rate), str(seconds),
                             str(machines)], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=seconds * 4 + 60)
    result = json.loads(out.strip().splitlines()[-1])
    page.wait_for_function("(n) => fastrelayDashboard.stats.events >= n",
                           arg=before + result["sent"], timeout=60_000)
    frames = page.evaluate("(() => { window.__frames.on = false; return {...window.__frames}; })()")
    stats = page.evaluate("({...fastrelayDashboard.stats})")
    print(f"flood, {machines} machines asked for {rate}/s for {seconds} s: {result['sent']} events in "
          f"{result['elapsed']:.2f} s ({result['sent'] / result['elapsed']:,.0f}/s); page frames "
          f"{frames['gaps']}, mean gap {frames['sum'] / max(1, frames['gaps']):.1f} ms, max gap "
          f"{frames['max']:.1f} ms; slowest render {stats['maxRenderMs']:.1f} ms; "
          f"connection closes {stats['closes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "cython", "python"])
    parser.add_argument("--changes", type=int, default=15)
    parser.add_argument("--flood", action="store_true", help="measure a flood as well")
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="frdash-") as d:
        proc, socket_path, http, backend = start_relay(args.backend, Path(d))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                version = browser.version
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                open_dashboard(page, http)
                print(f"relay backend {backend}, Python {platform.python_version()}, Chromium {version} "
                      f"headless, {os.cpu_count()} CPUs shared by relay, browser and emitter")
                update(page, sock, socket_path, args.changes)
                if args.flood:
                    flood(page, socket_path, args.rate, args.seconds)
                browser.close()
        finally:
            sock.close()
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
