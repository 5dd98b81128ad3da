"""What subscriptions cost: 1,000 clients on 10 filters against the same clients unfiltered.

For each backend, side by side in one run, in interleaved rounds:

- *unfiltered*: 1,000 picows clients (bench/clients.py, 10 processes of 100)
  on ``/ws/events``; 10 emitters (bench/loadgen.py) at 20 events/s each, 200
  events/s in all, each emitter's events naming its own 16 machines
  (``bench-E-mI``). Every client gets every event: 200,000 deliveries/s.
- *filtered*: the same clients, each process's 100 on one filter
  ``?machines=bench-E-m*``, one per emitter: each client gets its emitter's
  20 events/s, 20,000 deliveries/s in all.
- *unfiltered-100*: one process of 100 unfiltered clients, the same emitters:
  the filtered run's deliveries and writes (100 per event, one event each)
  without filters, which isolates what filtering itself costs. The first pair
  differs in batching as well: a relay writing each event to 1,000 clients
  takes long enough that the next events join the same write, so it makes
  fewer, larger writes per delivery, and a write (a loopback TCP send) costs
  far more than the bytes in it.
- *filtered-one*: the filtered run's ten filters and 1,000 clients, but the
  100 clients of one process on ``?machines=bench-*`` (every event) and the
  others on filters that match nothing: the same filter work per event and
  the same deliveries, written to the same 100 sockets every time. Against
  *filtered*, whose consecutive events go to different groups of 100
  sockets, it shows what that rotation costs.

Per run: relay CPU (schedstat, all threads) over the window divided by the
deliveries the clients counted in it (µs per delivery), and the growth of
``fastrelay_frames_sent_total`` per accepted event over the window: frames
built for fan-out, which stays one per event when ten filters share out a
thousand clients (it would be a hundred per event if framing were per client).
Medians over ``--repeats``; the ratio is filtered / unfiltered.

``python -m bench.subscriptions --repeats 5`` prints a markdown table
(``--json PATH`` keeps every run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import sched_ns
from bench.procs import ClientProc, Relay, spawn_emitters

BACKENDS = ("fastrelay-cython", "fastrelay-python")
MODES = ("unfiltered", "filtered", "unfiltered-100", "filtered-one")
_SAMPLE = re.compile(rb"^(fastrelay_\w+) ([0-9.e+]+)$", re.MULTILINE)


def metrics(relay: Relay) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.port}/metrics", timeout=5) as answer:
        return {m.group(1).decode(): float(m.group(2)) for m in _SAMPLE.finditer(answer.read())}


def one_run(contender: str, mode: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    relay = Relay(contender, args.ping_interval, workdir)
    relay.start()
    emitters = list(range(1, args.filters + 1))
    procs: list[ClientProc] = []
    try:
        for em in emitters[:1] if mode == "unfiltered-100" else emitters:
            proc = ClientProc()
            procs.append(proc)
            url = {
                "filtered": f"{relay.url}?machines=bench-{em}-m*",
                "filtered-one": f"{relay.url}?machines="
                                + ("bench-*" if em == emitters[0] else f"none-{em}-*"),
            }.get(mode, relay.url)
            proc.send({"cmd": "connect", "url": url, "n": args.clients // args.filters,
                       "probes": 0, "stall": False, "timeout": 120})
        replies = [p.recv(150) for p in procs]
        connected = sum(r["connected"] for r in replies)
        start = time.time() + 0.5
        t0, t1 = start + args.warmup, start + args.warmup + args.duration
        for p in procs:
            p.send({"cmd": "arm", "t0": t0, "t1": t1})
        for p in procs:
            p.recv(30)
        rate_each = args.rate / args.filters
        jitter = args.jitter if args.jitter >= 0 else 1 / rate_each
        emitting = spawn_emitters(relay.socket, emitters, rate_each, start, t1, (t0, t1),
                                  args.size, jitter)
        time.sleep(max(0.0, t0 - time.time()))
        m0, r0 = metrics(relay), sched_ns(relay.pid)
        time.sleep(max(0.0, t1 - time.time()))
        r1, m1 = sched_ns(relay.pid), metrics(relay)
        sent_window = 0
        for e in emitting:
            out, _ = e.communicate(timeout=15)
            sent_window += json.loads(out.decode().strip().splitlines()[-1]).get("sent_window", 0)
        time.sleep(1.0)  # what was sent inside the window reaches the clients
        for p in procs:
            p.send({"cmd": "stats", "lat_file": None, "expect": None})
        stats = [p.recv(60) for p in procs]
        deliveries = sum(s["window"] for s in stats)
        closed = sum(s["closed"] for s in stats)
        cpu_s = (r1[0] - r0[0]) / 1e9
        accepted = m1["fastrelay_events_accepted_total"] - m0["fastrelay_events_accepted_total"]
        frames = m1["fastrelay_frames_sent_total"] - m0["fastrelay_frames_sent_total"]
        relayed = m1["fastrelay_events_relayed_total"] - m0["fastrelay_events_relayed_total"]
        return {
            "contender": contender, "mode": mode, "clients": connected, "closed": closed,
            "sent_window": sent_window, "deliveries": deliveries,
            "relay_cpu_s": cpu_s, "window_s": args.duration,
            "us_per_delivery": cpu_s * 1e6 / deliveries if deliveries else None,
            "frames_per_event": frames / accepted if accepted else None,
            "relayed_per_event": relayed / accepted if accepted else None,
            "relay_cpu_pct": 100 * cpu_s / args.duration,
        }
    finally:
        for p in procs:
            p.close()
        relay.stop()


def med(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.clients} clients ({args.clients // args.filters} per filter, {args.filters} "
        f"filters) at {args.rate:g} events/s of {args.size} bytes, emitters "
        f"{'aligned' if args.jitter == 0 else 'independent (jittered)'}; window {args.duration:g} s "
        f"after {args.warmup:g} s warm-up; medians of {args.repeats} interleaved rounds.",
        "",
        "| backend | mode | relay µs / delivery | deliveries in window | relay CPU % "
        "| frames built / event | deliveries / event | filtered / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    def of(contender: str, mode: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["contender"] == contender and r["mode"] == mode]

    for contender in BACKENDS:
        filtered = med(of(contender, "filtered"), "us_per_delivery")
        for mode in MODES:
            mine = of(contender, mode)
            if not mine:
                continue
            us = med(mine, "us_per_delivery")
            lines.append(
                f"| {contender} | {mode} | {us:.2f} | {med(mine, 'deliveries'):.0f} "
                f"| {med(mine, 'relay_cpu_pct'):.1f} | {med(mine, 'frames_per_event'):.2f} "
                f"| {med(mine, 'relayed_per_event'):.0f} "
                f"| {'' if mode == 'filtered' else f'{filtered / us:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--filters", type=int, default=10)
    p.add_argument("--rate", type=float, default=200.0, help="events/s, all emitters together")
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--jitter", type=float, default=-1.0,
                   help="each send's random delay within its emitter's period, s (default: the "
                        "whole period, so emitters send independently, as a fleet's machines do; "
                        "0 aligns them, and every emitter sends at the same instants)")
    p.add_argument("--ping-interval", type=float, default=60.0,
                   help="passed to every relay: long, so that no ping round (a write to every "
                        "client and a pong from each) falls in the window of one mode and not "
                        "another's")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-subs-") as workdir:
        for round_no in range(args.repeats):
            for contender in backends:
                for mode in [m for m in args.modes.split(",") if m]:
                    run = one_run(contender, mode, args, workdir)
                    runs.append(run)
                    print(f"round {round_no + 1}: {contender} {mode}: "
                          f"{run['us_per_delivery']:.2f} µs/delivery, "
                          f"{run['frames_per_event']:.2f} frames/event, "
                          f"{run['deliveries']} deliveries, closed {run['closed']}",
                          file=sys.stderr, flush=True)
    text = report(runs, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
