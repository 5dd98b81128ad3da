"""What the relay owes each WebSocket client, and the client lifecycle around it.

Both hub backends share this module; only the fan-out write loop is native.

The invariant that keeps every client's byte stream intact: bytes reach a
client's socket in the order they were owed. A hub writes a batch straight to
the socket only when nothing is waiting for that client, neither in its
transport nor in its queue here, and it checks both at the moment it writes
(never a flag that a callback may have failed to set). Anything else joins the
client's queue, which the transport drains in pieces as the client reads.

Everything queued counts against ``max_client_buffer``: events, pings, pongs,
snapshots once handed to the transport, close frames. A snapshot is framed once
and shared by every client that joins while it is current (later events are
queued behind it as catch-up), so a large registry costs its size once, not
once per new client, and a client that never reads costs at most its bound.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from ._hubdefs import RESUME_OUTCOMES, CloseReason, frame_text
from .feeds import Feed, takes_frame
from .history import History, parse_resume
from .subscription import Subscription

if TYPE_CHECKING:
    from picows import WSTransport

__all__ = ["CHUNK", "CLOSE_TAIL", "JOIN_ALL", "Client", "Clients", "JoinRequest", "close_frame"]

#: Largest piece of a snapshot handed to a transport at once. A client must
#: read one piece within --send-timeout, so this sets the slowest link that can
#: still receive a large snapshot: 64 KiB per 2 s is 256 kbit/s.
CHUNK = 64 * 1024
#: A close frame cannot cut into a half-sent frame. When more than this much of
#: a snapshot frame is still unsent, the client is aborted instead of closed.
CLOSE_TAIL = 256 * 1024
#: A snapshot is rebuilt for a joiner at most this many build-times after the
#: last build, so that clients joining or refreshing in a loop cannot spend
#: more than about a tenth of the relay's time serialising the registry.
REBUILD_SPACING = 10
#: After its close frame, a client has this long to close its side (its
#: remaining frames are read and ignored meanwhile, so the kernel never resets
#: a connection with unread input and the close frame with it).
CLOSE_LINGER = 2.0
#: How often deferred refreshes look again whether a snapshot may be built.
_REFRESH_RETRY = 0.05
#: Frames of the history a filtered replay looks through per turn of the loop,
#: so that a filter matching little of a long history cannot stall the relay.
REPLAY_SCAN = 1024
#: Close codes (RFC 6455 §7.4.1).
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
_monotonic = time.monotonic
# struct tcp_info (Linux): tcpi_unacked is the u32 at offset 24, tcpi_bytes_acked
# the u64 at offset 120.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_LEN = 128
_UNACKED = struct.Struct("=I")
_BYTES_ACKED = struct.Struct("=Q")


class _Generation:
    """One framed snapshot, shared by every client that joins while it is current."""

    __slots__ = ("frame", "owner", "reusable_from", "users")

    def __init__(self, owner: Clients, frame: bytes, built_at: float, cost: float) -> None:
        self.owner = owner
        self.frame = memoryview(frame)
        #: Until then joiners share it (with catch-up) even when nobody else uses it.
        self.reusable_from = built_at + cost * REBUILD_SPACING
        #: Clients that have not been handed all of it yet.
        self.users = 0


class _Snapshot:
    """A client's position in a shared, framed snapshot."""

    __slots__ = ("frame", "generation", "pos")

    def __init__(self, generation: _Generation) -> None:
        if not generation.users:
            generation.owner.live_snapshots += 1
        generation.users += 1
        self.generation = generation
        self.frame = generation.frame
        self.pos = 0

    def release(self) -> None:
        generation = self.generation
        generation.users -= 1
        if not generation.users:
            generation.owner.live_snapshots -= 1

    def take(self, n: int) -> memoryview:
        piece = self.frame[self.pos:self.pos + n]
        self.pos += len(piece)
        return piece

    @property
    def done(self) -> bool:
        return self.pos >= len(self.frame)


