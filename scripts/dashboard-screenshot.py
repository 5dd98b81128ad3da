"""Regenerate the README screenshot: `python scripts/dashboard-screenshot.py docs/dashboard.png`.

A cython relay (`python -m fastrelay serve`, started here), 16 machines with
five minutes of state changes behind them (emitted with past timestamps, so the
timeline draws them from /api/history) and live traffic, a group filter in use
(`/?machines=worker-*,ingest-?`) and one span hovered; headless Debian
Chromium (scripts/ensure-chromium.sh installs it) driven by playwright.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from fastrelay import Emitter

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WORKERS = [f"worker-{i:02d}" for i in range(1, 11)] + [
    "ingest-a", "ingest-b", "scheduler", "mailer", "thumbnailer", "billing-sync",
]
FLOW = ["idle", "queued", "running", "uploading", "done"]
FILTER = "worker-*,ingest-?"   # leaves out scheduler, mailer, thumbnailer, billing-sync
PAST_S = 330                   # history behind each machine, a little over the 5 min window
MESSAGES = ["chunk 17/40 written", "retrying upload (1/3)", "cache warm", "checkpoint saved"]
_STARTED = re.compile(r"relaying (\S+) -> (ws://\S+) \(backend (\w+)")


class Relay:
    """`fastrelay serve` on a free port, its socket and logs in a fresh directory."""

    def __init__(self, backend: str) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="frshot-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrelay", "serve", "--port", "0", "--backend", backend,
             "--socket", str(workdir / "relay.sock"), "--log-dir", str(workdir / "logs")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            started = _STARTED.search(line)
            if started:
                break
        else:
            raise SystemExit("the relay did not start:\n" + "".join(lines))
        self.socket_path, ws_url = started.group(1), started.group(2)
        self.http = ws_url.split("/ws/")[0].replace("ws://", "http://", 1)
        self.emitter = Emitter(self.socket_path)

    def emit(self, event_type: str, machine_id: str, **fields: object) -> None:
        self.emitter.emit(event_type, machine_id, **fields)

    def state(self, machine_id: str, state: str, **fields: object) -> None:
        self.emit("state_change", machine_id, state=state, **fields)

    def machines(self) -> int:
        with urllib.request.urlopen(self.http + "/healthz", timeout=5) as r:
            return int(json.loads(r.read())["machines"])

    def close(self) -> None:
        self.emitter.flush(5)
        self.proc.terminate()
        self.proc.wait(10)


def chatter(relay: Relay, stop: threading.Event) -> None:
    """Live traffic whose rate rises and falls, so the sparkline has a shape."""
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        relay.emit("activity", random.choice(WORKERS[:6]), progress=round(random.random(), 2))
        n += 1
        if n % 7 == 0:
            relay.emit("log", random.choice(WORKERS), message=random.choice(MESSAGES),
                       level=random.choice(["info", "info", "warning"]))
        if n % 23 == 0:
            relay.emit("job_done", random.choice(WORKERS[:8]), job_id=f"task-{random.randint(400, 420)}",
                       duration_s=round(random.uniform(1, 30), 1))
        time.sleep(0.012 + 0.03 * (1 + math.sin((time.monotonic() - start) / 2.5)))


def past(relay: Relay) -> None:
    """Each machine's last few minutes: jobs going through FLOW, now and then a failure."""
    now = time.time()
    job = 300
    for i, worker in enumerate(WORKERS):
        t = now - PAST_S + random.uniform(0, 40)
        while t < now - 20:
            job += 1
            flow = FLOW if random.random() > 0.15 else [*FLOW[:3], "error"]
            for state in flow:
                if t >= now - 20:
                    break
                data = {"job_id": f"task-{job}"}
                if state == "error":
                    data["error"] = "upstream 503"
                relay.state(worker, state, timestamp=t, data=data)
                t += random.uniform(4, 30) * (2.5 if state in ("running", "idle") else 1)
        relay.state(worker, FLOW[i % 4], data={"job_id": f"task-{400 + i}"})


def main(out: str) -> None:
    random.seed(7)
    relay = Relay("cython")
    try:
        past(relay)
        relay.emitter.flush(10)  # all of it in the relay's history before the page asks
        deadline = time.monotonic() + 10
        while relay.machines() < len(WORKERS):
            if time.monotonic() > deadline:
                raise SystemExit("the relay did not register the machines")
            time.sleep(0.05)
        stop = threading.Event()
        talker = threading.Thread(target=chatter, args=(relay, stop), daemon=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(relay.http + "/?machines=" + FILTER)
            page.wait_for_function(
                "() => window.fastrelayDashboard && fastrelayDashboard.connected"
                " && fastrelayDashboard.stats.historyLoads >= 1", timeout=10_000)
            talker.start()
            # The pauses below stage the picture (rates, ages and a sparkline worth showing).
            time.sleep(22)
            for worker in ("worker-03", "worker-07"):
                relay.state(worker, "processing", data={"job_id": "task-421"})
            time.sleep(2.0)
            for worker, state in (("worker-09", "running"), ("ingest-b", "idle"),
                                  ("worker-02", "uploading")):
                relay.state(worker, state, data={"job_id": "task-422"})
                time.sleep(0.12)
            time.sleep(0.5)
            hover(page, "worker-04")
            page.screenshot(path=out)
            stop.set()
            talker.join(5)
            browser.close()
    finally:
        relay.close()


def hover(page: Page, machine_id: str) -> None:
    """Point at the widest span of a lane that starts in the window, so the picture shows its details."""
    point = page.evaluate(
        """(id) => {
            const lane = fastrelayDashboard.timeline().lanes.find(l => l.id === id);
            const from = Date.now() / 1000 - fastrelayDashboard.timeline().window;
            const wide = lane.spans.filter(s => s.start > from)
                .sort((a, b) => (b.end - b.start) - (a.end - a.start))[0];
            return fastrelayDashboard.timelinePoint(id, wide.seq);
        }""", machine_id)
    page.mouse.move(point["x"], point["y"])
    page.wait_for_selector("#timeline-tip:not([hidden])")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
