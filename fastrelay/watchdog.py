"""Notice a stalled event loop: measure its lag, and dump every thread's stack when it hangs.

The original design froze for 15-40 s when its loop blocked and left no trace
of why. ``LoopMonitor`` ticks on the loop and records how late each tick ran;
``Watchdog`` is a plain thread that reads the last tick's time and, when the
loop has not run for ``hang_threshold`` seconds, logs one critical line and
writes all stacks to ``hang-emergency.log`` through its own file handle: the
normal logger may be the very thing that is stuck.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback

__all__ = ["LoopMonitor", "Watchdog"]

log = logging.getLogger("fastrelay")


class LoopMonitor:
    """A timer on the loop that measures how late it fires (the loop's lag)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.last_beat = time.monotonic()
        self.last_lag = 0.0
        #: Largest lag since the heartbeat last read it (see take_max_lag).
        self.max_lag = 0.0
        self._expected = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._loop = self._handle = None

    def _arm(self) -> None:
        assert self._loop is not None
        self._expected = time.monotonic() + self.interval
        self._handle = self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.last_beat = now
        self.last_lag = lag = max(0.0, now - self._expected)
        if lag > self.max_lag:
            self.max_lag = lag
        if self._loop is not None:
            self._arm()

    def take_max_lag(self) -> float:
        lag, self.max_lag = self.max_lag, self.last_lag
        return lag


class Watchdog(threading.Thread):
    """Daemon thread: one critical line and a stack dump per hang of the loop."""

    def __init__(self, monitor: LoopMonitor, hang_threshold: float, log_dir: str) -> None:
        super().__init__(name="fastrelay-watchdog", daemon=True)
        self.monitor = monitor
        self.hang_threshold = hang_threshold
        self.path = os.path.join(log_dir, "hang-emergency.log")
        self.hangs = 0
        self._stop_event = threading.Event()
        self._loop_thread_id = threading.get_ident()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        check_every = min(max(self.hang_threshold / 4, 0.05), 1.0)
        reported_beat = None
        while not self._stop_event.wait(check_every):
            beat = self.monitor.last_beat
            stalled_for = time.monotonic() - beat
            if stalled_for < self.hang_threshold or beat == reported_beat:
                continue
            reported_beat = beat  # one report per hang, however long it lasts
            self.hangs += 1
            self._dump(stalled_for)
            log.critical(
                "event loop has not run for %.1f s (threshold %.1f s); stacks of every thread "
                "written to %s", stalled_for, self.hang_threshold, self.path,
            )

    def _dump(self, stalled_for: float) -> None:
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        lines = [
            f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} event loop stalled for {stalled_for:.1f} s "
            f"(threshold {self.hang_threshold:.1f} s), pid {os.getpid()} ===\n"
        ]
        for ident, frame in frames.items():
            marker = " (event loop)" if ident == self._loop_thread_id else ""
            lines.append(f"--- thread {names.get(ident, '?')} [{ident}]{marker}\n")
            lines.extend(traceback.format_stack(frame))
        lines.append("\n")
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            sys.stderr.write(f"fastrelay watchdog: cannot write {self.path}: {exc}\n")
