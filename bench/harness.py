"""fastrelay benchmark harness: the same scenarios against every contender.

Run from the repository root::

    python -m bench.harness                                   # everything, ~15 min
    python -m bench.harness --only fanout-100 --repeats 1     # one scenario
    python -m bench.harness --contenders original,websockets --markdown bench/results.md
    python -m bench.harness --preset issue10 --previous "$(bash bench/previous.sh)"   # ~10 min

Contenders: ``fastrelay-cython`` and ``fastrelay-python`` (``python -m
fastrelay serve --backend ...``), ``original`` (bench/peers/original.py) and
``websockets`` (bench/peers/websockets_peer.py); ``fastrelay-prev-cython`` and
``fastrelay-prev-python`` run a previous release installed in its own venv
(bench/previous.sh, ``--previous PYTHON``). Any contender takes extra options
of its own: ``fastrelay-cython[--write-delay=0.005]``. Each runs as a subprocess
pinned to CPU 0; emitters (bench/loadgen.py), client processes
(bench/clients.py, picows) and this harness run on CPU 1. Every contender gets
the same flags (port, socket, ping interval) and its own defaults otherwise.

Scenarios (``--only`` takes names or prefixes, comma-separated):

- ``fanout-1|10|100|1000``: one emitter, at max rate and at a fixed rate the
  load generator sustains (``--fixed-deliveries`` / clients, capped).
- ``latency``: 100 events/s to 50 clients, every client a probe.
- ``ingest``: two emitters at max rate, one client.
- ``idle10k``: relay RSS with 10,000 idle clients, and per client.
- ``one10k``: one event to 10,000 clients: time until the last has it.
- ``slow``: 10 clients at a fixed rate, then the same plus one client that
  stops reading: the others' latency and the relay's RSS, with and without.
- ``floor``: a bare Python loop writing one 200-byte frame to each of 10,000
  loopback TCP sockets (bench/floor.py), timed in the same run.

How figures are made: emitters stamp ``sent_at`` (time.time_ns()) and a count
``n``; clients count event frames received inside a measurement window that starts
after a warm-up, and probe connections parse every event for gaps in ``n`` and
latency. Relay CPU is the sum of its threads' schedstat run time (ns) over the
window; RSS is VmRSS. Each run also measures the load generator's own CPU
(clients + emitters, all on CPU 1) and flags which side was the limit.
Figures are medians of ``--repeats`` runs (``--interleave``: in rounds, every
contender once per round). Relay user CPU is utime from /proc/PID/stat, in
clock ticks, so it needs long windows (``--latency-duration``).
"""

from __future__ import annotations

import argparse
import array
import datetime
import importlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (
    CLK_TCK,
    LOAD_CPUS,
    RELAY_CPUS,
    EventTemplate,
    child_setup,
    cpu_busy,
    cpu_ns,
    percentile,
    pinned,
    raise_nofile,
    sched_ns,
    stat_ticks,
)
from bench.procs import (
    CONTENDERS,
    DEFAULT_CONTENDERS,
    INSTALLS,
    PY,
    ROOT,
    ClientSet,
    Relay,
    install_python,
    isolated,
    spawn_emitters,
    split_contender,
)

__all__ = ["main"]

SCENARIOS = [
    "fanout-1",
    "fanout-10",
    "fanout-100",
    "fanout-1000",
    "latency",
    "ingest",
    "idle10k",
    "one10k",
    "slow",
    "floor",
]
SATURATED = 0.85  # share of one core above which a side counts as the limit
# Relay core busy beyond the relay's own CPU by this many points: other work ran there.
FOREIGN_PCT = 20.0
Runs = list[tuple[str, list[dict[str, Any]]]]  # (table key, the runs for it)


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def sleep_until(t: float) -> None:
    while True:
        d = t - time.time()
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


def median(values: Iterable[Any]) -> Any:
    vals = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return None
    return statistics.median(vals)


def read_lat(files: list[str]) -> list[int]:
    lat = array.array("i")
    for f in files:
        try:
            with open(f, "rb") as fh:
                lat.frombytes(fh.read())
        except OSError:
            pass
    return sorted(lat)


