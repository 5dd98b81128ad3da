"""The hub in pure Python: drain the datagram socket, keep the registry, fan out.

This module and the Cython extension ``fastrelay._core`` have the same API; the
selector (``fastrelay._backend``) picks one. Everything here runs on the event
loop thread, synchronously, which is what makes the ordering guarantee cheap:
a client's snapshot is taken and the client joins the fan-out set in one step,
so no event can fall between them.

The fast path (DESIGN §6): per readable event, drain up to ``batch_cap``
datagrams, frame the whole batch once into one bytes object (server frames are
unmasked, so the same bytes serve every client), then make one ``write`` per
client per batch. Per-client buffer checks happen there, and only for clients
whose transport reported a backlog (``pause_writing``), so healthy clients cost
one write call each.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from ._hubdefs import (
    BATCH_BUCKETS,
    CLOSE_REASONS,
    REJECT_REASONS,
    answer_close,
    classify_undecodable,
    hub_stats,
    machines_payload,
    new_entry,
    snapshot_payload,
)

__all__ = ["Client", "Hub", "frame_text"]

_loads = orjson.loads
_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError
_monotonic = time.monotonic
_time = time.time
_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_PREV_KEY = b',"previous_state":'


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame carrying ``payload`` (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class Client:
    """One connected WebSocket client, as the hub and the keepalive policy see it."""

    __slots__ = (
        "transport", "write", "buffered", "connected_at", "last_seen",
        "stalled_since", "close_reason", "peer",
    )

    def __init__(self, transport: WSTransport) -> None:
        underlying = transport.underlying_transport
        # high=0, low=0: pause_writing fires as soon as anything stays queued and
        # resume_writing once all of it is gone, which is exactly "a send that
        # has not completed yet" for --send-timeout. Picows writes to the socket
        # first, so healthy clients never get there.
        underlying.set_write_buffer_limits(high=0, low=0)
        self.transport = transport
        self.write: Callable[[bytes], None] = underlying.write
        self.buffered: Callable[[], int] = underlying.get_write_buffer_size
        now = _monotonic()
        self.connected_at = now
        self.last_seen = now
        self.stalled_since: float | None = None
        self.close_reason: str | None = None
        self.peer = underlying.get_extra_info("peername")

    def __repr__(self) -> str:
        return f"<Client {self.peer} reason={self.close_reason}>"


class _Listener(WSListener):
    """picows callbacks for one connection, forwarded to the hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.client: Client | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.client = self.hub.add_client(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        client = self.client
        if client is None:
            return
        client.last_seen = _monotonic()
        msg_type = frame.msg_type
        if msg_type is _TEXT:
            self.hub.on_client_text(client, frame.get_payload_as_bytes())
        elif msg_type is _CLOSE:
            answer_close(transport, frame)
        # Binary, continuation and stray pong frames: ignored by contract.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.client is not None:
            self.hub.remove_client(self.client)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.hub.mark_stalled(self.client)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.hub.mark_drained(self.client)


class Hub:
    """Datagram intake, machine registry and fan-out; one per RelayServer."""

    backend = "python"

    def __init__(
        self,
        *,
        max_datagram: int = 64 * 1024,
        max_client_buffer: int = 4 * 1024 * 1024,
        max_machines: int = 100_000,
        batch_cap: int = 1024,
        write_delay: float = 0.0,
    ) -> None:
        self.max_datagram = max_datagram
        self.max_client_buffer = max_client_buffer
        self.max_machines = max_machines
        self.batch_cap = batch_cap
        self.write_delay = write_delay
        self.clients: set[Client] = set()
        #: Clients whose transport holds unsent data, including those being closed.
        self.stalled: set[Client] = set()
        #: machine id -> registry entry; insertion order is recency (least recent first).
        self.machines: dict[str, dict[str, Any]] = {}
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
        self.evicted = 0
        self.rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.batch_histogram = [0] * (len(BATCH_BUCKETS) + 1)

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
        machines = self.machines
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
            event_type = event.get("type")
            if type(event_type) is not str:
                rejects["invalid_type"] += 1
                continue
            machine_id = event.get("machine_id")
            previous: Any = None
            if type(machine_id) is str:
                entry = machines.pop(machine_id, None)
                if entry is None:
                    entry = self._new_entry(machine_id)
                machines[machine_id] = entry  # re-inserted: most recent last
                previous = entry["current_state"]
                ts = event.get("timestamp")
                entry["last_activity"] = ts if type(ts) is float or type(ts) is int else _time()
                state = event.get("state")
                if type(state) is str:
                    given = event.get("previous_state", previous)
                    entry["previous_state"] = given if type(given) is str else previous
                    entry["current_state"] = state
                if "data" in event:
                    entry["data"] = event["data"]
            if event_type == "state_change" and "previous_state" not in event:
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
        self._fanout(b"".join(pending), len(pending))

    def _new_entry(self, machine_id: str) -> dict[str, Any]:
        if len(self.machines) >= self.max_machines:
            del self.machines[next(iter(self.machines))]
            self.evicted += 1
        return new_entry(machine_id)

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
        for client in clients:
            client.write(data)
        n = len(clients)
        self.relayed += nframes * n
        self.frames_sent += nframes * n
        self.bytes_sent += len(data) * n
        if self.stalled:
            self._enforce_buffer_bound()

    def _enforce_buffer_bound(self) -> None:
        bound = self.max_client_buffer
        over = [c for c in self.stalled if c.close_reason is None and c.buffered() > bound]
        for client in over:
            # The close frame queues behind the backlog so the client learns why
            # (1013); the send timeout aborts it if it never drains.
            self.close_client(client, WSCloseCode.TRY_AGAIN_LATER, b"client too slow", "slow")

    def broadcast(self, payload: bytes) -> None:
        """Send one relay-made message (a ping) to every client, framed once."""
        self.flush()
        self._fanout(frame_text(payload), 1)

    # -- clients -------------------------------------------------------------------

    def make_listener(self) -> _Listener:
        """A picows listener bound to this hub, for one new connection."""
        return _Listener(self)

    def add_client(self, transport: WSTransport) -> Client:
        """Send the snapshot and join the fan-out set in one step (no event in between)."""
        client = Client(transport)
        # Events already in the registry must not reach this client a second
        # time after its snapshot: write them to the others first.
        self.flush()
        self.send_initial(client)
        self.clients.add(client)
        return client

    def send_initial(self, client: Client) -> None:
        """Send ``client`` a fresh ``initial`` snapshot (on connect and on ``refresh``)."""
        self.flush()
        data = frame_text(self.snapshot_payload())
        client.write(data)
        self.frames_sent += 1
        self.bytes_sent += len(data)

    def on_client_text(self, client: Client, payload: bytes) -> None:
        """A text frame from a client: pongs only prove liveness; ``refresh`` gets a snapshot."""
        if payload == b"pong" or len(payload) > 4096:
            return
        try:
            message = _loads(payload)
        except _JSONDecodeError:
            return
        if type(message) is dict and message.get("type") == "refresh" and client.close_reason is None:
            self.send_initial(client)

    def remove_client(self, client: Client) -> None:
        """Forget a disconnected client and count why it went."""
        self.clients.discard(client)
        self.stalled.discard(client)
        if client.close_reason is None:  # the relay's own closes were counted when decided
            self.closed["normal"] += 1

    def mark_stalled(self, client: Client) -> None:
        client.stalled_since = _monotonic()
        self.stalled.add(client)

    def mark_drained(self, client: Client) -> None:
        client.stalled_since = None
        self.stalled.discard(client)

    def close_client(self, client: Client, code: WSCloseCode, reason: bytes, why: str) -> None:
        """Stop sending to ``client`` and close it gracefully with ``code``; ``why`` is counted."""
        if client.close_reason is not None:
            return
        client.close_reason = why
        self.closed[why] += 1
        self.clients.discard(client)
        transport = client.transport
        transport.send_close(code, reason)
        transport.disconnect(True)

    def abort_client(self, client: Client, why: str) -> None:
        """Drop ``client``'s connection at once, discarding what it has not read."""
        if client.close_reason is None:
            client.close_reason = why
            self.closed[why] += 1
        self.clients.discard(client)
        client.transport.disconnect(False)

    # -- registry ------------------------------------------------------------------

    def snapshot_payload(self) -> bytes:
        return snapshot_payload(self.machines)

    def machines_payload(self) -> bytes:
        return machines_payload(self.machines)

    def stats(self) -> dict[str, Any]:
        return hub_stats(self)
