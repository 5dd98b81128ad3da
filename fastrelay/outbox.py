"""The broker's outbox: events this relay accepted, in order, until the broker has them.

With ``--broker`` (DESIGN §9) the hub validates what its socket reads and
offers it here instead of framing it; the broker publishes the outbox in
batches and takes an event off only once Redis confirmed it. While Redis is
down the outbox fills up to ``max_events`` and ``max_bytes``; past either the
event is refused and the hub counts it as ``broker_unavailable``.

Each event is kept as the fields the publish script reads (see
``fastrelay/redis_scripts.py``), prepared once here so a retry costs nothing.
Nothing here imports Redis: the hub holds an outbox without loading a client.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import orjson

from ._trim import trimmed

__all__ = ["ENTRY_OVERHEAD", "Outbox", "OutboxEntry"]

#: One event as the publish script takes it: machine id, state, the previous
#: state the emitter gave, timestamp (each as JSON, b"" when absent), four
#: flags (has a machine id, needs ``previous_state`` spliced, carries ``data``,
#: its timestamp is the relay's), and the event's bytes.
OutboxEntry = tuple[bytes, bytes, bytes, bytes, bytes, bytes]
#: What an entry costs beyond its bytes: the tuples, the bytes objects' headers,
#: the deque's slot (measured: ~630 bytes of RSS per ~250-byte event).
ENTRY_OVERHEAD = 384

_dumps = orjson.dumps
_time = time.time
_FLAGS = tuple(f"{k:04b}".encode() for k in range(16))


class Outbox:
    """Events waiting for the broker, oldest first; at most ``max_events`` and ``max_bytes``."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        if max_events <= 0 or max_bytes <= 0:
            raise ValueError("outbox bounds must be positive")
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: Bytes the waiting entries cost (their fields plus ENTRY_OVERHEAD each).
        self.nbytes = 0
        self._entries: deque[tuple[OutboxEntry, int]] = deque()
        #: Set while entries wait: the publisher sleeps on it.
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, event: dict[str, Any], data: bytes) -> bool:
        """Queue a validated ``event`` whose bytes are ``data`` (no ``seq`` in them);
        False when the outbox is full (the caller counts the drop)."""
        # Refused before anything is prepared: a full outbox is when floods come.
        if (len(self._entries) >= self.max_events
                or self.nbytes + len(data) + ENTRY_OVERHEAD > self.max_bytes):
            return False
        machine_id = event.get("machine_id")
        has_machine = type(machine_id) is str
        state = event.get("state")
        state_json = given_json = b""
        # Each piece is kept until published: trimmed (see _trim) or made exact.
        if type(state) is str:
            state_json = trimmed(_dumps(state))
            given = event.get("previous_state")
            if type(given) is str:
                given_json = trimmed(_dumps(given))
        ts = event.get("timestamp")
        # The registry's rule (registry.Registry.update), decided once, here, so
        # that every relay and Redis record the same last_activity. repr() of
        # a finite float (the only kind orjson parses) is JSON.
        stamped = type(ts) is not float and type(ts) is not int
        ts_json = repr(_time() if stamped else ts).encode()
        needs_previous = event.get("type") == "state_change" and "previous_state" not in event
        entry: OutboxEntry = (
            machine_id.encode() if has_machine else b"",  # type: ignore[union-attr]
            state_json, given_json, ts_json,
            _FLAGS[8 * has_machine + 4 * needs_previous + 2 * ("data" in event) + stamped],
            data,
        )
        size = (len(entry[0]) + len(state_json) + len(given_json) + len(ts_json) + len(data)
                + ENTRY_OVERHEAD)
        if self.nbytes + size > self.max_bytes:
            return False
        self._entries.append((entry, size))
        self.nbytes += size
        return True

    def wake(self) -> None:
        """Tell the publisher entries wait (called once per drained batch)."""
        if self._entries:
            self.ready.set()

    def peek(self, max_events: int, max_bytes: int) -> list[OutboxEntry]:
        """The oldest entries, at most ``max_events`` and about ``max_bytes`` (at least one)."""
        picked: list[OutboxEntry] = []
        size = 0
        for entry, cost in self._entries:
            if len(picked) >= max_events or (picked and size + cost > max_bytes):
                break
            picked.append(entry)
            size += cost
        return picked

    def pop(self, n: int) -> None:
        """Forget the oldest ``n`` entries: the broker has them."""
        entries = self._entries
        for _ in range(min(n, len(entries))):
            self.nbytes -= entries.popleft()[1]
        if not entries:
            self.ready.clear()
