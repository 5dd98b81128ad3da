"""fastrelay benchmark harness: the same scenarios against every contender.

Run from the repository root::

    python -m bench.harness                                   # everything, ~15 min
    python -m bench.harness --only fanout-100 --repeats 1     # one scenario
    python -m bench.harness --contenders original,websockets --markdown bench/results.md

Contenders: ``fastrelay-cython`` and ``fastrelay-python`` (``python -m
fastrelay serve --backend ...``), ``original`` (bench/peers/original.py) and
``websockets`` (bench/peers/websockets_peer.py). Each runs as a subprocess
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

How figures are made: emitters stamp ``sent_at`` (time.time_ns()) and ``seq``;
clients count event frames received inside a measurement window that starts
after a warm-up, and probe connections parse every event for seq gaps and
latency. Relay CPU is the sum of its threads' schedstat run time (ns) over the
window; RSS is VmRSS. Each run also measures the load generator's own CPU
(clients + emitters, all on CPU 1) and flags which side was the limit.
Figures are medians of ``--repeats`` runs.
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
)
from bench.procs import CONTENDERS, PY, ROOT, ClientSet, Relay, spawn_emitters, split_contender

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

    # -- helpers -------------------------------------------------------------
    def start_relay(self, name: str) -> Relay:
        relay = Relay(name, self.args.ping_interval, self.workdir)
        relay.start()
        info = self.relay_info.setdefault(name, {})
        info.setdefault("startup", relay.startup_line)
        info.setdefault("healthz", relay.health)
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
    ) -> dict[str, Any]:
        """One measured run: emitters at ``rate`` total (0 = max) for warm-up + duration."""
        self.run_no += 1
        ids = [self.run_no * 100 + i for i in range(emitters)]
        start = time.time() + 0.4  # emitter processes start in ~0.1 s
        t0 = start + warmup
        t1 = t0 + duration
        conns_at_start = cset.arm(t0, t1)
        procs = spawn_emitters(relay.socket, ids, rate / emitters if rate else 0.0, start, t1, (t0, t1), size)
        load_pids = cset.pids + [p.pid for p in procs] + (extra_pids or [])
        sleep_until(t0)
        r0 = sched_ns(relay.pid)
        l0 = {pid: cpu_ns(pid) for pid in load_pids}
        c0 = cpu_busy()
        w0 = time.perf_counter_ns()
        sleep_until(t1)
        r1 = sched_ns(relay.pid)
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
            "loss_probe": probe_lost / probe_expected if probe_expected else None,
            "loss_all": 1 - st["events"] / expected_all if expected_all else None,
            "dups": sum(v[2] for v in st["probe_per_emitter"].values()),
            "lat_p50_ms": percentile(lat, 50) / 1e3 if lat else None,
            "lat_p99_ms": percentile(lat, 99) / 1e3 if lat else None,
            "lat_max_ms": lat[-1] / 1e3 if lat else None,
            "lat_samples": len(lat),
            "relay_us_per_delivery": relay_cpu * 1e6 / deliveries_w if deliveries_w else None,
            "relay_us_per_event": relay_cpu * 1e6 / accepted_w if accepted_w else None,
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
                    {"conditions": self.conditions(), "results": self.results},
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

    def fanout(self, contender: str, n: int) -> None:
        a = self.args
        relay = self.start_relay(contender)
        base_kib = relay.rss_kib()
        runs: dict[str, list[dict[str, Any]]] = {"max": [], "fixed": []}
        try:
            for _rep in range(a.repeats):
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
        for mode in ("max", "fixed"):
            self.record(f"fanout-{n} {mode}", contender, runs[mode])

    def latency(self, contender: str) -> None:
        a = self.args
        relay = self.start_relay(contender)
        cset = ClientSet(a.latency_clients, a.per_proc)
        runs = []
        try:
            for _rep in range(a.repeats):
                cset.quiesce()
                cset.connect(relay.url, "all")
                runs.append(self.stream_run(relay, cset, a.latency_rate, 1, a.size, a.duration, a.warmup))
        finally:
            cset.close()
            relay.stop()
        self.record("latency", contender, runs)

    def ingest(self, contender: str) -> None:
        a = self.args
        relay = self.start_relay(contender)
        cset = ClientSet(1, a.per_proc)
        runs = []
        try:
            for _rep in range(a.repeats):
                # The client only counts: parsing every event would make it the limit sooner.
                cset.quiesce()
                cset.connect(relay.url, 0)
                runs.append(
                    self.stream_run(relay, cset, 0.0, a.ingest_emitters, a.size, a.duration, a.warmup)
                )
        finally:
            cset.close()
            relay.stop()
        self.record("ingest", contender, runs)

    def c10k(self, contender: str, want_idle: bool, want_one: bool) -> None:
        a = self.args
        n = a.c10k_clients
        idle_runs = []
        one_runs: list[dict[str, Any]] = []
        for _rep in range(a.repeats if want_idle else 1):
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
        if want_idle:
            self.record("idle10k", contender, idle_runs)
        if want_one:
            self.record("one10k", contender, one_runs)

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

    def slow(self, contender: str) -> None:
        a = self.args
        without: list[dict[str, Any]] = []
        with_: list[dict[str, Any]] = []
        for _rep in range(a.repeats):
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
        self.record("slow without", contender, without)
        self.record("slow with", contender, with_)

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


def fastrelay_available() -> tuple[bool, str]:
    try:
        r = subprocess.run(
            [PY, "-m", "fastrelay", "serve", "--help"], capture_output=True, cwd=ROOT, timeout=60
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
    out.append(
        f"- window {cond['duration_s']} s after {cond['warmup_s']} s warm-up; "
        f"median of {cond['repeats']} repeats; "
        f"ping interval {cond['ping_interval_s']} s"
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
    for note in notes:
        out.append(f"- note: {note}")
    out.append("")
    out.append(" ".join(COLUMNS_HELP.split()).replace("{SAT}", f"{SATURATED:.0%}"))
    out.append("")
    groups: list[tuple[str, str, list[tuple[str, str, Callable[[dict[str, Any]], str]]]]] = []
    for n in (1, 10, 100, 1000):
        groups.append((f"fanout-{n} max", f"Fan-out to {n} client(s), max rate", STREAM_COLS))
        groups.append((f"fanout-{n} fixed", f"Fan-out to {n} client(s), fixed rate", STREAM_COLS))
    groups += [
        ("latency", "Latency: 100 events/s to 50 clients", STREAM_COLS),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated: " + ", ".join(CONTENDERS),
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
    return p.parse_args(argv)


def selected(only: str) -> list[str]:
    if not only:
        return list(SCENARIOS)
    picks = [s.strip() for s in only.split(",") if s.strip()]
    out = [s for s in SCENARIOS if any(s == p or (p not in SCENARIOS and s.startswith(p)) for p in picks)]
    unknown = [p for p in picks if not any(s == p or s.startswith(p) for s in SCENARIOS)]
    if unknown:
        raise SystemExit(f"error: unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return out


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
    if shutil.which("taskset") is None:
        raise SystemExit(
            "error: taskset not found (util-linux); it pins the relay and the load to separate CPUs"
        )
    notes: list[str] = []
    if any(c.startswith("fastrelay") for c in contenders):
        ok, why = fastrelay_available()
        if not ok:
            msg = f"fastrelay skipped: `python -m fastrelay serve` is not available ({why})"
            log(msg)
            notes.append(msg)
            contenders = [c for c in contenders if not c.startswith("fastrelay")]
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
    try:
        if "floor" in scenarios:
            log("floor")
            bench.floor()
        for contender in contenders:
            log(f"== {contender}")
            for sc in scenarios:
                try:
                    if sc.startswith("fanout-"):
                        bench.fanout(contender, int(sc.split("-")[1]))
                    elif sc == "latency":
                        bench.latency(contender)
                    elif sc == "ingest":
                        bench.ingest(contender)
                    elif sc == "idle10k":
                        bench.c10k(contender, True, "one10k" in scenarios)
                    elif sc == "one10k":
                        if "idle10k" not in scenarios:
                            bench.c10k(contender, False, True)
                    elif sc == "slow":
                        bench.slow(contender)
                except Exception as exc:  # noqa: BLE001 - one failure must not lose the other results
                    msg = f"{sc} on {contender} failed: {type(exc).__name__}: {exc}"
                    log(msg)
                    notes.append(msg.splitlines()[0][:300])
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
