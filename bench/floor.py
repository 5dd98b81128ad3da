"""The floor: one 200-byte write to each of N loopback TCP sockets, timed.

No WebSocket, no event loop, no JSON: a plain Python loop calling
``socket.send`` once per socket (TCP_NODELAY on, as asyncio sets it), which is
what any relay that writes each event to each client separately cannot beat.
The receiving ends live in a child process (pinned to the load core when there
is one) and are never read; the kernel's loopback delivery happens in the
sender's ``send`` call either way. Two processes, because RLIMIT_NOFILE may not
be raisable past 20,000 here.

``python -m bench.floor --clients 10000 --size 200 --repeats 5`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import LOAD_CPUS, emit_json, raise_nofile

__all__ = ["main", "measure"]


_FAR_ENDS = """
import os, resource, socket, sys
host, port, n, cpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = [socket.create_connection((host, port)) for _ in range(n)]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def measure(clients: int, size: int, repeats: int, batch: int = 1) -> dict[str, object]:
    raise_nofile(clients + 256)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    host, port = listener.getsockname()
    far = subprocess.Popen(
        [sys.executable, "-c", _FAR_ENDS, host, str(port), str(clients), LOAD_CPUS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    inner: list[socket.socket] = []
    for _ in range(clients):
        s, _peer = listener.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        inner.append(s)
    assert far.stdout is not None and far.stdout.readline().strip() == b"ready"
    frame = (
        b"\x81\x7e" + size.to_bytes(2, "big") + b"x" * size
        if size > 125
        else bytes([0x81, size]) + b"x" * size
    )
    payload = frame * batch
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        time.sleep(0.1)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for s in inner:
            s.send(payload)
        t1 = time.perf_counter()
        c1 = time.process_time()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    for s in inner:
        s.close()
    listener.close()
    assert far.stdin is not None
    far.stdin.close()
    far.wait(10)
    w = statistics.median(wall)
    return {
        "clients": clients,
        "frame_bytes": len(frame),
        "frames_per_write": batch,
        "repeats": repeats,
        "wall_ms": w * 1e3,
        "cpu_ms": statistics.median(cpu) * 1e3,
        "us_per_write": w * 1e6 / clients,
        "us_per_frame": w * 1e6 / (clients * batch),
        "all_wall_ms": [x * 1e3 for x in wall],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="frames per write (1 = the floor)")
    args = p.parse_args(argv)
    emit_json(measure(args.clients, args.size, args.repeats, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
