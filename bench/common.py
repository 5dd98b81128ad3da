"""Helpers shared by the benchmark processes: /proc readers, limits, events."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CLK_TCK",
    "NOFILE",
    "LOAD_CPUS",
    "RELAY_CPUS",
    "cpu_ns",
    "sched_ns",
    "stat_ticks",
    "cpu_busy",
    "rss_kib",
    "hwm_kib",
    "raise_nofile",
    "child_setup",
    "pinned",
    "EventTemplate",
    "percentile",
    "emit_json",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Enough descriptors for 10,000 clients plus the floor test's 20,000 sockets.
NOFILE = 65536
_NCPU = os.cpu_count() or 1
RELAY_CPUS = "0"
LOAD_CPUS = "1" if _NCPU > 1 else "0"


def sched_ns(pid: int) -> tuple[int, int]:
    """(CPU run time, run-queue wait time) of ``pid``'s threads in ns; (-1, -1) if unknown.

    From the per-thread ``schedstat``: the wait is time the process was ready
    to run but another task held its CPU, i.e. what a shared machine took.
    """
    run = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return -1, -1
    try:
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    fields = f.read().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            run += int(fields[0])
            wait += int(fields[1])
    except (OSError, ValueError, IndexError):
        return -1, -1
    return run, wait


def cpu_busy() -> dict[str, tuple[int, int]]:
    """Per CPU ("0", "1", ...): (busy, total) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals[:8]]
                    idle = v[3] + v[4]
                    total = sum(v)
                    out[name[3:]] = (total - idle, total)
    except (OSError, ValueError, IndexError):
        pass
    return out


def cpu_ns(pid: int) -> int:
    """CPU time (user + system, all threads) of ``pid`` in ns; -1 if it is gone.

    Reads the per-thread ``schedstat`` (ns resolution) and falls back to
    ``/proc/PID/stat`` utime+stime (clock ticks) when schedstat is missing.
    """
    run, _wait = sched_ns(pid)
    if run >= 0:
        return run
    if not os.path.exists(f"/proc/{pid}"):
        return -1
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK
    except (OSError, ValueError, IndexError):
        return -1


def stat_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` (all threads) in clock ticks from /proc/PID/stat; (-1, -1) if gone.

    The only user/system split the kernel gives per process; a tick is
    1/CLK_TCK s (10 ms here), so a window needs hundreds of them to be useful.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        return -1, -1


def _status_field(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of ``pid`` in KiB; -1 if unknown."""
    return _status_field(pid, "VmRSS:")


def hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` in KiB; -1 if unknown."""
    return _status_field(pid, "VmHWM:")


def raise_nofile(n: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE to ``n`` (hard limit too when allowed); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, n)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_setup() -> None:
    """preexec_fn for every process the harness starts: file limit, own session."""
    raise_nofile()
    os.setsid()


def pinned(cpus: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped in ``taskset -c CPUS`` (execs, so the PID stays the program's)."""
    return ["taskset", "-c", cpus, *argv]


class EventTemplate:
    """Builds ~``size``-byte JSON events quickly, wire-compatible with the original emitter.

    Every event is a ``state_change`` (so relays do their registry work and add
    ``previous_state``) carrying ``emitter``, its count ``n`` and ``sent_at``
    (``time.time_ns()`` at creation) for loss and latency accounting. The
    payload never contains the strings ``"ping"`` or ``"initial"``.
    """

    STATES = ("idle", "queued", "running", "done")

    def __init__(self, emitter: int, size: int = 200, machines: int = 16) -> None:
        self.emitter = emitter
        self.machines = [f"bench-{emitter}-m{i}" for i in range(machines)]
        probe = self._fmt(self.machines[-1], "running", 10**7, time.time_ns(), "")
        self.pad = "x" * max(0, size - len(probe))
        self.size = len(self._fmt(self.machines[-1], "running", 10**7, time.time_ns(), self.pad))

    def _fmt(self, machine: str, state: str, seq: int, ns: int, pad: str) -> str:
        return (
            f'{{"type":"state_change","machine_id":"{machine}","state":"{state}",'
            f'"timestamp":{ns / 1e9:.6f},"emitter":{self.emitter},"n":{seq},'
            f'"sent_at":{ns},"data":{{"pad":"{pad}"}}}}'
        )

    def build(self, seq: int, ns: int) -> bytes:
        m = self.machines
        return self._fmt(m[seq % len(m)], self.STATES[(seq // len(m)) % 4], seq, ns, self.pad).encode()

    def builder(self) -> Callable[[int, int], bytes]:
        """A closure that is cheaper to call than ``build`` in a hot loop."""
        machines = self.machines
        nm = len(machines)
        states = self.STATES
        head = '{"type":"state_change","machine_id":"'
        emitter = self.emitter
        tail = '"}}'
        pad = self.pad

        def build(seq: int, ns: int) -> bytes:
            return (
                f'{head}{machines[seq % nm]}","state":"{states[(seq // nm) % 4]}",'
                f'"timestamp":{ns / 1e9:.6f},"emitter":{emitter},"n":{seq},'
                f'"sent_at":{ns},"data":{{"pad":"{pad}{tail}'
            ).encode()

        return build


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence; nan when empty."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
