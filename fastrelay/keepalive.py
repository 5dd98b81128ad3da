"""Keepalive policy: JSON pings, unresponsive clients, sends that never complete.

One shared timer for all clients rather than picows's task per connection:
with 10,000 clients one tick that frames a ping once and writes it to every
transport is far cheaper than 10,000 sleeping tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import orjson

from ._hubdefs import CloseReason

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Keepalive"]

log = logging.getLogger("fastrelay")
#: Close code for a client that stopped answering pings (RFC 6455 §7.4.1).
_INTERNAL_ERROR = 1011


class Keepalive:
    """Pings every ``ping_interval`` s; closes clients silent for ``pong_misses`` intervals
    (1011) and aborts clients whose pending send is older than ``send_timeout`` s."""

    def __init__(
        self,
        hub: Hub,
        *,
        ping_interval: float,
        pong_misses: int,
        send_timeout: float,
    ) -> None:
        self.hub = hub
        self.ping_interval = ping_interval
        self.silence_limit = ping_interval * pong_misses
        self.send_timeout = send_timeout
        # Stalled sends are checked often enough to act within ~25% of the timeout.
        self.stall_check_interval = min(max(send_timeout / 4, 0.05), 1.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._stall_handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ping_handle = loop.call_later(self.ping_interval, self._ping_tick)
        self._stall_handle = loop.call_later(self.stall_check_interval, self._stall_tick)

    def stop(self) -> None:
        for handle in (self._ping_handle, self._stall_handle):
            if handle is not None:
                handle.cancel()
        self._loop = self._ping_handle = self._stall_handle = None

    def _ping_tick(self) -> None:
        try:
            self.ping_now()
        finally:
            if self._loop is not None:
                self._ping_handle = self._loop.call_later(self.ping_interval, self._ping_tick)

    def ping_now(self) -> None:
        """Send one JSON ping to every client and close those silent for too long."""
        hub = self.hub
        # Written behind every event accepted so far, so "through" tells each
        # client, filtered or not, that it has been sent all it takes up to
        # there: a filter that matches rarely still resumes from a recent seq.
        hub.flush()
        hub.broadcast(orjson.dumps({"type": "ping", "timestamp": time.time(),
                                    "epoch": hub.history.epoch, "through": hub.seq}))
        now = time.monotonic()
        deadline = now - self.silence_limit
        silent = []
        for client in hub.clients:
            if client.last_seen < deadline:
                if client.reading():  # behind, with our pings queued ahead of its pongs
                    client.last_seen = now
                else:
                    silent.append(client)
        for client in silent:
            log.info("closing unresponsive client %s (silent for %.1f s)", client.peer,
                     time.monotonic() - client.last_seen)
            hub.close_client(client, _INTERNAL_ERROR, b"ping timeout", CloseReason.UNRESPONSIVE)

    def _stall_tick(self) -> None:
        try:
            self.abort_stalled()
        finally:
            if self._loop is not None:
                self._stall_handle = self._loop.call_later(self.stall_check_interval,
                                                           self._stall_tick)

    def abort_stalled(self) -> None:
        """Abort every client whose oldest unsent byte has waited longer than send_timeout."""
        hub = self.hub
        deadline = time.monotonic() - self.send_timeout
        late = [c for c in hub.stalled if c.stalled_since is not None and c.stalled_since < deadline]
        for client in late:
            log.info("aborting client %s: send pending for over %.1f s (%d bytes queued)",
                     client.peer, self.send_timeout, client.buffered())
            hub.abort_client(client, CloseReason.TIMEOUT)