# --------------------------------------------------------------------------- runs


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="fastrelay-bench-")
        self.run_no = 0
        self.results: list[dict[str, Any]] = []
        self.relay_info: dict[str, dict[str, Any]] = {}
        self.frame_bytes: int | None = None
        # Interleaved runs not yet recorded, by (table key, contender): saved with --json too.
        self.pending: dict[tuple[str, str], list[dict[str, Any]]] = {}

    # -- helpers -------------------------------------------------------------
    def start_relay(self, name: str) -> Relay:
        relay = Relay(name, self.args.ping_interval, self.workdir)
        relay.start()
        info = self.relay_info.setdefault(name, {})
        info.setdefault("startup", relay.startup_line)
        info.setdefault("healthz", relay.health)
        if relay.install_info:
            if "install" not in info and relay.install_info.get("stale"):
                log(f"WARNING {name}: {relay.install_info['stale']}")
            info.setdefault("install", relay.install_info)
        return relay

    def stream_run(
        self,
        relay: Relay,
        cset: ClientSet,
        rate: float,
        emitters: int,
        size: int,
        duration: float,
        warmup: float,
        extra_pids: list[int] | None = None,
        jitter: float = 0.0,
    ) -> dict[str, Any]:
        """One measured run: emitters at ``rate`` total (0 = max) for warm-up + duration."""
        self.run_no += 1
        ids = [self.run_no * 100 + i for i in range(emitters)]
        start = time.time() + 0.4  # emitter processes start in ~0.1 s
        t0 = start + warmup
        t1 = t0 + duration
        conns_at_start = cset.arm(t0, t1)
        procs = spawn_emitters(
            relay.socket, ids, rate / emitters if rate else 0.0, start, t1, (t0, t1), size, jitter
        )
        load_pids = cset.pids + [p.pid for p in procs] + (extra_pids or [])
        sleep_until(t0)
        r0 = sched_ns(relay.pid)
        t0_ticks = stat_ticks(relay.pid)
        l0 = {pid: cpu_ns(pid) for pid in load_pids}
        c0 = cpu_busy()
        w0 = time.perf_counter_ns()
        sleep_until(t1)
        r1 = sched_ns(relay.pid)
        t1_ticks = stat_ticks(relay.pid)
        l1 = {pid: cpu_ns(pid) for pid in load_pids}
        c1 = cpu_busy()
        w1 = time.perf_counter_ns()
        rss = relay.rss_kib()
        em_results = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=15)
                em_results.append(json.loads(out.decode().strip().splitlines()[-1]))
            except Exception as exc:  # noqa: BLE001
                p.kill()
                em_results.append({"error": repr(exc), "sent": 0, "sent_window": 0, "stalls": 0})
        sent = sum(e["sent"] for e in em_results)
        # Drain: until every live connection has every event, or nothing moved
        # for longer than any contender's send timeout, or the deadline.
        deadline = time.time() + self.args.drain
        last_total = -1
        stable_since = time.time()
        while True:
            st = cset.stats(expect=sent)
            if st["complete"] >= st["alive"]:
                break
            if st["events"] != last_total:
                last_total = st["events"]
                stable_since = time.time()
            elif time.time() - stable_since > self.args.drain_stable or time.time() > deadline:
                break
            time.sleep(0.1)
        lat_dir = tempfile.mkdtemp(dir=self.workdir)
        st = cset.stats(lat_dir)
        lat = read_lat(st["lat_files"])
        shutil.rmtree(lat_dir, ignore_errors=True)

        window_s = (w1 - w0) / 1e9
        relay_cpu = (r1[0] - r0[0]) / 1e9
        relay_wait = (r1[1] - r0[1]) / 1e9
        user_ticks = t1_ticks[0] - t0_ticks[0] if min(t0_ticks + t1_ticks) >= 0 else None
        sys_ticks = t1_ticks[1] - t0_ticks[1] if min(t0_ticks + t1_ticks) >= 0 else None
        load_cpu = sum(max(0, l1[p] - l0[p]) for p in load_pids if l0[p] >= 0 and l1[p] >= 0) / 1e9
        accepted_w = sum(e.get("sent_window", 0) for e in em_results)
        deliveries_w = st["window"]
        # Loss seen by probes: events sent but never received, per probe connection.
        probe_lost = 0
        probe_expected = 0
        for e in em_results:
            if "emitter" not in e:
                continue
            got = st["probe_per_emitter"].get(str(e["emitter"]), [0, 0, 0, 0])
            probe_expected += e["sent"] * st["probe_conns"]
            probe_lost += e["sent"] * st["probe_conns"] - (got[0] - got[2])
        expected_all = sent * conns_at_start
        target_rate = rate
        target_ok = True
        if rate:
            target_ok = accepted_w >= 0.95 * rate * duration
        relay_frac = relay_cpu / window_s
        load_frac = load_cpu / window_s
        relay_core = core_frac(c0, c1, RELAY_CPUS)
        load_core = core_frac(c0, c1, LOAD_CPUS)
        # The relay is the limit when it was running or ready to run (waiting
        # for a CPU that another tenant of this shared machine held) nearly all
        # the time; the load generator when its whole core was busy.
        r_sat = (relay_cpu + relay_wait) / window_s >= SATURATED
        l_sat = load_core >= SATURATED
        if r_sat and l_sat:
            limit = "both"
        elif r_sat:
            limit = "relay"
        elif l_sat:
            limit = "LOADGEN"
        elif not target_ok:
            limit = "rate-miss"
        else:
            limit = "-"
        if rate and target_ok and limit in ("LOADGEN", "both"):
            limit = "-"  # the fixed rate was met: nothing limited throughput
        return {
            "clients": conns_at_start,
            "target_eps": target_rate or None,
            "accepted_eps": accepted_w / window_s,
            "deliveries_ps": deliveries_w / window_s,
            "deliveries": deliveries_w,
            "window_s": window_s,
            "loss_probe": probe_lost / probe_expected if probe_expected else None,
            "loss_all": 1 - st["events"] / expected_all if expected_all else None,
            "dups": sum(v[2] for v in st["probe_per_emitter"].values()),
            "lat_p50_ms": percentile(lat, 50) / 1e3 if lat else None,
            "lat_p99_ms": percentile(lat, 99) / 1e3 if lat else None,
            "lat_max_ms": lat[-1] / 1e3 if lat else None,
            "lat_samples": len(lat),
            "relay_us_per_delivery": relay_cpu * 1e6 / deliveries_w if deliveries_w else None,
            "relay_us_per_event": relay_cpu * 1e6 / accepted_w if accepted_w else None,
            # utime/stime from /proc/PID/stat: clock ticks (1/CLK_TCK s), so coarse.
            "relay_user_ticks": user_ticks,
            "relay_sys_ticks": sys_ticks,
            "relay_user_us_per_delivery": (
                user_ticks * 1e6 / CLK_TCK / deliveries_w if deliveries_w and user_ticks is not None else None
            ),
            "relay_sys_us_per_delivery": (
                sys_ticks * 1e6 / CLK_TCK / deliveries_w if deliveries_w and sys_ticks is not None else None
            ),
            "relay_cpu_pct": 100 * relay_frac,
            "relay_wait_pct": 100 * relay_wait / window_s,
            "relay_core_pct": 100 * relay_core,
            "load_cpu_pct": 100 * load_frac,
            "load_core_pct": 100 * load_core,
            "rss_mib": rss / 1024,
            "closed": st["closed"],
            "close_codes": st["close_codes"],
            "stalls": sum(e.get("stalls", 0) for e in em_results),
            "stalled_s": sum(e.get("stalled_s", 0.0) for e in em_results),
            "sent": sent,
            "limit": limit,
            "probe_conns": st["probe_conns"],
            "emitter_errors": [e["error"] for e in em_results if "error" in e],
        }

    def record(self, scenario: str, contender: str, runs: list[dict[str, Any]], **extra: Any) -> None:
        row: dict[str, Any] = {
            "scenario": scenario,
            "contender": contender,
            "repeats": len(runs),
            "runs": runs,
        }
        keys: set[str] = set()
        for r in runs:
            keys.update(r)
        med: dict[str, Any] = {}
        for k in sorted(keys):
            vals = [r.get(k) for r in runs]
            if all(isinstance(v, (int, float)) or v is None for v in vals):
                med[k] = median(vals)
            elif all(isinstance(v, str) for v in vals):
                med[k] = "/".join(sorted(set(vals)))  # type: ignore[arg-type]
            else:
                med[k] = vals[-1]
        med.update(extra)
        row["median"] = med
        self.results.append(row)
        self.save()
        log(f"  {scenario:<18} {contender:<17} {summary(med)}")

    def save(self) -> None:
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(
                    {
                        "conditions": self.conditions(),
                        "results": self.results,
                        "pending": [
                            {"scenario": k, "contender": c, "runs": v} for (k, c), v in self.pending.items()
                        ],
                    },
                    f,
                    indent=1,
                    default=str,
                )

    # -- scenarios -----------------------------------------------------------
    def fixed_rate(self, n: int) -> float:
        return float(min(self.args.fixed_cap, self.args.fixed_deliveries / n))

    def probes_for(self, n: int, rate: float) -> int | str:
        if rate and n * rate <= self.args.probe_budget:
            return "all"
        return 1

    def fanout(self, contender: str, n: int, repeats: int) -> Runs:
        a = self.args
        relay = self.start_relay(contender)
        base_kib = relay.rss_kib()
        runs: dict[str, list[dict[str, Any]]] = {"max": [], "fixed": []}
        try:
            for _rep in range(repeats):
                for mode in ("fixed", "max"):
                    # Fresh clients for every run: at max rate a relay that bounds
                    # its buffers closes clients that fall behind, and clients still
                    # digesting a max-rate backlog would spoil the next run.
                    rate = 0.0 if mode == "max" else self.fixed_rate(n)
                    cset = ClientSet(n, a.per_proc)
                    try:
                        c = cset.connect(relay.url, self.probes_for(n, rate))
                        if c["connected"] < n:
                            log(f"  {contender}: only {c['connected']}/{n} connected ({c['errors']})")
                        r = self.stream_run(relay, cset, rate, 1, a.size, a.duration, a.warmup)
                    finally:
                        cset.close()
                    r["connected"] = c["connected"]
                    r["rss_base_mib"] = base_kib / 1024
                    if r["clients"]:
                        r["kib_per_client"] = (r["rss_mib"] * 1024 - base_kib) / r["clients"]
                    runs[mode].append(r)
        finally:
            relay.stop()
        return [(f"fanout-{n} {mode}", runs[mode]) for mode in ("max", "fixed")]

    def latency(self, contender: str, repeats: int) -> Runs:
        a = self.args
        relay = self.start_relay(contender)
        cset = ClientSet(a.latency_clients, a.per_proc)
        runs = []
        try:
            for _rep in range(repeats):
                cset.quiesce()
                cset.connect(relay.url, "all")
                runs.append(
                    self.stream_run(
                        relay,
                        cset,
                        a.latency_rate,
                        1,
                        a.size,
                        a.latency_duration or a.duration,
                        a.warmup,
                        jitter=a.latency_jitter,
                    )
                )
        finally:
            cset.close()
            relay.stop()
        return [("latency", runs)]

    def ingest(self, contender: str, repeats: int) -> Runs:
        a = self.args
        relay = self.start_relay(contender)
        cset = ClientSet(1, a.per_proc)
        runs = []
        try:
            for _rep in range(repeats):
                # The client only counts: parsing every event would make it the limit sooner.
                cset.quiesce()
                cset.connect(relay.url, 0)
                runs.append(
                    self.stream_run(relay, cset, 0.0, a.ingest_emitters, a.size, a.duration, a.warmup)
                )
        finally:
            cset.close()
            relay.stop()
        return [("ingest", runs)]

    def c10k(self, contender: str, want_idle: bool, want_one: bool, repeats: int) -> Runs:
        a = self.args
        n = a.c10k_clients
        idle_runs = []
        one_runs: list[dict[str, Any]] = []
        for _rep in range(repeats if want_idle else 1):
            relay = self.start_relay(contender)
            cset = ClientSet(n, a.per_proc)
            try:
                time.sleep(0.5)
                base = relay.rss_kib()
                c = cset.connect(relay.url, 0, timeout=a.connect_timeout)
                time.sleep(a.settle)
                rss = relay.rss_kib()
                connected = c["connected"]
                idle_runs.append(
                    {
                        "clients": connected,
                        "connect_s": c["elapsed_s"],
                        "connect_failures": c["failures"],
                        "rss_base_mib": base / 1024,
                        "rss_mib": rss / 1024,
                        "kib_per_client": (rss - base) / connected if connected else None,
                        "alive_after_settle": relay.alive(),
                    }
                )
                if want_one and not one_runs:
                    one_runs = self.one_event(relay, cset, connected)
            finally:
                cset.close()
                relay.stop()
        out = []
        if want_idle:
            out.append(("idle10k", idle_runs))
        if want_one:
            out.append(("one10k", one_runs))
        return out

    def one_event(self, relay: Relay, cset: ClientSet, connected: int) -> list[dict[str, Any]]:
        a = self.args
        self.run_no += 1
        em = self.run_no * 100
        tmpl = EventTemplate(em, a.size)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        runs = []
        for seq in range(a.one_events):
            before, _ = cset.last()
            time.sleep(0.3)
            c0 = relay.cpu_ns()
            sent_ns = time.time_ns()
            sock.sendto(tmpl.build(seq, sent_ns), relay.socket)
            deadline = time.time() + a.drain
            time.sleep(0.2)
            while True:
                events, last_ns = cset.last()
                have = [t for e0, e1, t in zip(before, events, last_ns, strict=False) if e1 > e0]
                if len(have) >= connected or time.time() > deadline:
                    break
                time.sleep(0.2)
            c1 = relay.cpu_ns()
            lat = sorted((t - sent_ns) / 1e6 for t in have)
            runs.append(
                {
                    "clients": connected,
                    "received": len(have),
                    "last_ms": lat[-1] if lat else None,
                    "p50_ms": percentile(lat, 50) if lat else None,
                    "first_ms": lat[0] if lat else None,
                    "relay_cpu_ms": (c1 - c0) / 1e6,
                }
            )
        sock.close()
        return runs

    def slow(self, contender: str, repeats: int) -> Runs:
        a = self.args
        without: list[dict[str, Any]] = []
        with_: list[dict[str, Any]] = []
        for _rep in range(repeats):
            relay = self.start_relay(contender)
            cset = ClientSet(a.slow_clients, a.per_proc)
            stall: ClientSet | None = None
            try:
                cset.connect(relay.url, "all")
                rss0 = relay.rss_kib()
                r = self.stream_run(relay, cset, a.slow_rate, 1, a.slow_size, a.slow_duration, a.warmup)
                r["rss_growth_mib"] = r["rss_mib"] - rss0 / 1024
                without.append(r)
                stall = ClientSet(1, a.per_proc)
                stall.connect(relay.url, 0, stall=True)
                cset.connect(relay.url, "all")
                rss0 = relay.rss_kib()
                r = self.stream_run(
                    relay,
                    cset,
                    a.slow_rate,
                    1,
                    a.slow_size,
                    a.slow_duration,
                    a.warmup,
                    extra_pids=stall.pids,
                )
                r["rss_growth_mib"] = r["rss_mib"] - rss0 / 1024
                # What the stalled client learns once it reads again.
                stall.resume()
                time.sleep(a.slow_resume)
                ss = stall.stats()
                r["stalled_events"] = ss["events"]
                r["stalled_closed"] = ss["closed"]
                r["stalled_close"] = ",".join(f"{k}" for k in sorted(ss["close_codes"])) or "open"
                with_.append(r)
            finally:
                cset.close()
                if stall is not None:
                    stall.close()
                relay.stop()
        return [("slow without", without), ("slow with", with_)]

    def floor(self) -> None:
        a = self.args
        runs = []
        for _rep in range(a.repeats):
            out = subprocess.run(
                pinned(
                    RELAY_CPUS,
                    [
                        PY,
                        "-m",
                        "bench.floor",
                        "--clients",
                        str(a.c10k_clients),
                        "--size",
                        str(a.size),
                        "--repeats",
                        "5",
                    ],
                ),
                capture_output=True,
                cwd=ROOT,
                preexec_fn=child_setup,
                timeout=300,
                check=True,
            )
            runs.append(json.loads(out.stdout.decode().strip().splitlines()[-1]))
        self.record("floor", "python loop", runs)

    def scenario(self, sc: str, contender: str, scenarios: list[str], repeats: int, first: bool) -> Runs:
        """Run scenario ``sc`` on ``contender`` ``repeats`` times: [(table key, runs)].

        ``first`` is False for the later rounds of an interleaved run: one10k,
        which runs once whatever --repeats says, is then skipped.
        """
        if sc.startswith("fanout-"):
            return self.fanout(contender, int(sc.split("-")[1]), repeats)
        if sc == "latency":
            return self.latency(contender, repeats)
        if sc == "ingest":
            return self.ingest(contender, repeats)
        if sc == "idle10k":
            return self.c10k(contender, True, first and "one10k" in scenarios, repeats)
        if sc == "one10k":
            if "idle10k" not in scenarios and first:
                return self.c10k(contender, False, True, repeats)
            return []
        if sc == "slow":
            return self.slow(contender, repeats)
        return []

    # -- conditions ----------------------------------------------------------
    def conditions(self) -> dict[str, Any]:
        a = self.args
        cond: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs, "
            f"{mem_gib():.0f} GiB, Linux {platform.release()}",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "max_dgram_qlen": read_sysctl("/proc/sys/net/unix/max_dgram_qlen"),
            "pinning": f"relay on CPU {RELAY_CPUS}; emitters, clients and harness on CPU {LOAD_CPUS}",
            "event_bytes": self.event_size(),
            "slow_event_bytes": EventTemplate(1, a.slow_size).size,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "repeats": a.repeats,
            "interleave": a.interleave,
            "latency_duration_s": a.latency_duration,
            "latency_jitter_s": a.latency_jitter,
            "ping_interval_s": a.ping_interval,
            "fixed_rates": {n: self.fixed_rate(n) for n in (1, 10, 100, 1000)},
            "versions": versions(),
            "contenders": self.relay_info,
        }
        return cond

    def event_size(self) -> int:
        return EventTemplate(1, self.args.size).size