class _Replay:
    """A resuming client's position in the history: the events it missed, sent as it reads.

    Nothing is copied ahead of the client: each piece is joined from the history
    when the transport can take it, so a long replay to a slow client costs at
    most one piece beyond what it has read. If the history forgets an event
    before it was sent, the client cannot be served without a gap: ``take``
    returns None and the client is closed as too slow.
    """

    __slots__ = ("history", "next", "stop", "subscription")

    def __init__(self, history: History, start: int, stop: int,
                 subscription: Subscription | None = None) -> None:
        self.history = history
        self.next = start
        self.stop = stop
        #: Only the events this filter takes are replayed (None: every one).
        self.subscription = subscription

    def take(self, limit: int) -> tuple[bytes, int] | None:
        """Whole frames from the next event on, about ``limit`` bytes; and how many.

        A filtered replay looks at no more than REPLAY_SCAN events per call, so
        it may return nothing yet while not done.
        """
        history = self.history
        if self.next < history.first_seq:
            return None
        parts: list[bytes] = []
        size = 0
        seq, stop = self.next, self.stop
        subscription = self.subscription
        scan_end = stop if subscription is None else min(stop, seq + REPLAY_SCAN - 1)
        while seq <= scan_end and (not parts or size < limit):
            frame = history.frame(seq)
            seq += 1
            if subscription is not None and not takes_frame(subscription, frame):
                continue
            parts.append(frame)
            size += len(frame)
        self.next = seq
        return b"".join(parts), len(parts)

    @property
    def done(self) -> bool:
        return self.next > self.stop


class Client:
    """One connected WebSocket client: its transport, its queue and its liveness."""

    __slots__ = (
        "transport", "fd", "write", "buffered", "queue", "queued", "snapshot", "pong",
        "connected_at", "last_seen", "stalled_since", "close_reason", "peer", "owner", "_pumping",
        "copies_writes", "linger", "sock", "acked", "feed",
    )

    def __init__(self, owner: Clients, transport: WSTransport, feed: Feed) -> None:
        underlying = transport.underlying_transport
        # high=0, low=0: pause_writing as soon as anything stays in the
        # transport, resume_writing once all of it is gone, which is when the
        # next piece of the queue may follow.
        underlying.set_write_buffer_limits(high=0, low=0)
        self.owner = owner
        self.transport = transport
        #: The clients it shares its filter (and so its batches and snapshots) with.
        self.feed = feed
        self.sock = underlying.get_extra_info("socket")
        self.fd: int = self.sock.fileno()
        self.acked = 0
        self.write: Callable[[bytes | memoryview], None] = underlying.write
        self.buffered: Callable[[], int] = underlying.get_write_buffer_size
        #: Frames owed behind what the transport holds: bytes, one _Snapshot, one _Replay.
        self.queue: deque[bytes | _Snapshot | _Replay] = deque()
        #: Bytes in ``queue``, not counting the unsent part of a shared snapshot.
        self.queued = 0
        self.snapshot: _Snapshot | None = None
        #: Payload of the latest PING not yet answered (only the latest is, RFC 6455 §5.5.3).
        self.pong: bytes | None = None
        now = _monotonic()
        self.connected_at = now
        self.last_seen = now
        self.stalled_since: float | None = None
        self.close_reason: CloseReason | None = None
        self.peer = underlying.get_extra_info("peername")
        self._pumping = False
        # uvloop's transports keep a reference to what they are given; asyncio's
        # (3.11) copy it, which matters for the tail of a shared snapshot.
        self.copies_writes = not type(underlying).__module__.startswith("uvloop")
        self.linger: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Client {self.peer} reason={self.close_reason}>"

    @property
    def owed(self) -> int:
        """Bytes the relay holds for this client: its queue plus its transport's buffer."""
        return self.queued + self.buffered()

    def reading(self) -> bool:
        """True when the client's kernel acknowledged more of our data since the last
        look and some is still on its way: the client is behind, not gone.

        A busy page answers our pings only after the events queued ahead of
        them, so silence alone does not mean it is dead while it keeps reading.
        A hung client stops acknowledging once its receive buffer is full, and
        an idle one has nothing in flight, so neither passes.
        """
        if _TCP_INFO is None:
            return False
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return False
        if len(info) < _TCP_INFO_LEN:
            return False
        acked = _BYTES_ACKED.unpack_from(info, 120)[0]
        progressed, self.acked = acked > self.acked, acked
        return progressed and (_UNACKED.unpack_from(info, 24)[0] > 0 or self.owed > 0)

    # picows's backpressure callbacks, forwarded by the listener.
    def on_paused(self) -> None:
        self.owner.mark_stalled(self)

    def on_drained(self) -> None:
        self.owner.mark_drained(self)


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """What a connection asked for in its query."""

    #: The raw (epoch, since) it asked to resume from.
    resume: tuple[str, str] | None = None
    #: Its filter (None: the whole stream).
    subscription: Subscription | None = None
    #: Why its filter cannot be served: it is closed with 1008 and this reason.
    refusal: str | None = None


