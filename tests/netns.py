"""A slow link for the tests: a private network namespace with a capped loopback.

The relay runs under ``ip netns exec NAME`` and its clients' TCP sockets are
made inside the same namespace from the test process, so every byte between
them crosses a loopback shaped by ``tc tbf`` (20 Mbit/s, like a busy office
uplink) instead of the host's multi-gigabit one. AF_UNIX sockets are not
network-namespaced, so emitting to the relay works unchanged.

Why the MTU: the namespace's loopback starts with a 64 KiB MTU, and tbf drops
every packet bigger than its 16 KiB bucket, so TCP would stall for good; a
1500-byte MTU is what a real link has and lets tbf shape instead of drop.
"""

from __future__ import annotations

import ctypes
import http.client
import itertools
import os
import shutil
import socket
import subprocess
import threading
from typing import Any

__all__ = ["LinkUnavailable", "Loopback", "SlowLink"]

TBF = ["tbf", "rate", "20mbit", "burst", "16kb", "latency", "400ms"]
_CLONE_NEWNET = 0x40000000
_names = itertools.count()


class LinkUnavailable(Exception):
    """Why no slow link can be made here (the fixture skips with this reason)."""


class Loopback:
    """The host's own loopback, with the same interface as :class:`SlowLink`."""

    name = "loopback"
    prefix: list[str] = []

    def socket(self) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def connect(self, host: str, port: int, timeout: float | None = 10.0,
                rcvbuf: int | None = None) -> socket.socket:
        """A TCP socket connected to ``host:port`` (``rcvbuf`` set before connecting)."""
        sock = self.socket()
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def get(self, host: str, port: int, path: str, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> tuple[int, bytes, Any]:
        """One plain HTTP GET over a socket of this link: (status, body, headers)."""
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = self.connect(host, port, timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), response.headers
        finally:
            conn.close()

    def close(self) -> None:
        pass


class SlowLink(Loopback):
    """A named network namespace whose loopback is capped at 20 Mbit/s.

    ``prefix`` runs a command inside it; :meth:`socket` makes a TCP socket
    inside it (a socket keeps the namespace it was created in, so it may be
    connected and used from any thread afterwards).
    """

    def __init__(self) -> None:
        problem = _unavailable()
        if problem:
            raise LinkUnavailable(problem)
        self.name = f"frt-{os.getpid()}-{next(_names)}"
        self.prefix = ["ip", "netns", "exec", self.name]
        self.path = f"/run/netns/{self.name}"
        _run("ip", "netns", "add", self.name)
        try:
            _run(*self.prefix, "ip", "link", "set", "lo", "mtu", "1500", "up")
            _run(*self.prefix, "tc", "qdisc", "add", "dev", "lo", "root", *TBF)
        except BaseException:
            self.close()
            raise

    def socket(self) -> socket.socket:
        result: dict[str, Any] = {}

        def make() -> None:
            # setns applies to the calling thread only: this short-lived
            # thread enters the namespace, makes the socket and ends.
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc().setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.path}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=make, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        sock: socket.socket = result["sock"]
        return sock

    def qdisc_stats(self) -> str:
        return subprocess.run([*self.prefix, "tc", "-s", "qdisc", "show", "dev", "lo"],
                              capture_output=True, text=True, check=False).stdout

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the slow link needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the slow link needs `{tool}` (iproute2), which is not installed"
    if not hasattr(_libc(), "setns"):
        return "the slow link needs setns(2), which libc does not offer"
    return None


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