def core_frac(c0: dict[str, tuple[int, int]], c1: dict[str, tuple[int, int]], cpus: str) -> float:
    """Busy share of the CPUs in ``cpus`` between two ``cpu_busy()`` samples."""
    busy = total = 0
    for c in cpus.split(","):
        if c in c0 and c in c1:
            busy += c1[c][0] - c0[c][0]
            total += c1[c][1] - c0[c][1]
    return busy / total if total else 0.0


def summary(m: dict[str, Any]) -> str:
    parts = []
    for k, fmt in (
        ("accepted_eps", "ev/s={:.0f}"),
        ("deliveries_ps", "dl/s={:.0f}"),
        ("loss_all", "loss={:.2%}"),
        ("lat_p50_ms", "p50={:.2f}ms"),
        ("lat_p99_ms", "p99={:.2f}ms"),
        ("relay_us_per_delivery", "us/dl={:.2f}"),
        ("relay_user_us_per_delivery", "user_us/dl={:.2f}"),
        ("relay_cpu_pct", "relay={:.0f}%"),
        ("relay_wait_pct", "wait={:.0f}%"),
        ("load_core_pct", "loadcore={:.0f}%"),
        ("limit", "limit={}"),
        ("closed", "closed={}"),
        ("rss_mib", "rss={:.1f}MiB"),
        ("kib_per_client", "KiB/client={:.1f}"),
        ("last_ms", "last={:.1f}ms"),
        ("relay_cpu_ms", "relay_cpu={:.1f}ms"),
        ("us_per_write", "us/write={:.2f}"),
        ("received", "received={}"),
    ):
        v = m.get(k)
        if v is not None:
            try:
                parts.append(fmt.format(v))
            except (ValueError, TypeError):
                parts.append(f"{k}={v}")
    return " ".join(parts)