#: A connection that asks for nothing: the whole stream, from a fresh snapshot.
JOIN_ALL = JoinRequest()


class Clients:
    """The connected clients of one hub: joining, feeds, queues, snapshots, closing.

    ``flush`` writes the hub's pending events to the current members (so that a
    snapshot taken next reflects everything they have been sent);
    ``snapshot_payload`` serialises the registry, as a filter sees it, as an
    ``initial`` message; ``history`` is the stream's position and recent frames,
    for resuming. At most ``max_feeds`` distinct filters are served at once.
    """

    def __init__(self, *, max_client_buffer: int, flush: Callable[[], None],
                 snapshot_payload: Callable[[Subscription | None], bytes], history: History,
                 max_snapshots: int = 4, max_feeds: int = 64) -> None:
        self.max_client_buffer = max_client_buffer
        self.history = history
        self.resumes: dict[str, int] = dict.fromkeys(RESUME_OUTCOMES, 0)
        self.replayed = 0
        #: Fresh snapshots for refreshes wait while this many are on their way.
        self.max_snapshots = max_snapshots
        #: Snapshots not yet handed whole to every client they were queued for.
        self.live_snapshots = 0
        self._flush = flush
        self._snapshot_payload = snapshot_payload
        #: Every client that gets batches, of any feed (joined, not being closed).
        self.members: set[Client] = set()
        # Catch-up counts against each joiner's bound, so it must stay well below it.
        catchup_limit = max(max_client_buffer // 4, 1)
        #: The clients without a filter, and one feed per distinct filter in use.
        self.firehose = Feed(None, catchup_limit)
        self.feeds: dict[object, Feed] = {}
        self.max_feeds = max_feeds
        #: Clients whose transport holds unsent bytes, including those being closed.
        self.stalled: set[Client] = set()
        self.closed: dict[CloseReason, int] = dict.fromkeys(CloseReason, 0)
        self.frames_sent = 0
        self.bytes_sent = 0
        self.snapshots_built = 0
        self.refreshes_coalesced = 0
        # Clients waiting for a fresh snapshot, and the timer that looks again.
        self._refreshing: list[Client] = []
        self._refresh_handle: asyncio.TimerHandle | None = None
        #: With a broker (DESIGN §9), how long a client resuming from a position this
        #: relay has not relayed yet waits for it (0: such a position gets ``initial``).
        self.resume_ahead = 0.0
        # Those clients: their (epoch, since) as asked, the seq, until when they wait.
        self._ahead: dict[Client, tuple[tuple[str, str], int, float]] = {}
        self._ahead_handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.members)

    # -- snapshots ---------------------------------------------------------------

    def _build(self, feed: Feed) -> _Generation:
        started = _monotonic()
        frame = frame_text(self._snapshot_payload(feed.subscription))
        now = _monotonic()
        feed.forget_snapshot()
        generation = feed.generation = _Generation(self, frame, now, now - started)
        self.snapshots_built += 1
        return generation

    def _queue_snapshot(self, client: Client, generation: _Generation, catchup: bool) -> None:
        snapshot = _Snapshot(generation)
        client.snapshot = snapshot
        client.queue.append(snapshot)
        if catchup:
            for batch in client.feed.catchup:
                client.queue.append(batch)
                client.queued += len(batch)
        self.frames_sent += 1
        self.bytes_sent += len(generation.frame)
        self._pump(client)

    def _send_joining_snapshot(self, client: Client) -> None:
        feed = client.feed
        generation = feed.generation
        # A fresh snapshot when the registry changed since the current one, unless
        # that one is still on its way to someone (or was built a moment ago):
        # then joiners share it, with catch-up, so that N clients joining
        # together cost one snapshot, not N.
        if generation is None or (feed.catchup and not generation.users
                                  and _monotonic() >= generation.reusable_from):
            generation = self._build(feed)
        self._queue_snapshot(client, generation, catchup=True)

    def _serve_refreshes(self) -> None:
        """Send every waiting refresher one fresh snapshot, or look again shortly.

        A refresh never gets an older snapshot with catch-up: the client has
        those events already and would see them twice. Instead refreshers wait,
        all for the same next build, while building now would come too soon
        after the last one or too many snapshots are still on their way.
        """
        if not self._refreshing:
            return
        self._flush()
        waiting, self._refreshing = self._refreshing, []
        retry = _REFRESH_RETRY
        for client in waiting:
            if client.close_reason is not None or client not in self.members:
                continue  # closed, or gone (aborted) while it waited
            feed = client.feed
            generation = feed.generation
            if generation is None or feed.catchup:  # the registry changed since it was built
                wait = 0.0 if generation is None else generation.reusable_from - _monotonic()
                if wait > 0 or self.live_snapshots >= self.max_snapshots:
                    self._refreshing.append(client)
                    retry = max(retry, wait)
                    continue
                # Built once per feed: the next refresher of this feed finds it fresh.
                generation = self._build(feed)
            self._queue_snapshot(client, generation, catchup=False)
            if client.owed > self.max_client_buffer:
                self.close_slow(client)
        if self._refreshing and self._refresh_handle is None:
            self._refresh_handle = asyncio.get_running_loop().call_later(
                retry, self._refresh_timer)

    def _refresh_timer(self) -> None:
        self._refresh_handle = None
        self._serve_refreshes()

    # -- joining and leaving --------------------------------------------------------

    def add_client(self, transport: WSTransport, join: JoinRequest | None = None) -> Client:
        """Queue the snapshot, or the events missed since ``join.resume`` = (epoch, since),
        and join the fan-out set of its filter's feed in one step (no event in between)."""
        join = join or JOIN_ALL
        # Everything accepted goes out first, to the feeds as they are: a batch
        # is never split across a feed that did not exist when it began.
        self._flush()
        client = Client(self, transport, self.firehose)
        if join.refusal is not None:
            self.close_client(client, POLICY_VIOLATION, join.refusal.encode(), CloseReason.FILTER)
            return client
        if join.subscription is not None:
            feed = self._feed(join.subscription)
            if feed is None:
                self.close_client(client, TRY_AGAIN_LATER, b"too many distinct filters",
                                  CloseReason.FILTER)
                return client
            client.feed = feed
        if join.resume is not None and self._waits_for_position(client, join.resume):
            return client
        self._join(client, join.resume)
        return client

    def _join(self, client: Client, resume: tuple[str, str] | None) -> None:
        if resume is None or not self._resume(client, *resume):
            self._send_joining_snapshot(client)
        client.feed.members.add(client)
        self.members.add(client)

    def _waits_for_position(self, client: Client, resume: tuple[str, str]) -> bool:
        """With a broker, a position read on another relay can be ahead of this one by
        the propagation delay: hold the client (not yet a member) until this relay has
        relayed that far, for at most ``resume_ahead`` seconds, then resume it. True
        when it waits."""
        parsed = parse_resume(*resume)
        history = self.history
        if (self.resume_ahead <= 0 or parsed is None or parsed[0] != history.epoch
                or parsed[1] <= history.last_seq or not history.enabled):
            return False
        self._ahead[client] = (resume, parsed[1], _monotonic() + self.resume_ahead)
        if self._ahead_handle is None:
            self._ahead_handle = asyncio.get_running_loop().call_later(
                self.resume_ahead, self._ahead_timer)
        return True

    def serve_waiting(self) -> None:
        """Join the clients waiting for a position the relay has now relayed (or that
        waited long enough: they get ``initial``, as any position past the last)."""
        if not self._ahead:
            return
        now = _monotonic()
        last = self.history.last_seq
        for client, (resume, since, deadline) in list(self._ahead.items()):
            if since > last and now < deadline:
                continue
            del self._ahead[client]
            if client.close_reason is None:
                self._join(client, resume)

    def _ahead_timer(self) -> None:
        self._ahead_handle = None
        self._flush()  # joining, as always, after everything accepted went out
        self.serve_waiting()
        if self._ahead:
            wait = min(deadline for _, _, deadline in self._ahead.values()) - _monotonic()
            self._ahead_handle = asyncio.get_running_loop().call_later(
                max(wait, 0.001), self._ahead_timer)

    def restart_stream(self) -> None:
        """The stream began again (DESIGN §9: the broker lost its data, or this relay took
        up the broker's position): every client gets a fresh ``initial``.

        A client still being sent a snapshot or a replay of the old stream cannot
        be given one without cutting into it: it is closed with 1013 and reconnects.
        """
        self.firehose.forget_snapshot()
        for feed in self.feeds.values():
            feed.forget_snapshot()
        # Each member gets the fresh snapshot now, so no refresh is owed any more.
        self._refreshing = []
        for client in list(self.members):
            if client.snapshot is not None or any(type(item) is _Replay for item in client.queue):
                self.close_client(client, TRY_AGAIN_LATER, b"stream restarted",
                                  CloseReason.RESTARTED)
                continue
            feed = client.feed
            self._queue_snapshot(client, feed.generation or self._build(feed), catchup=False)
            if client.owed > self.max_client_buffer:
                self.close_slow(client)

    def _feed(self, subscription: Subscription) -> Feed | None:
        """The feed of ``subscription``'s filter; None when it would be one too many
        (each distinct filter costs a buffer per batch, so their number is bounded)."""
        feed = self.feeds.get(subscription.key)
        if feed is None:
            if len(self.feeds) >= self.max_feeds:
                self.sweep()
            if len(self.feeds) < self.max_feeds:
                feed = self.feeds[subscription.key] = Feed(subscription,
                                                           self.firehose.catchup_limit)
        return feed

    def _leave(self, client: Client) -> None:
        """Take ``client`` out of the fan-out; a filter nobody uses any more is forgotten."""
        self.members.discard(client)
        feed = client.feed
        feed.members.discard(client)
        if not feed.members:
            self.keep(feed)

    def keep(self, feed: Feed, now: float | None = None) -> bool:
        """True while ``feed`` is worth writing to; a filter nobody uses is forgotten.

        An empty feed lingers while its snapshot may still be shared (the same
        spacing that bounds rebuilds for joiners in a loop), so that clients
        connecting one after another with one filter do not each cost a fresh
        snapshot.
        """
        if feed.members or feed.subscription is None:
            return True
        generation = feed.generation
        if generation is not None and (now or _monotonic()) < generation.reusable_from:
            return True
        if self.feeds.get(feed.subscription.key) is feed:
            del self.feeds[feed.subscription.key]
        return False

    def sweep(self) -> None:
        """Forget the filters nobody uses, and snapshots no joiner will share any more
        (what the relay holds stays bounded by the snapshots on their way)."""
        now = _monotonic()
        for feed in (self.firehose, *self.feeds.values()):
            generation = feed.generation
            if generation is not None and not generation.users and now >= generation.reusable_from:
                feed.forget_snapshot()
        for feed in list(self.feeds.values()):
            self.keep(feed, now)

    @property
    def filters(self) -> int:
        """Distinct filters clients are subscribed with now."""
        return sum(1 for feed in self.feeds.values() if feed.members)

    def _resume(self, client: Client, epoch_text: str, since_text: str) -> bool:
        """Queue ``resumed`` and the events after ``since``; False (counted) when the
        history cannot give every one of them, and the client gets ``initial``."""
        parsed = parse_resume(epoch_text, since_text)
        if parsed is None:
            self.resumes["malformed"] += 1
            return False
        epoch, since = parsed
        history = self.history  # add_client flushed: everything accepted is in it
        if epoch != history.epoch:
            self.resumes["unknown_epoch"] += 1
            return False
        if not history.holds_after(since):
            self.resumes["out_of_range"] += 1
            return False
        last = history.last_seq
        head = frame_text(orjson.dumps({"type": "resumed", "epoch": epoch, "since": since,
                                        "seq": last}))
        client.queue.append(head)
        client.queued += len(head)
        if since < last:
            client.queue.append(_Replay(history, since + 1, last, client.feed.subscription))
        self.resumes["resumed"] += 1
        self._pump(client)
        return True

    def remove_client(self, client: Client) -> None:
        """Forget a disconnected client and count why it went."""
        self._ahead.pop(client, None)
        self._leave(client)
        self.stalled.discard(client)
        _drop_queue(client)
        if client.linger is not None:
            client.linger.cancel()
            client.linger = None
        if client.close_reason is None:  # the relay's own closes were counted when decided
            self.closed[CloseReason.NORMAL] += 1

    # -- what clients send ------------------------------------------------------------

    def on_client_text(self, client: Client, payload: bytes) -> None:
        """A text message: pongs only prove liveness; ``refresh`` gets a snapshot."""
        if payload == b"pong" or len(payload) > 4096 or client.close_reason is not None:
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if type(message) is dict and message.get("type") == "refresh":
            if client.snapshot is not None or client in self._refreshing:
                # One snapshot pending per client: it is already on its way, and
                # everything after it follows it, so a second one adds nothing.
                self.refreshes_coalesced += 1
                return
            self._refreshing.append(client)
            self._serve_refreshes()

    def on_client_ping(self, client: Client, payload: bytes) -> None:
        """Answer a PING; while the client is behind, only the latest one (a flood costs nothing)."""
        if client.close_reason is not None:
            return
        client.pong = payload
        if not client.queue and not client.buffered():
            self._pump(client)

    def on_client_close(self, client: Client, code: int) -> None:
        """The client started the closing handshake: finish it with ``code``."""
        self.close_client(client, code, b"", CloseReason.NORMAL)

    def fail_client(self, client: Client, code: int, reason: bytes) -> None:
        """The client broke the protocol: close with ``code`` (1002, 1007, 1009)."""
        self.close_client(client, code, reason, CloseReason.PROTOCOL)

    # -- writing --------------------------------------------------------------------------

    def enqueue(self, client: Client, data: bytes) -> bool:
        """Queue ``data`` behind what ``client`` is owed; False when that puts it over its bound."""
        client.queue.append(data)
        client.queued += len(data)
        return client.queued + client.buffered() <= self.max_client_buffer

    def _pump(self, client: Client) -> None:
        """Hand the transport what comes next, while it takes everything at once."""
        if client._pumping or client.close_reason is not None:
            return
        client._pumping = True
        lost = False
        try:
            queue, buffered, write = client.queue, client.buffered, client.write
            while not buffered():
                snapshot = client.snapshot
                if client.pong is not None and (snapshot is None or snapshot.pos == 0):
                    # Control frames may go between any two frames (RFC 6455 §5.4).
                    write(_pong_frame(client.pong))
                    client.pong = None
                    continue
                if not queue:
                    break
                item = queue[0]
                if type(item) is _Replay:
                    taken = item.take(CHUNK)
                    if taken is None:
                        lost = True
                        break
                    if item.done:
                        queue.popleft()
                    frames, count = taken
                    if count:
                        self.replayed += count
                        self.frames_sent += count
                        self.bytes_sent += len(frames)
                        write(frames)
                    if item.subscription is not None and not item.done:
                        # A filtered replay reads the history back event by event:
                        # look further on the next turn of the loop, so that a
                        # filter matching little of a long history stalls nothing.
                        asyncio.get_running_loop().call_soon(self._pump, client)
                        break
                elif type(item) is _Snapshot:
                    piece = item.take(CHUNK)
                    if item.done:
                        queue.popleft()
                        item.release()
                        client.snapshot = None
                    write(piece)
                else:
                    queue.popleft()
                    client.queued -= len(item)  # type: ignore[arg-type]
                    write(item)  # type: ignore[arg-type]
            if buffered():
                self.mark_stalled(client)
        finally:
            client._pumping = False
        if lost:  # it read too slowly to be replayed what the history has forgotten since
            self.close_slow(client)

    def mark_stalled(self, client: Client) -> None:
        if client.stalled_since is None:
            client.stalled_since = _monotonic()
        self.stalled.add(client)

    def mark_drained(self, client: Client) -> None:
        # A client whose socket drains is reading, so it is alive even while
        # our pings wait behind a long snapshot and its pongs cannot come yet.
        client.last_seen = _monotonic()
        client.stalled_since = None
        self.stalled.discard(client)
        if client.close_reason is not None:
            if client.transport.underlying_transport.can_write_eof():
                self._linger(client)
            return
        self._pump(client)

    # -- closing --------------------------------------------------------------------------

    def close_slow(self, client: Client) -> None:
        # The close frame follows what the transport holds, so the client
        # learns why (1013) once it reads; the send timeout aborts it if it never does.
        self.close_client(client, TRY_AGAIN_LATER, b"client too slow", CloseReason.SLOW)

    def close_client(self, client: Client, code: int, reason: bytes, why: CloseReason) -> None:
        """Stop sending to ``client`` and close it gracefully with ``code``; ``why`` is counted.

        What was queued but not yet handed to the transport is dropped.
        """
        if client.close_reason is not None:
            return
        client.close_reason = why
        self.closed[why] += 1
        self._leave(client)
        snapshot = client.snapshot
        _drop_queue(client)
        if snapshot is not None and snapshot.pos:
            tail = snapshot.frame[snapshot.pos:]
            if client.copies_writes and len(tail) > CLOSE_TAIL:
                client.transport.disconnect(False)
                return
            client.write(tail)  # a close frame may not cut into a frame
        client.write(close_frame(code, reason))
        underlying = client.transport.underlying_transport
        if underlying.can_write_eof():
            # Half-close and keep reading until the client closes its side: a
            # socket closed with unread input is reset, and the reset can
            # overtake the close frame on its way.
            underlying.write_eof()
            if client.buffered():
                self.mark_stalled(client)  # the send timeout runs, then the linger
            else:
                self._linger(client)
        else:
            client.transport.disconnect(True)
            if client.buffered():
                self.mark_stalled(client)

    def _linger(self, client: Client) -> None:
        if client.linger is None:
            client.linger = asyncio.get_running_loop().call_later(
                CLOSE_LINGER, client.transport.disconnect, False)

    def abort_client(self, client: Client, why: CloseReason) -> None:
        """Drop ``client``'s connection at once, discarding what it has not read."""
        if client.close_reason is None:
            client.close_reason = why
            self.closed[why] += 1
        self._leave(client)
        _drop_queue(client)
        client.transport.disconnect(False)

    async def close_everyone(self, code: int, reason: bytes, why: CloseReason,
                             grace: float) -> None:
        """Close every member with ``code``; abort whoever has not read it within ``grace`` s."""
        for client in [*self.members, *self._ahead]:
            self.close_client(client, code, reason, why)
        self._ahead.clear()
        deadline = _monotonic() + grace
        while self.stalled and _monotonic() < deadline:
            await asyncio.sleep(0.01)
        for client in list(self.stalled):
            self.abort_client(client, why)
        await asyncio.sleep(0)  # let aborted transports report connection_lost


def _drop_queue(client: Client) -> None:
    if client.snapshot is not None:
        client.snapshot.release()
        client.snapshot = None
    client.queue.clear()
    client.queued = 0
    client.pong = None


def _pong_frame(payload: bytes) -> bytes:
    # Control payloads are at most 125 bytes, so the length fits the first byte.
    return bytes((0x8A, len(payload))) + payload


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """An unmasked CLOSE frame; ``reason`` is cut to fit the 125-byte control payload."""
    payload = code.to_bytes(2, "big") + reason[:123]
    return bytes((0x88, len(payload))) + payload
