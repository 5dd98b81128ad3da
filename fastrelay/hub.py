"""The hub: datagram intake, the machine registry and fan-out, written once.

This module is the pure backend as it stands, and Cython compiles the same
file for the accelerated one (``fastrelay/_hub_c.py`` is a link to it, typed by
``fastrelay/_hub_c.pxd``, the way aiohttp builds ``reader_c`` from
``reader_py``). Its few primitives (take a batch of datagrams into slots,
frame one onto the batch buffer with its seq, write the buffer to the clients)
come from ``fastrelay._core`` in the compiled copy and from its plain-Python
twin ``fastrelay._core_py`` here, so per-delivery work stays in C.

Everything runs on the event loop thread, synchronously, which is what makes
the ordering guarantee cheap: a client's snapshot is taken and the client
joins the fan-out set in one step, so no event can fall between them.

The fast path (DESIGN §6): per readable event, drain the socket until it is
empty or ``batch_cap`` datagrams were read, frame the batch once into one
buffer (server frames are unmasked, so the same bytes serve every client) and
write it at once with one ``send()`` per client. That is natural batching:
what arrived while the previous batch was being written makes the next one,
and a lone event waits for nothing. ``write_delay`` > 0 adds a window instead,
for relays that would rather spend less CPU than add no latency.

Filtered clients (DESIGN §8) are served by feeds, one per distinct filter:
each takes its events from the batch's frames once, joined into one buffer
that all its clients share.

With a broker (DESIGN §9) the socket's events are validated here and handed
to its ``outbox``; what clients get is what the broker's stream carries, taken
through :meth:`Hub.relay_entries`, so every relay frames the same bytes in the
same order.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from functools import partial
from typing import TYPE_CHECKING

import orjson

from ._hubdefs import (
    BATCH_BUCKETS,
    REJECT_REASONS,
    CloseReason,
    HubStats,
    classify_undecodable,
    frame_payload,
)
from ._trim import trimmed
from .clients import JOIN_ALL, Client, Clients, JoinRequest
from .feeds import EventKey, takes_frame
from .history import History
from .listener import Listener
from .outbox import Outbox
from .registry import Registry, nesting_depth
from .subscription import Subscription

#: True in the compiled copy, which takes its primitives from the extension.
NATIVE = __name__.endswith("._hub_c")

if TYPE_CHECKING or not NATIVE:
    from ._core_py import Batch, fan_out
else:
    from ._core import Batch, fan_out

__all__ = ["NATIVE", "Client", "Hub"]

_loads = orjson.loads
_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError
_monotonic = time.monotonic
#: Drains at most on detach: emitters may refill a socket that was not shut for
#: reading, and a stop must end.
_DETACH_DRAINS = 1000
#: RFC 6455 §7.4.1: the endpoint is going away.
_GOING_AWAY = 1001


def _stream_event(data: bytes) -> dict[str, object] | None:
    """An event of a broker's stream as a dict; None when it is not a JSON object."""
    try:
        event = _loads(data)
    except _JSONDecodeError:
        return None
    return event if type(event) is dict else None