def background_load(seconds: float = 1.0) -> str:
    """How busy each CPU is with nothing of ours running: this machine is shared."""
    c0 = cpu_busy()
    time.sleep(seconds)
    c1 = cpu_busy()
    return ", ".join(f"CPU {c} {100 * core_frac(c0, c1, c):.0f}% busy" for c in sorted(c1))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def read_sysctl(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def versions() -> dict[str, str]:
    out = {}
    for mod in (
        "fastrelay",
        "picows",
        "uvloop",
        "orjson",
        "websockets",
        "uvicorn",
        "fastapi",
        "starlette",
        "httptools",
    ):
        try:
            m = importlib.import_module(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            out[mod] = "missing"
    return out


def fastrelay_available(install: str = "this") -> tuple[bool, str]:
    py = install_python(install)
    iso = isolated(install)
    try:
        r = subprocess.run(
            [py, "-m", "fastrelay", "serve", "--help"],
            capture_output=True,
            cwd=tempfile.gettempdir() if iso else ROOT,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} if iso else None,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return False, "`python -m fastrelay serve --help` timed out"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
        return False, lines[-1] if lines else f"exit status {r.returncode}"
    return True, ""


# --------------------------------------------------------------------------- report


def fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    try:
        return format(v, spec)
    except (ValueError, TypeError):
        return str(v)


def mib(v: Any) -> str:
    return fmt(v, ".1f")


STREAM_COLS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("clients", "clients", lambda m: fmt(m.get("clients"), ".0f")),
    (
        "target ev/s",
        "",
        lambda m: fmt(m.get("target_eps"), ",.0f") if m.get("target_eps") else "max",
    ),
    ("events/s", "", lambda m: fmt(m.get("accepted_eps"), ",.0f")),
    ("deliveries/s", "", lambda m: fmt(m.get("deliveries_ps"), ",.0f")),
    ("loss", "", lambda m: fmt(m.get("loss_all"), ".2%")),
    ("p50 ms", "", lambda m: fmt(m.get("lat_p50_ms"), ".2f")),
    ("p99 ms", "", lambda m: fmt(m.get("lat_p99_ms"), ".2f")),
    ("max ms", "", lambda m: fmt(m.get("lat_max_ms"), ".1f")),
    ("relay µs/delivery", "", lambda m: fmt(m.get("relay_us_per_delivery"), ".2f")),
    ("relay µs/event", "", lambda m: fmt(m.get("relay_us_per_event"), ".1f")),
    ("relay user µs/delivery", "", lambda m: fmt(m.get("relay_user_us_per_delivery"), ".2f")),
    ("relay CPU", "", lambda m: fmt(m.get("relay_cpu_pct"), ".0f") + "%"),
    ("relay wait", "", lambda m: fmt(m.get("relay_wait_pct"), ".0f") + "%"),
    ("RSS MiB", "", lambda m: mib(m.get("rss_mib"))),
    ("RSS/client KiB", "", lambda m: fmt(m.get("kib_per_client"), ".1f")),
    ("load CPU", "", lambda m: fmt(m.get("load_cpu_pct"), ".0f") + "%"),
    ("load core", "", lambda m: fmt(m.get("load_core_pct"), ".0f") + "%"),
    ("limit", "", lambda m: str(m.get("limit"))),
    ("closed", "", lambda m: fmt(m.get("closed"), ".0f")),
    ("stalls", "", lambda m: fmt(m.get("stalls"), ".0f")),
]
IDLE_COLS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("clients", "", lambda m: fmt(m.get("clients"), ".0f")),
    ("connect s", "", lambda m: fmt(m.get("connect_s"), ".1f")),
    ("RSS before MiB", "", lambda m: mib(m.get("rss_base_mib"))),
    ("RSS with clients MiB", "", lambda m: mib(m.get("rss_mib"))),
    ("KiB/client", "", lambda m: fmt(m.get("kib_per_client"), ".1f")),
]
ONE_COLS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("clients", "", lambda m: fmt(m.get("clients"), ".0f")),
    ("received", "", lambda m: fmt(m.get("received"), ".0f")),
    ("first ms", "", lambda m: fmt(m.get("first_ms"), ".1f")),
    ("median ms", "", lambda m: fmt(m.get("p50_ms"), ".1f")),
    ("last ms", "", lambda m: fmt(m.get("last_ms"), ".1f")),
    ("relay CPU ms", "", lambda m: fmt(m.get("relay_cpu_ms"), ".1f")),
]
SLOW_COLS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("target ev/s", "", lambda m: fmt(m.get("target_eps"), ",.0f")),
    ("events/s", "", lambda m: fmt(m.get("accepted_eps"), ",.0f")),
    ("others' loss", "", lambda m: fmt(m.get("loss_probe"), ".2%")),
    ("others' p50 ms", "", lambda m: fmt(m.get("lat_p50_ms"), ".2f")),
    ("others' p99 ms", "", lambda m: fmt(m.get("lat_p99_ms"), ".2f")),
    ("others' max ms", "", lambda m: fmt(m.get("lat_max_ms"), ".1f")),
    ("relay RSS MiB", "", lambda m: mib(m.get("rss_mib"))),
    ("RSS growth MiB", "", lambda m: mib(m.get("rss_growth_mib"))),
    ("emitter stalls", "", lambda m: fmt(m.get("stalls"), ".0f")),
    (
        "stalled client: events, close",
        "",
        lambda m: (
            f"{fmt(m.get('stalled_events'), '.0f')}, {m.get('stalled_close')}"
            if "stalled_close" in m
            else "–"
        ),
    ),
]
FLOOR_COLS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("sockets", "", lambda m: fmt(m.get("clients"), ".0f")),
    ("frame bytes", "", lambda m: fmt(m.get("frame_bytes"), ".0f")),
    ("loop ms", "", lambda m: fmt(m.get("wall_ms"), ".1f")),
    ("CPU ms", "", lambda m: fmt(m.get("cpu_ms"), ".1f")),
    ("µs/write", "", lambda m: fmt(m.get("us_per_write"), ".2f")),
]


