"""Emitter process: sends numbered events to the relay's datagram socket.

``python -m bench.loadgen --socket PATH --emitter ID --rate R --start-at T --stop-at T
[--window T0 T1] [--size 200]`` prints one JSON line when done.

``--jitter S`` (fixed rate only) sends event ``seq`` at a uniformly random
point of ``[start + seq / rate, start + seq / rate + S)`` instead of exactly on
the grid: an exactly periodic relay is sampled by the kernel's periodic tick
always at the same point of its work, which makes the user/system split of
/proc/PID/stat (tick-sampled) wrong by far more than its resolution.

``--rate 0`` is max rate. Both modes use a connected, non-blocking socket and on
EAGAIN (the kernel queues only ``net.unix.max_dgram_qlen`` datagrams, 10 on this
host) wait for POLLOUT, counting each such wait as a stall: the stall count and
the time spent stalled say how often the relay, not the emitter, was the limit.
Each event's ``sent_at`` is taken when it is built, before the first attempt,
so latency includes any stall.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import select
import socket
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import EventTemplate, emit_json

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--socket", required=True)
    p.add_argument("--emitter", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = as fast as the relay takes them")
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at")
    p.add_argument("--stop-at", type=float, required=True, help="time.time() to stop at")
    p.add_argument("--window", type=float, nargs=2, default=(0.0, 0.0))
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--machines", type=int, default=16)
    p.add_argument("--jitter", type=float, default=0.0, help="fixed rate: random delay of each send, 0..S s")
    args = p.parse_args(argv)

    build = EventTemplate(args.emitter, args.size, args.machines).builder()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deadline = time.time() + 5
    while True:
        try:
            sock.connect(args.socket)
            break
        except OSError:
            if time.time() > deadline:
                emit_json({"error": f"cannot connect to {args.socket}"})
                return 1
            time.sleep(0.05)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    send = sock.send
    poll = poller.poll
    time_ns = time.time_ns

    start_ns = int(max(args.start_at, time.time()) * 1e9)
    stop_ns = int(args.stop_at * 1e9)
    w0, w1 = int(args.window[0] * 1e9), int(args.window[1] * 1e9)
    while time_ns() < start_ns:
        time.sleep(min(0.01, max(0.0, (start_ns - time_ns()) / 1e9)))

    seq = 0
    stalls = 0
    stalled_ns = 0
    errors = 0
    sent_window = 0
    first_window_ns = 0
    last_window_ns = 0
    cpu0 = time.process_time()
    rate = args.rate
    interval_ns = int(1e9 / rate) if rate > 0 else 0
    jitter_ns = int(args.jitter * 1e9) if interval_ns else 0
    rng = random.Random(args.emitter)
    t_start = time_ns()
    now = t_start
    gave_up = False
    next_ns = t_start + (int(rng.random() * jitter_ns) if jitter_ns else 0)
    while now < stop_ns:
        if jitter_ns:
            if now < next_ns:
                time.sleep(max(0.0, (next_ns - time_ns()) / 1e9))
                now = time_ns()
                continue
            burst = 1
            next_ns = t_start + (seq + 1) * interval_ns + int(rng.random() * jitter_ns)
        elif interval_ns:
            due = (now - t_start) // interval_ns + 1
            if seq >= due:
                next_ns = t_start + seq * interval_ns
                time.sleep(max(0.0, (next_ns - time_ns()) / 1e9))
                now = time_ns()
                continue
            burst = due - seq
        else:
            burst = 64
        for _ in range(burst):
            ns = time_ns()
            data = build(seq, ns)
            while True:
                try:
                    send(data)
                    break
                except BlockingIOError:
                    stalls += 1
                    t = time_ns()
                    poll(100)
                    stalled_ns += time_ns() - t
                    if time_ns() > stop_ns + 2_000_000_000:
                        gave_up = True
                        break
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
                        gave_up = True
                        break
                    errors += 1
                    break
            if gave_up:
                break
            if w0 <= ns < w1:
                if not sent_window:
                    first_window_ns = ns
                sent_window += 1
                last_window_ns = ns
            seq += 1
        if gave_up:
            break
        now = time_ns()
    t_end = time_ns()
    emit_json(
        {
            "emitter": args.emitter,
            "sent": seq,
            "sent_window": sent_window,
            "first_window_ns": first_window_ns,
            "last_window_ns": last_window_ns,
            "stalls": stalls,
            "stalled_s": stalled_ns / 1e9,
            "errors": errors,
            "gave_up": gave_up,
            "elapsed_s": (t_end - t_start) / 1e9,
            "cpu_s": time.process_time() - cpu0,
            "target_rate": rate,
            "jitter_s": jitter_ns / 1e9,
            "size": len(build(seq, t_end)),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
