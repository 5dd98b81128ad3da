"""Regenerate the README screenshot: `python scripts/dashboard-screenshot.py docs/dashboard.png`.

A cython relay (`python -m fastrelay serve`, started here), 16 machines with
live traffic, headless Debian Chromium (scripts/ensure-chromium.sh installs it)
driven by playwright.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from fastrelay import Emitter

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WORKERS = [f"worker-{i:02d}" for i in range(1, 11)] + [
    "ingest-a", "ingest-b", "scheduler", "mailer", "thumbnailer", "billing-sync",
]
FLOW = ["idle", "queued", "running", "uploading", "done"]
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
    n = 0
    while not stop.is_set():
        relay.emit("activity", random.choice(WORKERS[:6]), progress=round(random.random(), 2))
        n += 1
        if n % 7 == 0:
            relay.emit("log", random.choice(WORKERS), message=random.choice(MESSAGES),
                       level=random.choice(["info", "info", "warning"]))
        if n % 23 == 0:
            relay.emit("job_done", random.choice(WORKERS[:8]), job_id=f"task-{random.randint(400, 420)}",
                       duration_s=round(random.uniform(1, 30), 1))
        time.sleep(0.03)


def main(out: str) -> None:
    random.seed(7)
    relay = Relay("cython")
    try:
        for worker in WORKERS:
            relay.state(worker, "idle")
        deadline = time.monotonic() + 10
        while relay.machines() < len(WORKERS):
            if time.monotonic() > deadline:
                raise SystemExit("the relay did not register the machines")
            time.sleep(0.05)
        for i, worker in enumerate(WORKERS):
            for state in FLOW[1: 2 + i % 4]:
                relay.state(worker, state, data={"job_id": f"task-{400 + i}"})
        relay.state("billing-sync", "error", data={"error": "upstream 503"})
        relay.state("mailer", "waiting", data={"reason": "rate limited"})
        stop = threading.Event()
        talker = threading.Thread(target=chatter, args=(relay, stop), daemon=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 760})
            page.goto(relay.http + "/")
            page.wait_for_function(
                "() => window.fastrelayDashboard && fastrelayDashboard.connected"
                " && fastrelayDashboard.stats.initials >= 1", timeout=10_000)
            talker.start()
            # The pauses below stage the picture (rates and ages worth showing).
            time.sleep(4)
            for worker in ("worker-03", "worker-07"):
                relay.state(worker, "processing", data={"job_id": "task-421"})
            time.sleep(2.0)
            for worker, state in (("worker-09", "running"), ("ingest-b", "idle"),
                                  ("worker-02", "uploading")):
                relay.state(worker, state, data={"job_id": "task-422"})
                time.sleep(0.12)
            time.sleep(0.5)
            page.screenshot(path=out)
            stop.set()
            talker.join(5)
            browser.close()
    finally:
        relay.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