def table(
    rows: list[dict[str, Any]], cols: list[tuple[str, str, Callable[[dict[str, Any]], str]]]
) -> list[str]:
    head = ["contender"] + [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        m = row["median"]
        lines.append("| " + " | ".join([row["contender"]] + [c[2](m) for c in cols]) + " |")
    return lines


COLUMNS_HELP = """
Columns: *events/s* accepted from emitters and *deliveries/s* received by clients inside the
window; *loss* = 1 − events received / (events sent × clients) over the whole run; latency
from `sent_at` to receipt on probe connections; *relay µs/delivery* and *µs/event* = relay
CPU (all threads) in the window divided by deliveries or accepted events; *relay wait* = time
the relay was ready to run but its CPU was held by another task (this machine is shared, and
the kernel's softirq work for loopback traffic lands there too); *load CPU* = emitters +
clients; *load core* = how busy their CPU was, whoever used it; *limit*: `relay` when relay
CPU + wait ≥ {SAT} of the window, `LOADGEN` when the load core was ≥ {SAT} busy (the load
generator, not the relay, was the limit: figures are then lower bounds for the relay), `both`,
`rate-miss` when a fixed rate was not reached with neither saturated, `-` otherwise (a/b when
repeats differed); *closed* = client connections the relay closed (at max rate, clients that
cannot keep up are closed by relays that bound their buffers); *stalls* = emitter sends that
met a full datagram queue (EAGAIN); *RSS/client* = (RSS at the end of the window − RSS before
any client connected) / clients, buffers included. Slow-client tables: *stalled client* = the
events the stalled client got once it read again for a few seconds after the run, and how its
connection ended: a close code, `none` (the connection ended without a close frame reaching
it) or `open` (still open).
"""


def _runs(bench: Bench, scenario: str, contender: str) -> list[dict[str, Any]] | None:
    for r in bench.results:
        if r["scenario"] == scenario and r["contender"] == contender:
            return list(r["runs"])
    return None


def comparison(bench: Bench) -> list[str]:
    """The before/after table (issue 10): empty unless PREV and THIS of --compare both ran.

    Every figure is the median over the runs; *ratio* = subject / against, of
    the medians; *per run* gives that ratio run by run (round by round when the
    run was interleaved): how far noise alone moves it.
    """
    names = [c.strip() for c in bench.args.compare.split(",")] + ["", "", "", ""]
    prev, this, this_py, peer = names[:4]
    ran = {r["contender"] for r in bench.results}
    if prev not in ran or this not in ran:
        return []

    def label(scenario: str) -> str:
        runs = _runs(bench, scenario, this) or _runs(bench, scenario, prev) or []
        m = runs[0] if runs else {}
        n = m.get("clients")
        rate = m.get("target_eps")
        if not n:
            return scenario
        if scenario in ("idle10k", "one10k"):
            return f"{scenario}, {n:,} clients"
        return f"{scenario}, {f'{rate:,.0f} ev/s' if rate else 'max rate'} × {n}"

    lines = [
        "| check | subject | against | ratio | target | verdict | per run | notes |",
        "|---|---|---|---:|---|---|---|---|",
    ]

    def row(
        what: str, scenario: str, key: str, subj: str, base: str, target: float | None, spec: str
    ) -> None:
        a = _runs(bench, scenario, subj) or []
        b = _runs(bench, scenario, base) or []
        va = median(r.get(key) for r in a)
        vb = median(r.get(key) for r in b)
        ratio = va / vb if va is not None and vb else None
        per = []
        for ra, rb in zip(a, b, strict=False):
            x, y = ra.get(key), rb.get(key)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
                per.append(f"{x / y:.2f}")
        notes = []
        foreign = max(
            (r["relay_core_pct"] - r["relay_cpu_pct"] for r in a + b if r.get("relay_core_pct") is not None),
            default=0.0,
        )
        if foreign >= FOREIGN_PCT:
            notes.append(f"relay's CPU busy with other work in a run: up to {foreign:.0f}%")
        for name, runs in ((subj, a), (base, b)):
            limits = sorted({str(r.get("limit")) for r in runs if r.get("limit") not in (None, "-")})
            if limits:
                notes.append(f"{name}: limit {'/'.join(limits)}")
            if key.startswith("relay_user"):
                ticks = median(r.get("relay_user_ticks") for r in runs)
                if ticks is not None:
                    notes.append(f"{name}: {ticks:.0f} ticks/run")
        if key == "relay_user_us_per_delivery":
            pooled = []
            for runs in (a, b):
                ticks_all = sum(r.get("relay_user_ticks") or 0 for r in runs)
                pooled.append(ticks_all / max(1, sum(r.get("deliveries", 0) for r in runs)))
            if pooled[1]:
                notes.append(f"pooled over all runs (ticks / deliveries): {pooled[0] / pooled[1]:.3f}")
        if target is None:
            verdict, tgt = "reported", "–"
        else:
            tgt = f"≤ {target:.2f}"
            verdict = "no data" if ratio is None else ("ok" if ratio <= target else "**NO**")
        lines.append(
            f"| {what} ({label(scenario)}) | {subj} {fmt(va, spec)} | {base} {fmt(vb, spec)} | "
            f"{fmt(ratio, '.3f')} | {tgt} | {verdict} | {', '.join(per) or '–'} | {'; '.join(notes)} |"
        )

    us = "relay_us_per_delivery"
    within = 1.05
    row("relay µs/delivery", "latency", us, this, prev, within, ".2f")
    row("relay µs/delivery", "fanout-10 fixed", us, this, prev, within, ".2f")
    row("relay µs/delivery", "fanout-100 max", us, this, prev, within, ".2f")
    row("idle KiB/client", "idle10k", "kib_per_client", this, prev, within, ".2f")
    if peer in ran:
        for subj in (this, prev):  # prev's rows: what "before" met, and the noise
            row("p50 latency ms", "fanout-10 fixed", "lat_p50_ms", subj, peer, 1.0, ".3f")
            row("p99 latency ms", "fanout-10 fixed", "lat_p99_ms", subj, peer, 1.0, ".3f")
            row("relay µs/delivery", "fanout-10 fixed", us, subj, peer, 0.5, ".2f")
    if this_py in ran:
        row("relay user µs/delivery, cython/python", "latency", "relay_user_us_per_delivery",
            this, this_py, None, ".2f")
        row("relay µs/delivery, all CPU, cython/python", "latency", us, this, this_py, None, ".2f")
    return lines


COMPARISON_HELP = """
Each row: the subject's median over the runs, the one it is held against, ratio = subject / against
(lower is better for every figure here), the target, and the verdict; *per run* = the same ratio run by
run (round by round in an interleaved run), which shows how much of the ratio is noise; *notes* = a limit
flag other than `-` (see below) and, for user CPU, the 10 ms clock ticks counted per run (its resolution).
Relay µs/delivery = all relay CPU (schedstat, ns) in the window / deliveries; user µs/delivery = utime
from /proc/PID/stat over the same window / deliveries.
"""


def markdown(bench: Bench, notes: list[str]) -> str:
    cond = bench.conditions()
    out = ["# fastrelay benchmark results", ""]
    out.append("## Conditions")
    out.append("")
    out.append(f"- date: {cond['date']}")
    out.append(f"- machine: {cond['machine']} (shared; figures are noisy)")
    out.append(f"- Python: {cond['python']}; net.unix.max_dgram_qlen = {cond['max_dgram_qlen']}")
    out.append(f"- {cond['pinning']}")
    out.append(
        f"- event: ~{cond['event_bytes']} bytes of JSON "
        "(`state_change`, relayed with `previous_state` added); "
        f"slow-client scenario: ~{cond['slow_event_bytes']} bytes"
    )
    lat_w = cond["latency_duration_s"]
    jit = cond["latency_jitter_s"]
    inter = " (interleaved: each round runs every contender once, rotated)" if cond["interleave"] else ""
    out.append(
        f"- window {cond['duration_s']} s after {cond['warmup_s']} s warm-up; "
        + (f"latency scenario's window {lat_w} s; " if lat_w else "")
        + (f"latency events each delayed by a random 0–{jit * 1e3:g} ms; " if jit else "")
        + f"median of {cond['repeats']} repeats{inter}; ping interval {cond['ping_interval_s']} s"
    )
    out.append(
        "- fixed rates (events/s) by clients: "
        + ", ".join(f"{n}: {r:,.0f}" for n, r in cond["fixed_rates"].items())
    )
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in cond["versions"].items()))
    for name, info in cond["contenders"].items():
        h = info.get("healthz", {})
        extra = ", ".join(f"{k}={h[k]}" for k in ("backend", "loop") if k in h)
        out.append(f"- {name}: `{info.get('startup', '')}`" + (f" (healthz: {extra})" if extra else ""))
        inst = info.get("install")
        if inst:
            core = ", ".join(inst.get("core_mapped") or []) or "no compiled core mapped"
            out.append(
                f"  - runs `{inst['python']}`, fastrelay {inst['version']} from `{inst['fastrelay']}`; {core}"
            )
            if inst.get("stale"):
                out.append(f"  - **warning**: {inst['stale']}")
    for note in notes:
        out.append(f"- note: {note}")
    out.append("")
    cmp = comparison(bench)
    if cmp:
        out.append("## Before and after (issue 10)")
        out.append("")
        out.append(" ".join(COMPARISON_HELP.split()))
        out.append("")
        out += cmp
        out.append("")
    out.append(" ".join(COLUMNS_HELP.split()).replace("{SAT}", f"{SATURATED:.0%}"))
    out.append("")
    a = bench.args
    groups: list[tuple[str, str, list[tuple[str, str, Callable[[dict[str, Any]], str]]]]] = []
    for n in (1, 10, 100, 1000):
        groups.append((f"fanout-{n} max", f"Fan-out to {n} client(s), max rate", STREAM_COLS))
        groups.append((f"fanout-{n} fixed", f"Fan-out to {n} client(s), fixed rate", STREAM_COLS))
    groups += [
        ("latency", f"Latency: {a.latency_rate:,.0f} events/s to {a.latency_clients} clients", STREAM_COLS),
        ("ingest", "Ingest: max rate, one client", STREAM_COLS),
        ("idle10k", "Idle memory with 10,000 clients", IDLE_COLS),
        ("one10k", "One event to 10,000 clients (times from `sent_at`)", ONE_COLS),
        ("slow without", "10 clients, fixed rate, no slow client", SLOW_COLS),
        ("slow with", "10 clients plus one that stops reading", SLOW_COLS),
        ("floor", "Floor: one 200-byte write to each of 10,000 loopback TCP sockets", FLOOR_COLS),
    ]
    for key, title, cols in groups:
        rows = [r for r in bench.results if r["scenario"] == key]
        if not rows:
            continue
        out.append(f"## {title}")
        out.append("")
        out += table(rows, cols)
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


