"""Start and drive `fastrelay serve` subprocesses for the tests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from waiting import until, wait_for

# Extra `serve` options for every relay of a run, e.g. "--write-delay 0" to run
# the suite with every batch written at once.
EXTRA_ARGS = os.environ.get("FASTRELAY_TEST_SERVE_ARGS", "").split()

_STARTED = re.compile(r"relaying (\S+) -> (ws://\S+) \(backend (\w+)")


class Relay:
    """One running relay subprocess and handy ways to talk to it."""

    def __init__(self, proc: subprocess.Popen[str], socket_path: str, url: str, backend: str,
                 log_dir: Path, args: list[str], link: Any = None) -> None:
        self.proc = proc
        #: The link its TCP port lives on (netns.SlowLink), None for the host's loopback.
        self.link = link
        self.socket_path = socket_path
        self.url = url
        self.backend = backend
        self.log_dir = log_dir
        self.args = args
        self.http = url.split("/ws/")[0].replace("ws://", "http://", 1)
        self.port = int(self.http.rsplit(":", 1)[1])
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        self._dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    # -- input ----------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Send one raw datagram, retrying briefly on EAGAIN (the kernel queue is short)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                self._dgram.sendto(payload, self.socket_path)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.0005)

    def emit(self, event_type: str, machine_id: str | None = None, **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = {"type": event_type, "timestamp": time.time()}
        if machine_id is not None:
            event["machine_id"] = machine_id
        event.update(fields)
        self.send(orjson.dumps(event))
        return event

    def state(self, machine_id: str, state: str, **fields: Any) -> dict[str, Any]:
        """A ``state_change`` for ``machine_id``."""
        return self.emit("state_change", machine_id, state=state, **fields)

    # -- HTTP -----------------------------------------------------------------

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        if self.link is not None:
            return self.link.get("127.0.0.1", self.port, path, headers)
        request = urllib.request.Request(self.http + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers

    def metric(self, name: str) -> float:
        """One unlabelled sample of /metrics, e.g. ``metric("fastrelay_frames_sent_total")``."""
        status, body, _ = self.get("/metrics")
        assert status == 200, body
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    def health(self) -> dict[str, Any]:
        status, body, _ = self.get("/healthz")
        assert status == 200, body
        return json.loads(body)

    async def ahealth(self) -> dict[str, Any]:
        """/healthz from an async test, without blocking its loop (a slow link can take a while)."""
        result: dict[str, Any] = await asyncio.to_thread(self.health)
        return result

    def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
        """Sync tests: poll ``predicate`` (see waiting.wait_for)."""
        return wait_for(predicate, timeout, what)

    def wait_accepted(self, n: int, timeout: float = 10.0) -> None:
        """Sync tests: wait until the relay has accepted ``n`` events in all."""
        self.wait_for(lambda: self.health()["events"]["accepted"] >= n, timeout, f"{n} accepted")

    async def until_health(self, predicate: Any, timeout: float = 10.0,
                           what: str = "condition") -> dict[str, Any]:
        """Async tests: poll /healthz until ``predicate(health)`` holds; returns that health."""
        async def check() -> dict[str, Any] | None:
            health = await self.ahealth()
            return health if predicate(health) else None

        result: dict[str, Any] = await until(check, timeout, what)
        return result

    async def until_accepted(self, n: int, timeout: float = 10.0) -> None:
        """Async tests: wait until the relay has accepted ``n`` events in all."""
        await self.until_health(lambda h: h["events"]["accepted"] >= n, timeout, f"{n} accepted")

    # -- process ----------------------------------------------------------------

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        path = self.log_dir / "websocket-server.log"
        return path.read_text() if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dgram.close()
        self._reader.join(2)
        return self.proc.returncode


class OwedWatch:
    """What the relay says it holds for its clients (/healthz ``owed_bytes_max``: the
    largest one client's queue plus its transport's write buffer), sampled through a
    scenario; :meth:`worst` is the largest seen.

    Samples miss peaks between them but never overstate one, so a bound checked
    against them cannot fail a relay that keeps it.
    """

    def __init__(self, relay: Relay, interval: float = 0.02) -> None:
        self.relay = relay
        self.interval = interval
        self.samples = 0
        self.missing: list[str] = []
        self.max_client_buffer = 0
        self._worst = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OwedWatch:
        await self._sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await self._sample()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._sample()

    async def _sample(self) -> None:
        health = await self.relay.ahealth()
        # Read defensively: a relay whose /healthz lacks the fields fails the
        # test in worst(), naming them, rather than here in a background task.
        if "owed_bytes_max" not in health or "max_client_buffer" not in health:
            self.missing = sorted({"owed_bytes_max", "max_client_buffer"} - set(health))
            return
        self._worst = max(self._worst, int(health["owed_bytes_max"]))
        self.max_client_buffer = int(health["max_client_buffer"])
        self.samples += 1

    def worst(self) -> int:
        assert not self.missing, f"the relay's /healthz has no {self.missing}"
        assert self.samples, "no sample of the relay's accounting was taken"
        return self._worst

    def describe(self) -> str:
        return (f"owed_bytes_max at most {self._worst} bytes over {self.samples} samples "
                f"(max_client_buffer {self.max_client_buffer})")


class RelayFactory:
    """Starts relays for one test on one backend; stops them all afterwards."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        self.workdir = workdir
        self.relays: list[Relay] = []
        self._n = 0

    def socket_path(self) -> str:
        self._n += 1
        # AF_UNIX paths are limited to 108 bytes: keep them short, outside tmp_path.
        return f"/tmp/frt-{os.getpid()}-{id(self) % 100000}-{self._n}.sock"

    def start(self, *extra: str, socket_path: str | None = None, port: int = 0,
              env: dict[str, str] | None = None, ping_interval: float = 10.0,
              preexec: Any = None, link: Any = None) -> Relay:
        """Start a relay; with ``link`` (a netns.SlowLink) it runs inside that link's
        namespace (``link.prefix`` goes before the command) and its HTTP goes over the link."""
        socket_path = socket_path or self.socket_path()
        log_dir = self.workdir / f"logs{len(self.relays)}"
        args = [
            *(link.prefix if link is not None else ()),
            sys.executable, "-m", "fastrelay", "serve", "--port", str(port),
            "--socket", socket_path, "--log-dir", str(log_dir), "--backend", self.backend,
            "--ping-interval", str(ping_interval), *EXTRA_ARGS, *extra,
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, preexec_fn=preexec,
        )
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = _STARTED.search(line)
            if match:
                relay = Relay(proc, match.group(1), match.group(2), match.group(3), log_dir, args,
                              link)
                relay.output.extend(lines)
                self.relays.append(relay)
                return relay
        proc.kill()
        raise AssertionError("relay did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))

    def run_failing(self, *extra: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run `fastrelay serve` expecting it to exit on its own."""
        args = [sys.executable, "-m", "fastrelay", "serve", "--backend", self.backend, *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)

    def stop_all(self) -> None:
        for relay in self.relays:
            relay.stop()
