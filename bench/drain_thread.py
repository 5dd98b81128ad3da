"""Does draining the datagram socket from a native thread pay? Side by side, one run.

    python bench/drain_thread.py --duration 5 --repeats 3 --clients 100

For each mode (the Cython hub reading on the loop; the Cython hub with
--drain-thread; the Python hub as reference) a relay is started on core 0,
`--clients` picows readers in one process and `--emitters` max-rate emitter
processes on core 1. Each emitter sends on a connected non-blocking socket and
counts EAGAIN (a stall: the kernel queue of max_dgram_qlen datagrams was full)
before waiting for POLLOUT. Reported, medians over repeats: accepted events/s,
mean datagrams per drained batch, emitter stalls per 1,000 events, relay CPU
µs per accepted event.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

EMITTER = r"""
import os, select, socket, sys, time, json
path, duration = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(path)
s.setblocking(False)
p = select.poll()
p.register(s, select.POLLOUT)
payload = json.dumps({"type": "state_change", "machine_id": f"m{os.getpid()}", "state": "x",
                      "pad": "p" * 120}).encode()
sent = stalls = 0
end = time.monotonic() + duration
while time.monotonic() < end:
    try:
        s.send(payload)
        sent += 1
    except BlockingIOError:
        stalls += 1
        p.poll(100)
print(sent, stalls)
"""

READERS = r"""
import asyncio, sys
from picows import WSListener, WSMsgType, ws_connect
class R(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.TEXT and frame.payload_size < 64:
            if b'"ping"' in frame.get_payload_as_bytes():
                transport.send(WSMsgType.TEXT, b'{"type":"pong"}')
async def main():
    for _ in range(int(sys.argv[2])):
        await ws_connect(R, sys.argv[1])
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""

MODES = {
    "cython": ["--backend", "cython"],
    "cython+drain-thread": ["--backend", "cython", "--drain-thread"],
    "python": ["--backend", "python"],
}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(http: str) -> dict[str, float]:
    with urllib.request.urlopen(http + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for name in ("fastrelay_events_accepted_total", "fastrelay_batch_size_count"):
        out[name] = float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    return out


def run_once(mode: str, args: argparse.Namespace) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="fr-drain-")
    sock = os.path.join(workdir, "d.sock")
    relay = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "fastrelay", "serve", "--port", "0",
         "--socket", sock, "--log-dir", workdir, *MODES[mode]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = re.search(r"-> (ws://\S+)", relay.stdout.readline()).group(1)
    http = url.split("/ws/")[0].replace("ws://", "http://")
    readers = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", READERS, url,
                                str(args.clients)], stdout=subprocess.PIPE, text=True)
    assert readers.stdout.readline().strip() == "ready"
    before = metrics(http)
    cpu0 = cpu_seconds(relay.pid)
    t0 = time.monotonic()
    emitters = [subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", EMITTER, sock,
                                  str(args.duration)], stdout=subprocess.PIPE, text=True)
                for _ in range(args.emitters)]
    sent = stalls = 0
    for proc in emitters:
        a, b = proc.communicate()[0].split()
        sent += int(a)
        stalls += int(b)
    time.sleep(0.2)
    elapsed = time.monotonic() - t0
    after = metrics(http)
    cpu = cpu_seconds(relay.pid) - cpu0
    readers.kill()
    relay.send_signal(signal.SIGTERM)
    relay.wait(10)
    accepted = after["fastrelay_events_accepted_total"] - before["fastrelay_events_accepted_total"]
    batches = after["fastrelay_batch_size_count"] - before["fastrelay_batch_size_count"]
    return {
        "accepted_per_s": accepted / elapsed,
        "batch_mean": accepted / max(batches, 1),
        "stalls_per_1k": 1000 * stalls / max(sent, 1),
        "cpu_us_per_event": 1e6 * cpu / max(accepted, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--emitters", type=int, default=2)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    with open("/proc/sys/net/unix/max_dgram_qlen") as f:
        qlen = f.read().strip()
    print(f"# drain-thread experiment {time.strftime('%Y-%m-%d %H:%M')} python "
          f"{sys.version.split()[0]}, {os.cpu_count()} cores, max_dgram_qlen={qlen}, "
          f"{args.clients} clients, {args.emitters} max-rate emitters, ~170-byte events, "
          f"{args.duration:.0f}s x {args.repeats} (interleaved), relay on core 0, load on core 1")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in args.modes}
    for _ in range(args.repeats):
        for mode in args.modes:  # interleaved so drift on a noisy host hits every mode alike
            results[mode].append(run_once(mode, args))
    print("| mode | accepted events/s | mean batch | emitter stalls / 1k events "
          "| relay CPU µs / event |")
    print("|---|---:|---:|---:|---:|")
    for mode, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {mode} | {med['accepted_per_s']:,.0f} | {med['batch_mean']:.1f} | "
              f"{med['stalls_per_1k']:.1f} | {med['cpu_us_per_event']:.2f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
