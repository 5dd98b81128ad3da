"""The hub in pure Python: drain the datagram socket, keep the registry, fan out.

This module and the Cython extension ``fastrelay._core`` have the same API; the
selector (``fastrelay._backend``) picks one. Both share the registry
(``fastrelay.registry``) and everything owed to clients (``fastrelay.clients``).
Everything here runs on the event loop thread, synchronously, which is what
makes the ordering guarantee cheap: a client's snapshot is taken and the client
joins the fan-out set in one step, so no event can fall between them.

The fast path (DESIGN §6): per readable event, drain up to ``batch_cap``
datagrams, frame the whole batch once into one bytes object (server frames are
unmasked, so the same bytes serve every client), then make one ``write`` per
client per batch, straight to the transport when nothing is waiting for that
client, else onto its queue.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson

from ._hubdefs import (
    BATCH_BUCKETS,
    REJECT_REASONS,
    classify_undecodable,
    frame_text,
    hub_stats,
)
from .clients import Client, Clients
from .listener import Listener
from .registry import Registry, nesting_depth

__all__ = ["Client", "Hub", "frame_text"]

_loads = orjson.loads
_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError
_monotonic = time.monotonic
_PREV_KEY = b',"previous_state":'


class Hub:
    """Datagram intake, machine registry and fan-out; one per RelayServer."""

    backend = "python"

    def __init__(
        self,
        *,
        max_datagram: int = 64 * 1024,
        max_client_buffer: int = 4 * 1024 * 1024,
        max_machines: int = 100_000,
        max_depth: int = 64,
        max_snapshots: int = 4,
        batch_cap: int = 1024,
        write_delay: float = 0.0,
    ) -> None:
        self.max_datagram = max_datagram
        self.max_depth = max_depth
        self.batch_cap = batch_cap
        self.write_delay = write_delay
        self.registry = Registry(max_machines)
        self.peers = Clients(max_client_buffer=max_client_buffer, flush=self.flush,
                             snapshot_payload=self.registry.snapshot_payload,
                             max_snapshots=max_snapshots)
        self.clients: set[Client] = self.peers.members
        self.stalled: set[Client] = self.peers.stalled
        self._sock: socket.socket | None = None
        self._loop: Any = None
        self._buf = bytearray(max_datagram)
        self._view = memoryview(self._buf)
        # Frames accepted but not yet written (see flush()).
        self._pending: list[bytes] = []
        self._last_write = 0.0
        self._flush_handle: Any = None
        # Plain counters, read by /healthz and /metrics at scrape time.
        self.accepted = 0
        self.relayed = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.batches = 0
        self.rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.batch_histogram = [0] * (len(BATCH_BUCKETS) + 1)

    @property
    def machines(self) -> dict[str, dict[str, Any]]:
        return self.registry.machines

    @property
    def evicted(self) -> int:
        return self.registry.evicted

    @property
    def closed(self) -> dict[str, int]:
        return self.peers.closed

    # -- intake ----------------------------------------------------------------

    def attach(self, sock: socket.socket, loop: Any) -> None:
        """Start draining ``sock`` (a bound, non-blocking AF_UNIX SOCK_DGRAM socket) on ``loop``."""
        self._sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self.drain)

    def detach(self) -> None:
        """Stop reading the datagram socket (the caller closes it)."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock = None
        self.flush()

    def drain(self) -> int:
        """Take one batch from the socket, update the registry, fan it out; returns datagrams read."""
        sock = self._sock
        if sock is None:
            return 0
        recv_into = sock.recv_into
        buf, view = self._buf, self._view
        max_datagram = self.max_datagram
        max_depth = self.max_depth
        update = self.registry.update
        rejects = self.rejects
        frames = self._pending
        append = frames.append
        before = len(frames)
        count = 0
        while count < self.batch_cap:
            try:
                # MSG_TRUNC makes the kernel report the datagram's real size, so an
                # over-size one is counted instead of silently cut.
                size = recv_into(buf, max_datagram, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            count += 1
            if size > max_datagram:
                rejects["too_large"] += 1
                continue
            raw = view[:size].tobytes()
            try:
                event = _loads(raw)
            except _JSONDecodeError:
                rejects[classify_undecodable(raw)] += 1
                continue
            if type(event) is not dict:
                rejects["not_object"] += 1
                continue
            if type(event.get("type")) is not str:
                rejects["invalid_type"] += 1
                continue
            # Counting brackets is a cheap bound on nesting: only a datagram with
            # that many is walked. orjson parses 1,024 levels but writes 254, so
            # a deeper one would break every snapshot that contains it.
            if (raw.count(b"[") + raw.count(b"{") > max_depth
                    and nesting_depth(event, max_depth) > max_depth):
                rejects["too_deep"] += 1
                continue
            machine_id = event.get("machine_id")
            previous: Any = None
            if type(machine_id) is str:
                previous = update(machine_id, event)
            if event["type"] == "state_change" and "previous_state" not in event:
                # Splice into the emitter's own bytes rather than re-serialising.
                raw = raw.rstrip()[:-1] + _PREV_KEY + _dumps(previous) + b"}"
            append(frame_text(raw))
        if len(frames) > before:
            self.accepted += len(frames) - before
            self._schedule_write()
        return count

    def _schedule_write(self) -> None:
        # Coalescing (--write-delay): a write to every client costs one system
        # call per client whatever it carries, so events arriving within
        # write_delay of the previous write share the next one; an event after
        # a quiet spell goes out at once. A full batch never waits.
        if self._flush_handle is not None and len(self._pending) < self.batch_cap:
            return
        wait = self._last_write + self.write_delay - _monotonic()
        if wait <= 0 or len(self._pending) >= self.batch_cap:
            self.flush()
        else:
            self._flush_handle = self._loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Write every accepted, not yet written event to every client now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._last_write = _monotonic()
        self._record_batch(len(pending))
        data = b"".join(pending)
        if self.peers.collecting:
            self.peers.record(data)
        self._fanout(data, len(pending))
        self.relayed += len(pending) * len(self.clients)

    def _record_batch(self, n: int) -> None:
        self.batches += 1
        index = (n - 1).bit_length()
        hist = self.batch_histogram
        hist[index if index < len(hist) else -1] += 1

    # -- fan-out -----------------------------------------------------------------

    def _fanout(self, data: bytes, nframes: int) -> None:
        clients = self.clients
        if not clients:
            return
        over = []
        enqueue = self.peers.enqueue
        for client in clients:
            # Checked at the moment of writing: a byte may go to the socket only
            # when nothing is waiting ahead of it for this client.
            if client.queue or client.buffered():
                if not enqueue(client, data):
                    over.append(client)
            else:
                client.write(data)
        n = len(clients)
        self.frames_sent += nframes * n
        self.bytes_sent += len(data) * n
        for client in over:
            self.peers.close_slow(client)

    def broadcast(self, payload: bytes) -> None:
        """Send one relay-made message (a ping) to every client, framed once."""
        self.flush()
        self._fanout(frame_text(payload), 1)

    # -- clients -------------------------------------------------------------------

    def make_listener(self) -> Listener:
        """A picows listener bound to this hub, for one new connection."""
        return Listener(self.peers)

    def close_client(self, client: Client, code: int, reason: bytes, why: str) -> None:
        """Stop sending to ``client`` and close it gracefully with ``code``; ``why`` is counted."""
        self.peers.close_client(client, code, reason, why)

    def abort_client(self, client: Client, why: str) -> None:
        """Drop ``client``'s connection at once, discarding what it has not read."""
        self.peers.abort_client(client, why)

    # -- registry ------------------------------------------------------------------

    def snapshot_payload(self) -> bytes:
        return self.registry.snapshot_payload()

    def machines_payload(self) -> bytes:
        return self.registry.machines_payload()

    def stats(self) -> dict[str, Any]:
        return hub_stats(self)
