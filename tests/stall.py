"""Stall a relay's event loop from outside: stop its main thread and only that.

SIGSTOP would stop every thread, the watchdog's too, and a stopped watchdog
notices nothing. ptrace can stop one thread: PTRACE_SEIZE the main thread
(its tid is the pid), PTRACE_INTERRUPT stops it alone, PTRACE_DETACH lets it
run on. The other threads, the watchdog among them, keep running.

The main thread is stopped only where it waits in epoll for the loop's next
event, which is where an idle relay spends its time: there it has released
the GIL, so the watchdog can take it and read every thread's stack. Stopped
anywhere else (holding the GIL), it is let go and caught again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator

from waiting import wait_for

__all__ = ["StallUnavailable", "stalled_loop"]

_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000
#: epoll_wait, epoll_pwait, epoll_pwait2 by machine (asm/unistd.h).
_EPOLL_WAITS = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}}


class StallUnavailable(Exception):
    """This machine cannot ptrace (no CAP_SYS_PTRACE, a seccomp filter, an unknown arch)."""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    return libc


def _ptrace(libc: ctypes.CDLL, request: int, pid: int) -> None:
    if libc.ptrace(request, pid, None, None) != 0:
        errno = ctypes.get_errno()
        raise StallUnavailable(f"ptrace({request:#x}, {pid}): {os.strerror(errno)}")


def _in_epoll_wait(pid: int, waits: set[int]) -> bool:
    with open(f"/proc/{pid}/task/{pid}/syscall") as f:
        first = f.read().split(maxsplit=1)[0]
    return first.lstrip("-").isdigit() and int(first) in waits


@contextlib.contextmanager
def stalled_loop(pid: int, timeout: float = 10.0) -> Iterator[None]:
    """Inside the block, the main thread of ``pid`` (a child of this process) is stopped
    in its loop's epoll wait; it runs on when the block ends, however it ends."""
    waits = _EPOLL_WAITS.get(platform.machine())
    if waits is None:
        raise StallUnavailable(f"no epoll syscall numbers for {platform.machine()}")
    libc = _libc()

    def stop_in_epoll() -> bool:
        _ptrace(libc, _PTRACE_SEIZE, pid)
        _ptrace(libc, _PTRACE_INTERRUPT, pid)
        # __WALL: the stop of a thread we trace is reported to us, as to a parent.
        _, status = os.waitpid(pid, _WALL)
        assert os.WIFSTOPPED(status), f"pid {pid} did not stop: status {status:#x}"
        if _in_epoll_wait(pid, waits):
            return True
        _ptrace(libc, _PTRACE_DETACH, pid)
        return False

    wait_for(stop_in_epoll, timeout, "the relay's main thread stopped in epoll_wait", interval=0.01)
    try:
        yield
    finally:
        _ptrace(libc, _PTRACE_DETACH, pid)
