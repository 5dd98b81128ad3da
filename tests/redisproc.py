"""Start and drive `redis-server` subprocesses for the broker tests (DESIGN §9).

Each server runs on its own loopback port with no persistence at all (no RDB
snapshot, no AOF, a fresh --dir per start), so :meth:`RedisServer.restart`
brings back an *empty* Redis on the same port: what a relay meets when Redis
lost its data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from waiting import wait_for

__all__ = ["REDIS_SERVER", "RedisServer", "free_port", "redis_factory", "redis_server"]

#: The binary the suite runs; `make test-deps` installs Debian's redis-server.
REDIS_SERVER = os.environ.get("FASTRELAY_TEST_REDIS_SERVER") or shutil.which("redis-server") \
    or "/usr/bin/redis-server"

_PING = b"*1\r\n$4\r\nPING\r\n"


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the moment of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary() -> str:
    if not (os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK)):
        pytest.fail(f"redis-server not found (looked for {REDIS_SERVER}): the broker tests need it; "
                    "`make test-deps` installs it", pytrace=False)
    return REDIS_SERVER


class RedisServer:
    """One redis-server on ``127.0.0.1:port``; constructed stopped, :meth:`start` runs it."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._chosen = port is None  # a port we picked may be taken meanwhile: pick again
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0, *, keep_data: bool = False) -> RedisServer:
        """Run it, empty (or with what :meth:`save` wrote last, ``keep_data``), and return
        once it answers PING."""
        binary = _binary()
        assert not self.running, "redis-server is already running"
        # Only a first start may move: a restart must come back on the port the relays know.
        may_move = self._chosen and self.starts == 0
        for _attempt in range(3):
            if not (keep_data and self.starts):
                self.starts += 1
            data_dir = self.workdir / f"data{self.starts}"  # fresh unless keep_data
            data_dir.mkdir(exist_ok=keep_data)
            self.log_path = self.workdir / f"redis{self.starts}.log"
            args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no"]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
            wait_for(lambda: self.ping() or self.proc is None or self.proc.poll() is not None,
                     timeout, f"redis-server on port {self.port} to answer PING")
            if self.running:
                return self
            if may_move and "in use" in self.log_text():
                self.port = free_port()
                continue
            break
        raise AssertionError(f"redis-server did not start on port {self.port}:\n{self.log_text()}")

    def ping(self) -> bool:
        """True when something on the port answers PING with PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(_PING)
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL it (its data is gone with it) and wait until it has exited."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, timeout: float = 10.0, *, keep_data: bool = False) -> RedisServer:
        """Kill it if it runs, then start it again on the same port: empty, or from the
        last :meth:`save` (``keep_data``: what a Redis with persistence does after a
        crash, having lost whatever came after its last snapshot)."""
        self.kill()
        return self.start(timeout, keep_data=keep_data)

    def save(self) -> None:
        """Write a snapshot of the data now (SAVE), which a ``keep_data`` restart loads."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"SAVE\r\n")
            assert sock.recv(64).startswith(b"+OK")

    def stop(self) -> None:
        """Stop it if it runs; never raises for one already gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running, empty redis-server of its own for one test; always stopped after it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Makes RedisServers that are *not* started yet (``port`` optional); stops them all after."""
    servers: list[RedisServer] = []

    def make(port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), port)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
