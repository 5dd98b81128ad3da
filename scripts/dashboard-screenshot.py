"""Regenerate the README screenshot: `python scripts/dashboard-screenshot.py docs/dashboard.png`.

A cython relay, 16 machines with live traffic, headless Debian Chromium
(scripts/ensure-chromium.sh installs it).
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_dashboard as dash  # noqa: E402  (needs the tests folder on the path)
from playwright.sync_api import sync_playwright  # noqa: E402

WORKERS = [f"worker-{i:02d}" for i in range(1, 11)] + [
    "ingest-a", "ingest-b", "scheduler", "mailer", "thumbnailer", "billing-sync",
]
FLOW = ["idle", "queued", "running", "uploading", "done"]
MESSAGES = ["chunk 17/40 written", "retrying upload (1/3)", "cache warm", "checkpoint saved"]


def chatter(relay: dash.Relay, stop: threading.Event) -> None:
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
    relay = dash.Relay("cython", Path(tempfile.mkdtemp(prefix="frshot-")))
    relay.start()
    for worker in WORKERS:
        relay.state(worker, "idle")
    time.sleep(1.0)
    for i, worker in enumerate(WORKERS):
        for state in FLOW[1: 2 + i % 4]:
            relay.state(worker, state, data={"job_id": f"task-{400 + i}"})
    relay.state("billing-sync", "error", data={"error": "upstream 503"})
    relay.state("mailer", "waiting", data={"reason": "rate limited"})
    stop = threading.Event()
    talker = threading.Thread(target=chatter, args=(relay, stop), daemon=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=dash.CHROMIUM, args=dash.CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 760})
        dash.open_dashboard(page, relay)
        talker.start()
        time.sleep(4)
        for worker in ("worker-03", "worker-07"):
            relay.state(worker, "processing", data={"job_id": "task-421"})
        time.sleep(2.0)
        for worker, state in (("worker-09", "running"), ("ingest-b", "idle"), ("worker-02", "uploading")):
            relay.state(worker, state, data={"job_id": "task-422"})
            time.sleep(0.12)
        time.sleep(0.5)
        page.screenshot(path=out)
        stop.set()
        browser.close()
    relay.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
