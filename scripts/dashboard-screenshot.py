"""Regenerate the README screenshot: `python scripts/dashboard-screenshot.py docs/dashboard.png`.

A cython relay, 16 machines with live traffic, headless Debian Chromium.
"""
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_dashboard as T
from playwright.sync_api import sync_playwright
random.seed(7)
d = Path(tempfile.mkdtemp(prefix="frshot-", dir="/tmp"))
r = T.Relay("cython", d); r.start()
workers = [f"worker-{i:02d}" for i in range(1, 11)] + ["ingest-a", "ingest-b", "scheduler", "mailer", "thumbnailer", "billing-sync"]
flow = ["idle", "queued", "running", "uploading", "done"]
for w in workers:
    r.state(w, "idle")
time.sleep(1.0)
for i, w in enumerate(workers):
    for st in flow[1: 1 + (i % 4) + 1]:
        r.state(w, st, data={"job_id": f"task-{400 + i}"})
r.state("billing-sync", "error", data={"error": "upstream 503"})
r.state("mailer", "waiting", data={"reason": "rate limited"})
stop = False
def chatter():
    n = 0
    while not stop:
        w = random.choice(workers[:6])
        r.emit("activity", w, progress=round(random.random(), 2))
        n += 1
        if n % 7 == 0: r.emit("log", random.choice(workers), level=random.choice(["info", "info", "warning"]), message=random.choice(["chunk 17/40 written", "retrying upload (1/3)", "cache warm", "checkpoint saved"]))
        if n % 23 == 0: r.emit("job_done", random.choice(workers[:8]), job_id=f"task-{random.randint(400, 420)}", duration_s=round(random.uniform(1, 30), 1))
        time.sleep(0.03)
t = threading.Thread(target=chatter, daemon=True)
with sync_playwright() as p:
    b = p.chromium.launch(executable_path=T.CHROMIUM, args=T.CHROMIUM_ARGS)
    pg = b.new_page(viewport={"width": 1400, "height": 760})
    T.open_dashboard(pg, r)
    t.start()
    time.sleep(4)
    for w in ["worker-03", "worker-07"]:
        r.state(w, "processing", data={"job_id": "task-421"})
    time.sleep(2.0)
    for w, st in [("worker-09", "running"), ("ingest-b", "idle"), ("worker-02", "uploading")]:
        r.state(w, st, data={"job_id": "task-422"}); time.sleep(0.12)
    time.sleep(0.5)
    pg.screenshot(path=sys.argv[1])
    stop = True
    b.close()
r.close()