class Hub:
    """Datagram intake, machine registry and fan-out; one per RelayServer."""

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
        history: int = 10_000,
        history_bytes: int = 16 * 1024 * 1024,
        max_feeds: int = 64,
    ) -> None:
        self.backend = "cython" if NATIVE else "python"
        self.max_datagram = max_datagram
        self.max_depth = max_depth
        self.batch_cap = batch_cap
        self.write_delay = write_delay
        self.registry = Registry(max_machines)
        #: The stream's epoch, the seq it has written up to, and its recent frames.
        self.history = History(history, history_bytes)
        #: The seq of the newest accepted event (written or not yet).
        self.seq = 0
        self.peers = Clients(max_client_buffer=max_client_buffer, flush=self.flush,
                             snapshot_payload=self.snapshot_payload, history=self.history,
                             max_snapshots=max_snapshots, max_feeds=max_feeds)
        #: Every client that gets batches; and those whose transport holds unsent bytes.
        self.clients: set[Client] = self.peers.members
        self.stalled: set[Client] = self.peers.stalled
        #: The clients without a filter, who get the batch buffer itself.
        self.firehose: set[Client] = self.peers.firehose.members
        self._batch = Batch(max_datagram)
        #: (machine_id, type) of each event framed into the batch, for the filters.
        self._keys: list[EventKey] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_write = 0.0
        #: Where accepted events go when a broker orders the stream (None: framed here).
        self.outbox: Outbox | None = None
        # Plain counters, read through stats() at scrape time.
        self.accepted = 0
        self.relayed = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.batches = 0
        self.rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.batch_histogram: list[int] = [0] * (len(BATCH_BUCKETS) + 1)

    # -- intake ----------------------------------------------------------------

    def attach(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Start draining ``sock`` (a bound, non-blocking AF_UNIX SOCK_DGRAM socket) on ``loop``."""
        self._loop = loop
        self._fd = sock.fileno()
        self._batch.attach(sock)
        loop.add_reader(self._fd, self.drain)

    def detach(self) -> None:
        """Take what the datagram socket still holds, stop reading it and write what was
        accepted (the caller closes it; shut for reading first, nothing is left behind)."""
        if self._fd >= 0 and self._loop is not None:
            for _ in range(_DETACH_DRAINS):
                if not self.drain():
                    break
            self._loop.remove_reader(self._fd)
        self._fd = -1
        self._batch.attach(None)
        self.flush()

    def drain(self) -> int:
        """Take what the socket holds (up to ``batch_cap``), update the registry, fan it out.

        Returns the number of datagrams read, accepted or not.
        """
        batch = self._batch
        before = self.accepted
        count = 0
        while count < self.batch_cap:
            got = batch.receive(self.batch_cap - count)
            if got <= 0:
                break
            count += got
            for i in range(got):
                self._take(batch, i)
            # No early exit on a short read: the kernel queue holds only
            # max_dgram_qlen datagrams, so emitters refill it while we parse,
            # and reading on until it is empty is what makes batches large.
        if self.accepted != before:
            if self.outbox is None:
                self._schedule_write()
            else:
                self.outbox.wake()
        return count

    def _take(self, batch: Batch, i: int) -> None:
        """Validate one datagram, update the registry, and frame it onto the batch."""
        rejects = self.rejects
        if batch.size(i) < 0:
            rejects["too_large"] += 1
            return
        view = batch.view(i)
        try:
            event = _loads(view)
        except _JSONDecodeError:
            rejects[classify_undecodable(batch.raw(i))] += 1
            return
        finally:
            # The compiled view points into the slot memory without owning it:
            # released, it cannot be read after the slot is reused or freed.
            view.release()
        if type(event) is not dict:
            rejects["not_object"] += 1
            return
        kind = event.get("type")
        if type(kind) is not str:
            rejects["invalid_type"] += 1
            return
        # Counting brackets is a cheap bound on nesting: only a datagram with
        # that many is walked. orjson parses 1,024 levels but writes 254, so a
        # deeper one would break every snapshot that contains it.
        max_depth = self.max_depth
        if batch.brackets(i) > max_depth and nesting_depth(event, max_depth) > max_depth:
            rejects["too_deep"] += 1
            return
        outbox = self.outbox
        if outbox is not None:
            if "seq" in event:
                # The stream's seq replaces the emitter's, as below (trimmed:
                # the outbox keeps it; see _trim).
                del event["seq"]
                data = trimmed(_dumps(event))
            else:
                data = batch.raw(i)
            if outbox.offer(event, data):
                self.accepted += 1
            else:
                rejects["broker_unavailable"] += 1
            return
        self.accepted += 1
        machine_id = event.get("machine_id")
        previous = None
        if type(machine_id) is str:
            previous = self.registry.update(machine_id, event)
        else:
            machine_id = None
        self._keys.append((machine_id, kind))
        seq = self.seq + 1
        adds_previous = kind == "state_change" and "previous_state" not in event
        if "seq" in event:
            # The stream's seq replaces the emitter's: re-serialised, which only
            # an emitter that sets its own seq pays for.
            event["seq"] = seq
            if adds_previous:
                event["previous_state"] = previous
            batch.add(_dumps(event))
        else:
            # Splice into the emitter's own bytes rather than re-serialising.
            batch.frame(i, seq, _dumps(previous) if adds_previous else None)
        self.seq = seq

    def relay_entries(self, entries: list[tuple[int, bytes, bytes | None, float | None]]) -> int:
        """Take the next events of a broker's stream: each ``(seq, data, previous, at)``,
        the event's bytes as accepted, for a state change that needs one its
        ``previous_state`` as JSON (assigned where the order was), and for an event
        without a timestamp the time the relay that accepted it gave it.

        Returns how many were taken: all of them, up to the first that is not a JSON
        object (no relay publishes one; the caller takes the stream up anew after it).
        """
        batch = self._batch
        registry = self.registry
        keys = self._keys
        taken = 0
        for seq, data, previous, at in entries:
            event = _stream_event(data)
            if event is None:
                break
            machine_id = event.get("machine_id")
            if type(machine_id) is str:
                registry.update(machine_id, event, at)
            else:
                machine_id = None
            kind = event.get("type")
            keys.append((machine_id, kind if type(kind) is str else ""))
            batch.splice(data, seq, previous)
            self.seq = seq
            taken += 1
        if batch.framed:
            self._schedule_write()
        return taken

    def restart_stream(self, machines: list[dict[str, object]], epoch: str, seq: int,
                       entries: list[tuple[int, bytes, bytes | None, float | None]]) -> None:
        """Continue from another stream position (a broker's, at start, or after its data
        was lost): its registry, and its last ``entries`` as the history, at ``epoch``/``seq``.
        Every client then gets a fresh ``initial``."""
        self.flush()
        batch = self._batch
        # Only what follows the last entry that is not an event can be replayed.
        for index in range(len(entries) - 1, -1, -1):
            if _stream_event(entries[index][1]) is None:
                entries = entries[index + 1:]
                break
        for entry_seq, data, previous, _ in entries:
            batch.splice(data, entry_seq, previous)
        frames = batch.frames()
        batch.clear()
        self.restore(machines, epoch, seq, frames)
        self.peers.restart_stream()

    def _schedule_write(self) -> None:
        if self.write_delay <= 0 or self._batch.framed >= self.batch_cap:
            self.flush()
            return
        # --write-delay: events within write_delay of the previous write share
        # the next one; an event after a quiet spell goes out at once.
        if self._flush_handle is not None:
            return
        wait = self._last_write + self.write_delay - _monotonic()
        if wait <= 0 or self._loop is None:
            self.flush()
        else:
            self._flush_handle = self._loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Write every accepted, not yet written event to every client now."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush_handle = None
        batch = self._batch
        framed = batch.framed
        if not framed:
            return
        self._last_write = _monotonic()
        self._record_batch(framed)
        history = self.history
        feeds = self.peers.feeds
        frames = batch.frames() if history.enabled or feeds else None
        if frames is not None and history.enabled:
            history.extend(frames)
        else:
            history.last_seq = self.seq
        keys, self._keys = self._keys, []
        shared = None
        firehose = self.peers.firehose
        if firehose.collecting:
            shared = batch.take()
            firehose.record(shared)
        self._send(shared)
        # Counted after the send: a client closed for falling behind on this
        # batch was not delivered it.
        self.relayed += framed * len(self.firehose)
        if feeds and frames is not None:
            self._send_feeds(frames, keys)
        # Clients resuming from a position this relay has just reached join now.
        self.peers.serve_waiting()

    def _record_batch(self, n: int) -> None:
        self.batches += 1
        hist = self.batch_histogram
        index = (n - 1).bit_length()
        hist[index if index < len(hist) else len(hist) - 1] += 1

    # -- fan-out -----------------------------------------------------------------

    def _send(self, shared: bytes | None) -> None:
        """Write the batch to the clients without a filter, then start the next one."""
        batch = self._batch
        clients = self.firehose
        n = len(clients)
        framed, nbytes = batch.framed, batch.nbytes
        try:
            over = batch.send(clients, self.peers.enqueue, shared) if n else None
        finally:
            # Even when a write raises: the batch must never go out twice.
            batch.clear()
        if n:
            # Frames are counted as built, once for all the clients sharing them.
            self.frames_sent += framed
            self.bytes_sent += nbytes * n
        self._close_slow(over)

    def _close_slow(self, over: list[Client] | None) -> None:
        """Close the clients a write would have put over their bound."""
        if over is not None:
            for client in over:
                self.peers.close_slow(client)

    def _send_feeds(self, frames: list[bytes], keys: list[EventKey]) -> None:
        """Write each filter's share of the batch to the clients that share that filter."""
        peers = self.peers
        enqueue = peers.enqueue
        # A list: closing a feed's last client forgets the feed.
        for feed in list(peers.feeds.values()):
            if not feed.members and not peers.keep(feed):
                continue
            data, count = feed.select(frames, keys)
            if not count:
                continue
            if feed.collecting:
                feed.record(data)
            members = feed.members
            n = len(members)
            over = fan_out(data, members, enqueue)
            self.frames_sent += count
            self.bytes_sent += len(data) * n
            self._close_slow(over)
            self.relayed += count * len(members)

    def broadcast(self, payload: bytes) -> None:
        """Send one relay-made message (a ping) to every client, framed once."""
        self.flush()
        self.peers.sweep()
        batch = self._batch
        batch.add(payload)
        feeds = self.peers.feeds
        data = batch.take() if feeds else None
        self._send(data)
        if data is not None:
            if not self.firehose:
                self.frames_sent += 1  # built once, whoever shares it
            enqueue = self.peers.enqueue
            for feed in list(feeds.values()):
                self.bytes_sent += len(data) * len(feed.members)
                self._close_slow(fan_out(data, feed.members, enqueue))

    # -- clients -------------------------------------------------------------------

    def make_listener(self, join: JoinRequest = JOIN_ALL) -> Listener:
        """A picows listener bound to this hub, for one new connection that asked for
        ``join`` (a resume, a filter) in its query."""
        return Listener(self.peers, join)

    def close_client(self, client: Client, code: int, reason: bytes, why: CloseReason) -> None:
        """Stop sending to ``client`` and close it gracefully with ``code``; ``why`` is counted."""
        self.peers.close_client(client, code, reason, why)

    def abort_client(self, client: Client, why: CloseReason) -> None:
        """Drop ``client``'s connection at once, discarding what it has not read."""
        self.peers.abort_client(client, why)

    def shutdown(self, grace: float) -> Awaitable[None]:
        """Stop reading, close every client with 1001, and abort those still unread after
        ``grace`` seconds; await the result."""
        self.detach()
        return self.peers.close_everyone(_GOING_AWAY, b"relay shutting down",
                                         CloseReason.SHUTDOWN, grace)

    # -- reading -------------------------------------------------------------------

    def snapshot_payload(self, subscription: Subscription | None = None) -> bytes:
        """The ``initial`` message for the registry as it is now (the machines
        ``subscription`` shows), at the stream's position."""
        return self.registry.snapshot_payload(self.history.epoch, self.seq, subscription)

    def restore(self, machines: list[dict[str, object]], epoch: str | None, seq: int,
                frames: list[bytes]) -> None:
        """Take up a saved state before the first client: the registry, and the stream's
        epoch and seq with its last ``frames`` when ``epoch`` continues (else a new epoch)."""
        self.registry.load(machines)
        history = self.history
        if epoch is None:
            history.restart(None, 0)
            self.seq = 0
        else:
            history.restart(epoch, seq - len(frames))
            history.extend(frames)
            self.seq = seq

    def history_payload(self, since: int, limit: int,
                        subscription: Subscription | None = None) -> bytes:
        """The events the history holds after ``since`` (those ``subscription`` takes),
        the newest ``limit`` of them, with the stream's position (GET /api/history)."""
        history = self.history
        accept = None if subscription is None else partial(takes_frame, subscription)
        events = b",".join([frame_payload(frame) for frame in history.recent(since, limit, accept)])
        head = _dumps({"epoch": history.epoch, "seq": history.last_seq,
                       "oldest_seq": history.first_seq if len(history) else None,
                       "events": None})
        return head.replace(b'"events":null', b'"events":[' + events + b"]", 1)

    def machines_payload(self, subscription: Subscription | None = None) -> bytes:
        """The registry (the machines ``subscription`` shows) as a JSON array (GET /api/machines)."""
        return self.registry.machines_payload(subscription)

    def stats(self) -> HubStats:
        """The hub's counters now."""
        peers = self.peers
        history = self.history
        owed_total = owed_max = 0
        for client in self.clients | self.stalled:
            owed = client.owed
            owed_total += owed
            if owed > owed_max:
                owed_max = owed
        return HubStats(
            backend=self.backend,
            clients=len(self.clients),
            machines=len(self.registry),
            accepted=self.accepted,
            relayed=self.relayed,
            frames_sent=self.frames_sent + peers.frames_sent,
            bytes_sent=self.bytes_sent + peers.bytes_sent,
            batches=self.batches,
            evicted=self.registry.evicted,
            rejects=dict(self.rejects),
            closed={reason.value: n for reason, n in peers.closed.items()},
            batch_histogram=tuple(self.batch_histogram),
            snapshots_built=peers.snapshots_built,
            refreshes_coalesced=peers.refreshes_coalesced,
            owed_bytes=owed_total,
            owed_bytes_max=owed_max,
            max_client_buffer=peers.max_client_buffer,
            stalled=len(self.stalled),
            epoch=history.epoch,
            seq=self.seq,
            history_events=len(history),
            history_bytes=history.nbytes,
            history_oldest_seq=history.first_seq if len(history) else None,
            resumes={outcome: n for outcome, n in peers.resumes.items()},
            replayed=peers.replayed,
            filters=peers.filters,
            filtered_clients=len(self.clients) - len(self.firehose),
        )
