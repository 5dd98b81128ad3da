"""Process wrappers the harness drives: a relay, client processes, emitters."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from bench.common import LOAD_CPUS, RELAY_CPUS, child_setup, cpu_ns, hwm_kib, pinned, rss_kib

__all__ = [
    "ROOT", "CONTENDERS", "DEFAULT_CONTENDERS", "INSTALLS", "Relay", "install_python", "isolated",
    "probe_install", "mapped_cores", "clean_env", "split_contender", "ClientProc", "ClientSet",
    "spawn_emitters", "free_port",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Where each fastrelay install lives. "this" is the harness's own interpreter
# run from the repository root (the working tree, installed editable) unless
# the harness is given --this-python; "prev" is the previous release in its own
# venv (bench/previous.sh), set by --previous. A relay run from another
# interpreter starts in its own scratch directory without PYTHONPATH, so it
# imports that interpreter's installed copy and never this source tree.
INSTALLS: dict[str, str | None] = {"this": None, "prev": None}


def install_python(install: str) -> str:
    py = INSTALLS.get(install)
    if install == "this":
        return py or PY
    if not py:
        raise RuntimeError(
            f"the {install!r} fastrelay install is not set: pass --previous PYTHON "
            "(PYTHON=$(bash bench/previous.sh))"
        )
    return py


def isolated(install: str) -> bool:
    """True when ``install`` runs outside this source tree (its own interpreter)."""
    return install != "this" or bool(INSTALLS.get("this"))


def clean_env() -> dict[str, str]:
    """The environment for an interpreter that must not see this source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}


def _fastrelay(backend: str, install: str = "this") -> Any:
    def cmd(port: int, sock: str, ping: float, log_dir: str) -> list[str]:
        return [
            install_python(install),
            "-m",
            "fastrelay",
            "serve",
            "--port",
            str(port),
            "--socket",
            sock,
            "--backend",
            backend,
            "--log-dir",
            log_dir,
            "--ping-interval",
            str(ping),
        ]

    cmd.backend = backend  # type: ignore[attr-defined]
    cmd.install = install  # type: ignore[attr-defined]
    return cmd


_PROBE = """
import json, os, sys
from importlib.machinery import EXTENSION_SUFFIXES
import fastrelay
pkg = os.path.dirname(os.path.realpath(fastrelay.__file__))
compiled = sorted(
    os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(tuple(EXTENSION_SUFFIXES))
)
print(json.dumps({"python": sys.executable, "prefix": sys.prefix,
                  "fastrelay": os.path.realpath(fastrelay.__file__), "package": pkg,
                  "version": getattr(fastrelay, "__version__", "?"), "compiled": compiled}))
"""
_PROBED: dict[tuple[str, str], dict[str, Any]] = {}


def probe_install(install: str, cwd: str) -> dict[str, Any]:
    """Where ``install``'s interpreter imports fastrelay and its compiled core from,
    started the way its relay is (same cwd kind, same environment)."""
    py = install_python(install)
    key = (install, py)
    if key not in _PROBED:
        env = clean_env() if isolated(install) else None
        r = subprocess.run([py, "-c", _PROBE], capture_output=True, cwd=cwd, env=env, timeout=60)
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{py} cannot import fastrelay: {tail[-1] if tail else r.returncode}")
        _PROBED[key] = dict(json.loads(r.stdout.decode().strip().splitlines()[-1]))
    return _PROBED[key]