# Named settings for a whole run; any option given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    # Issue 10's acceptance line: the previous release (--previous) against this
    # tree, cython backend; this tree's python backend for the user-CPU ratio;
    # the websockets peer for latency and CPU per delivery at 2,000 ev/s x 10.
    "issue10": {
        "contenders": "fastrelay-prev-cython,fastrelay-cython,fastrelay-python,websockets",
        "only": "latency,fanout-10,fanout-100,idle10k",
        "latency_duration": 20.0,
        "latency_jitter": 0.008,
        "repeats": 3,
        "interleave": True,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help="comma-separated, each optionally with its own extra options in brackets "
        "(fastrelay-cython[--write-delay=0.005]): " + ", ".join(CONTENDERS)
        + f"; default {','.join(DEFAULT_CONTENDERS)}",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="",
        help="named settings: issue10 = "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in PRESETS["issue10"].items()
        )
        + " (needs --previous); options given as well win",
    )
    p.add_argument(
        "--previous",
        default="",
        metavar="PYTHON",
        help="interpreter of the previous release's venv, for fastrelay-prev-*: "
        '--previous "$(bash bench/previous.sh)"',
    )
    p.add_argument(
        "--this-python",
        default="",
        metavar="PYTHON",
        help="run fastrelay-cython/-python with this interpreter (an installed copy, e.g. a clean "
        "clone in its own venv) instead of this source tree",
    )
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run every contender once per round, --repeats rounds, rotating their order "
        "(a fresh relay for every run), instead of all repeats of one contender in a row",
    )
    p.add_argument(
        "--compare",
        default="fastrelay-prev-cython,fastrelay-cython,fastrelay-python,websockets",
        metavar="PREV,THIS,THIS_PYTHON,PEER",
        help="contenders of the before/after comparison table (printed when PREV and THIS ran)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated scenarios or prefixes: " + ", ".join(SCENARIOS)
    )
    p.add_argument("--duration", type=float, default=2.0, help="measurement window per run, s")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up before each window, s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--drain", type=float, default=10.0, help="max wait for deliveries after emitters stop, s")
    p.add_argument(
        "--drain-stable",
        type=float,
        default=3.0,
        help="stop draining after this long without progress, s",
    )
    p.add_argument("--size", type=int, default=200, help="event size in bytes")
    p.add_argument("--ping-interval", type=float, default=10.0, help="passed to every relay")
    p.add_argument("--per-proc", type=int, default=2500, help="connections per client process")
    p.add_argument(
        "--fixed-deliveries", type=float, default=20000, help="fixed-rate runs: deliveries/s target"
    )
    p.add_argument("--fixed-cap", type=float, default=5000, help="fixed-rate runs: max events/s")
    p.add_argument("--probe-budget", type=float, default=25000, help="all connections are probes below this")
    p.add_argument("--latency-rate", type=float, default=100)
    p.add_argument("--latency-clients", type=int, default=50)
    p.add_argument(
        "--latency-duration",
        type=float,
        default=0.0,
        help="latency scenario's window, s (default --duration); user CPU counts 10 ms ticks, "
        "so the user-CPU ratio needs a long one",
    )
    p.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        help="latency scenario: delay each event by a random 0..S s off the 1/rate grid, so the "
        "kernel's periodic tick samples the relay's user/system split at random points of its work",
    )
    p.add_argument("--ingest-emitters", type=int, default=2)
    p.add_argument("--c10k-clients", type=int, default=10000)
    p.add_argument("--connect-timeout", type=float, default=180)
    p.add_argument("--settle", type=float, default=2.0, help="idle10k: wait after connecting, s")
    p.add_argument("--one-events", type=int, default=5, help="one10k: events sent, one at a time")
    p.add_argument("--slow-clients", type=int, default=10)
    p.add_argument("--slow-rate", type=float, default=2000)
    p.add_argument("--slow-size", type=int, default=2000)
    p.add_argument("--slow-duration", type=float, default=4.0)
    p.add_argument(
        "--slow-resume",
        type=float,
        default=3.0,
        help="slow: time the stalled client reads again, s",
    )
    p.add_argument("--markdown", default="", help="write the markdown report here (always printed to stdout)")
    p.add_argument("--json", default="", help="write raw results (every run) here")
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


