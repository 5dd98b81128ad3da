"""A periodic log line that says the relay is alive and how busy it is."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .watchdog import LoopMonitor

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Heartbeat"]

log = logging.getLogger("fastrelay")


class Heartbeat:
    """Logs clients, machines, events/s, rejects and the worst loop lag every ``interval`` s."""

    def __init__(self, hub: Hub, monitor: LoopMonitor, interval: float) -> None:
        self.hub = hub
        self.monitor = monitor
        self.interval = interval
        self._last_accepted = 0
        self._last_time = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._last_accepted = self.hub.stats().accepted
        self._last_time = time.monotonic()
        self._handle = loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._loop = self._handle = None

    def line(self) -> str:
        stats = self.hub.stats()
        now = time.monotonic()
        rate = (stats.accepted - self._last_accepted) / max(now - self._last_time, 1e-9)
        self._last_accepted, self._last_time = stats.accepted, now
        return (
            f"heartbeat clients={stats.clients} machines={stats.machines} "
            f"events_per_s={rate:.1f} accepted={stats.accepted} "
            f"rejects={sum(stats.rejects.values())} "
            f"loop_lag_ms={self.monitor.take_max_lag() * 1000:.1f}"
        )

    def _tick(self) -> None:
        try:
            log.info(self.line())
        finally:
            if self._loop is not None:
                self._handle = self._loop.call_later(self.interval, self._tick)