def mapped_cores(pid: int) -> set[str]:
    """Paths of fastrelay's compiled modules mapped into ``pid`` (from /proc/PID/maps)."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if "/fastrelay/" in path and ".so" in os.path.basename(path):
                    out.add(os.path.realpath(path))
    except OSError:
        pass
    return out


def _peer(script: str) -> Any:
    def cmd(port: int, sock: str, ping: float, log_dir: str) -> list[str]:
        return [
            PY,
            os.path.join(ROOT, "bench", "peers", script),
            "--port",
            str(port),
            "--socket",
            sock,
            "--ping-interval",
            str(ping),
        ]

    return cmd


# Every contender gets the same flags (port, socket, ping interval) and keeps
# its own defaults for everything else.
CONTENDERS: dict[str, Any] = {
    "fastrelay-cython": _fastrelay("cython"),
    "fastrelay-python": _fastrelay("python"),
    "fastrelay-prev-cython": _fastrelay("cython", "prev"),
    "fastrelay-prev-python": _fastrelay("python", "prev"),
    "original": _peer("original.py"),
    "websockets": _peer("websockets_peer.py"),
}
# What runs when --contenders is not given (the prev ones need --previous).
DEFAULT_CONTENDERS = ["fastrelay-cython", "fastrelay-python", "original", "websockets"]


def split_contender(name: str) -> tuple[str, list[str]]:
    """``fastrelay-cython[--write-delay=0.005]`` -> the contender and extra options for it.

    For measuring one relay's own knobs side by side; the defaults are what
    the tables compare.
    """
    base, _, rest = name.partition("[")
    return base, rest.rstrip("]").split() if rest else []


class Relay:
    """One relay subprocess, pinned to the relay core, with a fresh port and socket."""

    def __init__(self, name: str, ping_interval: float, workdir: str) -> None:
        self.name = name
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
        self.socket = os.path.join(self.workdir, "events.sock")
        self.log_dir = os.path.join(self.workdir, "logs")
        self.out_path = os.path.join(self.workdir, "stdout.txt")
        self.err_path = os.path.join(self.workdir, "stderr.txt")
        base, extra = split_contender(name)
        factory = CONTENDERS[base]
        self.backend: str | None = getattr(factory, "backend", None)
        self.install: str | None = getattr(factory, "install", None)
        self.isolated = self.install is not None and isolated(self.install)
        self.cmd = factory(self.port, self.socket, ping_interval, self.log_dir) + extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_line = ""
        self.health: dict[str, Any] = {}
        self.install_info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/events"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                pinned(RELAY_CPUS, self.cmd),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_setup,
                cwd=self.workdir if self.isolated else ROOT,
                env=clean_env() if self.isolated else None,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                self.health = self.healthz()
                if os.path.exists(self.socket):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} did not answer /healthz within {timeout}s: {self.tail()}")
        for path in (self.out_path, self.err_path):
            with open(path, errors="replace") as f:
                for line in f:
                    if line.strip():
                        self.startup_line = line.strip()
                        break
            if self.startup_line:
                break
        try:
            self.verify()
        except Exception:
            self.stop()
            raise

    def verify(self) -> None:
        """A fastrelay contender must run the backend and the install it is named for.

        Checks /healthz's backend, where the relay's interpreter imports
        fastrelay from (started like the relay: same kind of cwd, same
        environment), and, for the cython backend, that the compiled core
        mapped into the running process is that install's. Raises RuntimeError.
        """
        if self.backend is None or self.install is None:
            return
        got = self.health.get("backend")
        if got != self.backend:
            raise RuntimeError(f"{self.name}: /healthz says backend {got!r}, not {self.backend!r}")
        info = probe_install(self.install, self.workdir if self.isolated else ROOT)
        if self.isolated:
            src = os.path.realpath(ROOT) + os.sep
            if info["fastrelay"].startswith(src) or "site-packages" not in info["fastrelay"]:
                raise RuntimeError(
                    f"{self.name}: {info['python']} imports fastrelay from {info['fastrelay']}, "
                    "not from its own site-packages"
                )
        mapped = mapped_cores(self.pid)
        pkg = info["package"] + os.sep
        foreign = sorted(m for m in mapped if not m.startswith(pkg))
        if foreign:
            raise RuntimeError(f"{self.name}: the relay maps {foreign}, not from {info['package']}")
        if self.backend == "cython" and not mapped:
            raise RuntimeError(
                f"{self.name}: no compiled fastrelay module is mapped into the relay "
                f"(compiled in {info['package']}: {info['compiled'] or 'none'})"
            )
        self.install_info = {
            "python": info["python"],
            "fastrelay": info["fastrelay"],
            "version": info["version"],
            "core_mapped": sorted(mapped),
        }
        # An editable install keeps the modules it was built with: after an edit
        # to their source the relay runs the old code until someone rebuilds them.
        stale = []
        for so in mapped:
            stem = os.path.basename(so).split(".", 1)[0]
            for ext in (".pyx", ".py", ".pxd"):
                src_file = os.path.join(os.path.dirname(so), stem + ext)
                if os.path.exists(src_file) and os.path.getmtime(src_file) > os.path.getmtime(so):
                    stale.append(os.path.basename(src_file))
        if stale:
            self.install_info["stale"] = (
                f"{', '.join(sorted(stale))} newer than the built module(s) in {info['package']}: "
                "the relay runs code built from an older source (rebuild, or use --this-python)"
            )

    def healthz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
            return dict(json.loads(r.read()))

    def tail(self, n: int = 2000) -> str:
        text = ""
        for path in (self.out_path, self.err_path):
            try:
                with open(path, errors="replace") as f:
                    text += f.read()[-n:]
            except OSError:
                pass
        return text.strip()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_ns(self) -> int:
        return cpu_ns(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def hwm_kib(self) -> int:
        return hwm_kib(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class ClientProc:
    """One ``bench.clients`` process on the load core, driven by JSON lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            pinned(LOAD_CPUS, [PY, "-m", "bench.clients"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=child_setup,
            cwd=ROOT,
        )
        self.pid = self.proc.pid
        hello = self.recv(30)
        assert "hello" in hello, hello

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"client process {self.pid} did not answer in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client process {self.pid} exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def close(self) -> None:
        try:
            self.send({"cmd": "quit"})
            self.recv(10)
        except Exception:  # noqa: BLE001 - best effort, killed below
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class ClientSet:
    """N connections spread over ceil(N / per_proc) client processes."""

    def __init__(self, n: int, per_proc: int) -> None:
        self.n = n
        nprocs = max(1, -(-n // per_proc))
        self.procs = [ClientProc() for _ in range(nprocs)]
        base, extra = divmod(n, nprocs)
        self.shares = [base + (1 if i < extra else 0) for i in range(nprocs)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def all(self, cmds: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        for p, cmd in zip(self.procs, cmds, strict=True):
            p.send(cmd)
        return [p.recv(timeout) for p in self.procs]

    def connect(
        self, url: str, probes: int | str, stall: bool = False, timeout: float = 180
    ) -> dict[str, Any]:
        """Bring every process to its share of live connections; ``probes`` per process or "all"."""
        cmds = []
        for share in self.shares:
            k = share if probes == "all" else min(int(probes), share)
            cmds.append(
                {
                    "cmd": "connect",
                    "url": url,
                    "n": share,
                    "probes": k,
                    "stall": stall,
                    "timeout": timeout,
                }
            )
        replies = self.all(cmds, timeout + 30)
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        return {
            "connected": sum(r["connected"] for r in replies),
            "failures": sum(r["failures"] for r in replies),
            "errors": errors,
            "elapsed_s": max(r["elapsed_s"] for r in replies),
        }

    def arm(self, t0: float, t1: float) -> int:
        """Reset counters and set the window; returns the live connections."""
        replies = self.all([{"cmd": "arm", "t0": t0, "t1": t1}] * len(self.procs), 30)
        return sum(int(r.get("alive", 0)) for r in replies)

    def quiesce(self, quiet: float = 0.5, timeout: float = 20.0) -> bool:
        """Wait until no connection receives anything for ``quiet`` s (a backlog from
        an earlier run still being read would spoil the next); False on timeout."""
        deadline = time.time() + timeout
        last = -1
        since = time.time()
        while time.time() < deadline:
            events = sum(self.last()[0])
            if events != last:
                last = events
                since = time.time()
            elif time.time() - since >= quiet:
                return True
            time.sleep(0.1)
        return False

    def stats(self, lat_dir: str | None = None, expect: int | None = None) -> dict[str, Any]:
        cmds = []
        files = []
        for i, _p in enumerate(self.procs):
            f = os.path.join(lat_dir, f"lat-{i}.bin") if lat_dir else None
            files.append(f)
            cmds.append({"cmd": "stats", "lat_file": f, "expect": expect})
        replies = self.all(cmds, 60)
        agg: dict[str, Any] = {
            "conns": 0,
            "alive": 0,
            "events": 0,
            "window": 0,
            "probe_conns": 0,
            "lat_samples": 0,
            "closed": 0,
            "pings": 0,
            "others": 0,
            "close_codes": {},
            "probe_per_emitter": {},
            "complete": 0,
            "probe_events_by_conn": [],
        }
        for r in replies:
            for k in (
                "conns",
                "alive",
                "events",
                "window",
                "probe_conns",
                "lat_samples",
                "closed",
                "pings",
                "others",
            ):
                agg[k] += r[k]
            agg["complete"] += r["complete"] or 0
            for k, v in r["close_codes"].items():
                agg["close_codes"][k] = agg["close_codes"].get(k, 0) + v
            for em, v in r["probe_per_emitter"].items():
                a = agg["probe_per_emitter"].setdefault(em, [0, 0, 0, 0])
                a[0] += v[0]
                a[1] += v[1]
                a[2] += v[2]
                a[3] = max(a[3], v[3])
            agg["probe_events_by_conn"] += r["probe_events_by_conn"]
        agg["lat_files"] = [f for f in files if f]
        return agg

    def last(self) -> tuple[list[int], list[int]]:
        replies = self.all([{"cmd": "last"}] * len(self.procs), 60)
        events: list[int] = []
        last_ns: list[int] = []
        for r in replies:
            events += r["events"]
            last_ns += r["last_ns"]
        return events, last_ns

    def resume(self) -> None:
        self.all([{"cmd": "resume"}] * len(self.procs), 30)

    def close(self) -> None:
        for p in self.procs:
            p.close()


def spawn_emitters(
    socket_path: str,
    ids: Sequence[int],
    rate_each: float,
    start_at: float,
    stop_at: float,
    window: tuple[float, float],
    size: int,
    jitter: float = 0.0,
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for em in ids:
        cmd = [
            PY,
            "-m",
            "bench.loadgen",
            "--socket",
            socket_path,
            "--emitter",
            str(em),
            "--rate",
            str(rate_each),
            "--start-at",
            repr(start_at),
            "--stop-at",
            repr(stop_at),
            "--window",
            repr(window[0]),
            repr(window[1]),
            "--size",
            str(size),
        ] + (["--jitter", repr(jitter)] if jitter else [])
        procs.append(
            subprocess.Popen(pinned(LOAD_CPUS, cmd), stdout=subprocess.PIPE, preexec_fn=child_setup, cwd=ROOT)
        )
    return procs