def selected(only: str) -> list[str]:
    if not only:
        return list(SCENARIOS)
    picks = [s.strip() for s in only.split(",") if s.strip()]
    out = [s for s in SCENARIOS if any(s == p or (p not in SCENARIOS and s.startswith(p)) for p in picks)]
    unknown = [p for p in picks if not any(s == p or s.startswith(p) for s in SCENARIOS)]
    if unknown:
        raise SystemExit(f"error: unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return out


def install_of(contender: str) -> str | None:
    """"this" or "prev" for a fastrelay contender, None for a peer."""
    return getattr(CONTENDERS[split_contender(contender)[0]], "install", None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    try:
        os.sched_setaffinity(0, {int(c) for c in LOAD_CPUS.split(",")})
    except OSError:
        pass
    scenarios = selected(args.only)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if split_contender(c)[0] not in CONTENDERS:
            raise SystemExit(f"error: unknown contender {c}; choose from {', '.join(CONTENDERS)}")
    if len(set(contenders)) != len(contenders):
        raise SystemExit("error: a contender is named twice (results are keyed by name)")
    if shutil.which("taskset") is None:
        raise SystemExit(
            "error: taskset not found (util-linux); it pins the relay and the load to separate CPUs"
        )
    INSTALLS["prev"] = args.previous or None
    INSTALLS["this"] = args.this_python or None
    needs_prev = [c for c in contenders if install_of(c) == "prev"]
    if needs_prev and not args.previous:
        raise SystemExit(
            f"error: {', '.join(needs_prev)} need(s) --previous PYTHON; build it with "
            'bash bench/previous.sh and pass --previous "$(bash bench/previous.sh)"'
        )
    for flag, py in (("--previous", args.previous), ("--this-python", args.this_python)):
        if py and not os.access(py, os.X_OK):
            raise SystemExit(f"error: {flag} {py}: not an executable")
    notes: list[str] = []
    for install in ("this", "prev"):
        mine = [c for c in contenders if install_of(c) == install]
        if not mine:
            continue
        ok, why = fastrelay_available(install)
        if not ok:
            msg = (
                f"{', '.join(mine)} skipped: `{install_python(install)} -m fastrelay serve` "
                f"is not available ({why})"
            )
            log(msg)
            notes.append(msg)
            contenders = [c for c in contenders if c not in mine]
    bench = Bench(args)
    notes.append(f"background load at start: {background_load()}")
    t_start = time.time()
    relay_scenarios = [sc for sc in scenarios if sc != "floor"]
    if relay_scenarios:
        for contender in list(contenders):
            try:
                bench.start_relay(contender).stop()
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                why = str(exc).strip().splitlines()[-1][:300]
                msg = f"{contender} skipped: it did not start ({why})"
                log(msg)
                notes.append(msg)
                contenders.remove(contender)
    if args.preset:
        missing = [c for c in PRESETS[args.preset]["contenders"].split(",") if c not in contenders]
        if missing:
            shutil.rmtree(bench.workdir, ignore_errors=True)
            raise SystemExit(f"error: preset {args.preset}: {', '.join(missing)} cannot run (see above)")
    pending = bench.pending

    def run(sc: str, contender: str, repeats: int, first: bool) -> None:
        try:
            for key, runs in bench.scenario(sc, contender, scenarios, repeats, first):
                if args.interleave:
                    pending.setdefault((key, contender), []).extend(runs)
                    bench.save()
                    for r in runs:
                        log(f"  {key:<18} {contender:<17} {summary(r)}")
                else:
                    bench.record(key, contender, runs)
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the other results
            msg = f"{sc} on {contender} failed: {type(exc).__name__}: {exc}"
            log(msg)
            notes.append(msg.splitlines()[0][:300])

    try:
        if "floor" in scenarios:
            log("floor")
            bench.floor()
        if args.interleave:
            # Round r runs every scenario once on every contender, the contender
            # order rotated each round: drift on this shared machine hits all alike.
            for rnd in range(args.repeats):
                k = rnd % len(contenders) if contenders else 0
                order = contenders[k:] + contenders[:k]
                log(f"== round {rnd + 1}/{args.repeats}: {', '.join(order)}")
                for sc in relay_scenarios:
                    for contender in order:
                        run(sc, contender, 1, rnd == 0)
            for key in dict.fromkeys(k for k, _ in pending):
                for contender in contenders:
                    if (key, contender) in pending:
                        bench.record(key, contender, pending.pop((key, contender)))
        else:
            for contender in contenders:
                log(f"== {contender}")
                for sc in relay_scenarios:
                    run(sc, contender, args.repeats, True)
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    notes.append(f"background load at end: {background_load()}")
    notes.append(f"whole run took {time.time() - t_start:.0f} s")
    report = markdown(bench, notes)
    sys.stdout.write(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    bench.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
