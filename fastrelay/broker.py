"""Several relays, one stream: the Redis broker (DESIGN §9).

Every relay pointed at one Redis publishes what its socket accepts and relays
what the stream carries, its own events included, so all of them deliver one
order with one epoch and one seq sequence, assigned in Redis:

- **Publishing.** The hub validates each datagram and puts it in the
  :class:`~fastrelay.outbox.Outbox`. One task sends the outbox's oldest events
  (up to ``PUBLISH_EVENTS``) to the ``PUBLISH`` script: one round trip assigns
  their seqs, updates the shared registry (and the ``previous_state`` each
  needs) and appends them to the capped stream. One batch is in flight at a
  time, and what arrives meanwhile makes the next one, so batches grow with
  the load. Events leave the outbox only once Redis answered; a batch resent
  after a lost answer carries the same number, and the script skips it.
- **Reading.** Another task pulls the stream with ``XREAD BLOCK`` on its own
  connection, from the seq the hub has relayed. Pulling, never pushed to, a
  relay cannot be dropped at Redis's output-buffer limit: Redis holds at most
  one reply of ``READ_COUNT`` entries for it. Each entry is framed by the same
  native splice as a local event, so every relay sends the same bytes.
- **Taking up the stream.** At start, after a gap (the stream was trimmed past
  this relay) or when the epoch changed, the ``SNAPSHOT`` script reads epoch,
  seq and registry in one step, the history comes from the stream, and every
  client gets a fresh ``initial``. An epoch always begins empty, so when a new
  one began while this relay was cut off (Redis lost its data), it takes it up
  from its first event instead and relays every event of it.
- **Faults.** Any failure marks the broker down (/healthz says degraded) and
  the task retries with capped, jittered backoff; clients stay connected and
  the outbox keeps what is accepted meanwhile, up to its bounds.

This module is imported only with ``--broker``: it is where redis-py loads.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._hubdefs import PUBLISH_BUCKETS, BrokerStats
from .history import new_epoch
from .logs import LogLimiter
from .outbox import Outbox, OutboxEntry
from .redis_scripts import PUBLISH, SNAPSHOT

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["MIN_STREAM", "RedisBroker"]

log = logging.getLogger("fastrelay")

#: Events per publish round trip at most, and about this many bytes: the script
#: runs this long inside Redis, where every other client waits for it (and it
#: unpacks two values per machine onto Lua's stack, which holds 8,000).
PUBLISH_EVENTS = 1024
PUBLISH_BYTES = 4 * 1024 * 1024
#: Stream entries (batches) per XREAD: the most Redis ever buffers for one
#: relay's reader is this many batches of at most PUBLISH_BYTES.
READ_COUNT = 8
#: How long one XREAD waits for entries; after an empty one the epoch is checked.
BLOCK_MS = 1000
#: The stream keeps at least this many events, even with --history 0: it is
#: also how events reach the other relays, which must read them before they go.
MIN_STREAM = 10_000
#: How long a client resuming from a position this relay has not relayed yet
#: waits for it before it gets ``initial`` (the relays of a stream lag each other
#: by about a round trip to Redis; more when one is overloaded).
RESUME_AHEAD = 2.0
#: Reconnect backoff: from BACKOFF_MIN, doubling, capped at BACKOFF_MAX, +-20% jitter.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
#: A command that takes longer than this counts as a failure (Redis is down or stuck).
COMMAND_TIMEOUT = 5.0
CONNECT_TIMEOUT = 1.0

#: One event of the stream: seq, its bytes, the previous_state to splice in (JSON),
#: the time its publishing relay gave it when it carried no timestamp.
StreamEntry = tuple[int, bytes, bytes | None, float | None]
#: Stream entries as redis-py parses them (RESP2, bytes, not decoded).
RawEntries = list[tuple[bytes, dict[bytes, bytes]]]
_loads = orjson.loads
#: What new_epoch() makes (and a little more): anything else in the epoch key is not ours.
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _backoff(delay: float) -> float:
    return delay * random.uniform(0.8, 1.2)


async def _cancelled(task: asyncio.Task[None], timeout: float = 1.0) -> None:
    """Cancel ``task`` and wait for it to end, at most ``timeout``. The cancel is
    repeated: redis-py's use of asyncio.wait_for can swallow one (Python 3.11) when
    it lands as a reply completes, and the task would then run on."""
    deadline = time.monotonic() + timeout
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.05)


class ForeignData(ValueError):
    """Something in Redis that no relay wrote (see redis_scripts for what they write)."""


def _entry_seq(entry_id: bytes) -> int:
    """The seq of the last event of a stream entry, from its ID ``0-<seq>``."""
    head, _, tail = entry_id.partition(b"-")
    if head != b"0" or not tail.isdigit():
        raise ForeignData(f"stream entry ID {entry_id!r}")
    return int(tail)


def _epoch_text(raw: bytes) -> str:
    """An epoch read from Redis, as the scripts make them."""
    text = raw.decode("ascii", "replace")
    if not _EPOCH.fullmatch(text):
        raise ForeignData(f"epoch {raw[:80]!r}")
    return text


def _previous_states(field: bytes) -> list[bytes | None]:
    """The ``p`` field of a stream entry: per event, the ``previous_state`` to splice in
    (JSON null or a JSON string), or None. Checked, since each goes into every client's
    stream as it is: all at once, as one JSON array that must hold exactly them."""
    values = field.split(b"\n")
    given = [value for value in values if value]
    if given:
        try:
            parsed = _loads(b"[" + b",".join(given) + b"]")
        except orjson.JSONDecodeError:
            parsed = None
        if (type(parsed) is not list or len(parsed) != len(given)
                or any(item is not None and type(item) is not str for item in parsed)):
            raise ForeignData(f"previous states {field[:80]!r}")
    return [value or None for value in values]


def _entry_events(entry_id: bytes, fields: dict[bytes, bytes]) -> list[StreamEntry]:
    """The events of one stream entry; ForeignData when a relay did not write it."""
    try:
        last = _entry_seq(entry_id)
        blob = fields[b"d"]
        lengths = [int(size) for size in fields[b"l"].split(b",")]
        previous = _previous_states(fields[b"p"])
        stamps = [float(stamp) if stamp else None for stamp in fields[b"a"].split(b",")]
        n = int(fields[b"n"])
    except (KeyError, ValueError) as exc:
        raise ForeignData(f"stream entry {entry_id!r}: {exc}") from None
    if (not 0 < n <= last or len(lengths) != n or len(previous) != n or len(stamps) != n
            or min(lengths) < 0 or sum(lengths) != len(blob)):
        raise ForeignData(f"stream entry {entry_id!r}: its fields disagree")
    events: list[StreamEntry] = []
    offset = 0
    seq = last - n
    for size, before, stamp in zip(lengths, previous, stamps, strict=True):
        seq += 1
        events.append((seq, blob[offset:offset + size], before, stamp))
        offset += size
    return events


def _stream_entries(raw: RawEntries) -> tuple[list[StreamEntry], ForeignData | None]:
    """The events of the stream entries ``raw``, in order, up to the first one no relay
    wrote; and what is wrong with that one (None: nothing)."""
    events: list[StreamEntry] = []
    for entry_id, fields in raw:
        try:
            events += _entry_events(entry_id, fields)
        except ForeignData as exc:
            return events, exc
    return events, None


def _machine(machine_id: bytes, record: bytes) -> dict[str, object] | None:
    """A registry entry from its record in Redis (see redis_scripts); None when it is not one."""
    parts = record.split(b"\n", 3)
    if len(parts) != 4:
        return None
    current, previous, last_activity, event = parts
    try:
        data = _loads(event).get("data") if event else None
        return {"id": machine_id.decode(), "current_state": _loads(current),
                "previous_state": _loads(previous), "last_activity": _loads(last_activity),
                "data": data}
    except (orjson.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


class RedisBroker:
    """The link of one relay's hub to the stream named ``stream`` in the Redis at ``url``."""

    def __init__(self, hub: Hub, url: str, *, stream: str = "fastrelay",
                 outbox_events: int = 100_000, outbox_bytes: int = 64 * 1024 * 1024,
                 max_machines: int = 100_000, write_delay: float = 0.0) -> None:
        self.hub = hub
        self.url = url
        self.stream = stream
        self.outbox = Outbox(outbox_events, outbox_bytes)
        hub.outbox = self.outbox
        # A position read on another relay may be ahead of this one for a moment.
        hub.peers.resume_ahead = RESUME_AHEAD
        self.max_machines = max_machines
        #: --write-delay: events within this long of the previous publish share the next.
        self.write_delay = write_delay
        #: The stream holds about this many events: what --history replays, at least.
        self.stream_cap = max(hub.history.max_events, MIN_STREAM)
        tag = "{" + stream + "}"
        self._epoch_key = f"{tag}:epoch"
        self._seq_key = f"{tag}:seq"
        self._registry_key = f"{tag}:registry"
        self._active_key = f"{tag}:active"
        self._stream_prefix = f"{tag}:stream:"
        self._relay_id = secrets.token_hex(8)
        self._done_key = f"{tag}:done:{self._relay_id}"
        # Two connections: XREAD BLOCK holds its own while it waits.
        self._publisher = self._connect(COMMAND_TIMEOUT)
        self._reader = self._connect(COMMAND_TIMEOUT + BLOCK_MS / 1000)
        self._publish = self._publisher.register_script(PUBLISH)
        self._snapshot = self._reader.register_script(SNAPSHOT)
        #: The epoch the publisher last saw Redis hold ("" before it knows), and
        #: the last seq it was answered with.
        self._epoch = ""
        self._published_to = ("", 0)
        self._batch_no = 0
        self._publish_ok = True
        #: Set while the reader holds the stream's position (its last round trip
        #: succeeded): only then does the publisher publish, so that what it
        #: publishes reaches this relay's clients as events (a take-up after it
        #: would fold them into a snapshot).
        self._reading = asyncio.Event()
        self._took_up = False
        self._stopping = False
        self._log_limiter = LogLimiter(60.0)
        self._down_since: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0
        self.received = 0
        self.reconnects = 0
        self.resyncs = 0
        self.publish_histogram = [0] * (len(PUBLISH_BUCKETS) + 1)
        self.publish_seconds = 0.0
        self.last_publish_seconds: float | None = None

    def _connect(self, timeout: float) -> Redis:
        # redis-py's own retries would hide an outage from us for their whole
        # backoff; our tasks retry, and keep counting while they do.
        return Redis.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0), single_connection_client=True, protocol=2,
            health_check_interval=0)

    @property
    def up(self) -> bool:
        return self._reading.is_set() and self._publish_ok

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Take up the stream's registry and history once if Redis answers (at most
        about CONNECT_TIMEOUT), then run the publisher and the reader."""
        try:
            await asyncio.wait_for(self._take_up(), CONNECT_TIMEOUT + COMMAND_TIMEOUT)
            self._reading.set()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._went_down("reader", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_forever()),
                       loop.create_task(self._publish_forever())]

    async def stop(self, grace: float) -> None:
        """Publish what the outbox holds (for up to ``grace`` seconds), then disconnect."""
        if not self._tasks:
            return
        reader, publisher = self._tasks
        self._stopping = True
        await _cancelled(reader)
        outbox = self.outbox
        deadline = time.monotonic() + grace
        while len(outbox) and self._publish_ok and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await _cancelled(publisher)
        self._tasks = []
        if len(outbox):
            log.warning("broker: %d accepted event(s) not published before stopping", len(outbox))
        for client in (self._publisher, self._reader):
            try:
                await asyncio.wait_for(client.aclose(), CONNECT_TIMEOUT)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass

    def _went_down(self, who: str, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("broker %s: Redis unreachable (%s: %s); relaying resumes when it is back",
                        self.url, who, exc or type(exc).__name__)

    def _came_back(self) -> None:
        if self._down_since is not None and self.up:
            log.info("broker %s: Redis back after %.1f s", self.url,
                     time.monotonic() - self._down_since)
            self._down_since = None
            self.reconnects += 1

    async def _retrying(self, attempt: Callable[[], Awaitable[bool]], who: str) -> None:
        """Run ``attempt`` until the broker stops; after a failure (False or an error)
        wait, with backoff. No error ends it: a task that died would leave the relay
        saying it is up while nothing flows."""
        delay = BACKOFF_MIN
        while not self._stopping:
            try:
                ok = await attempt()
            except Exception as exc:  # noqa: BLE001 - see the docstring
                if who == "reader":
                    self._reading.clear()
                else:
                    self._publish_ok = False
                if isinstance(exc, (RedisError, OSError)):
                    self._went_down(who, exc)
                elif self._log_limiter.allow(f"{who} error"):
                    log.error("broker %s: %s", who, exc, exc_info=exc)
                ok = False
            if ok:
                delay = BACKOFF_MIN
                continue
            await asyncio.sleep(_backoff(delay))
            delay = min(delay * 2, BACKOFF_MAX)

    # -- publishing ------------------------------------------------------------------

    async def _publish_forever(self) -> None:
        pending = 0  # events of a batch sent but not answered: it goes again as it was
        outbox = self.outbox
        last_sent = 0.0

        async def attempt() -> bool:
            nonlocal pending, last_sent
            await outbox.ready.wait()
            await self._reading.wait()
            # --write-delay, as for the clients' writes: what comes within it of
            # the previous publish joins the next one; after a quiet spell, at once.
            wait = last_sent + self.write_delay - time.monotonic()
            if wait > 0 and not pending and len(outbox) < PUBLISH_EVENTS:
                await asyncio.sleep(wait)
            if not pending:
                self._batch_no += 1
            entries = (outbox.peek(pending, 1 << 62) if pending
                       else outbox.peek(PUBLISH_EVENTS, PUBLISH_BYTES))
            pending = len(entries)
            started = last_sent = time.monotonic()
            self._epoch, last = await self._run_publish(entries)
            self._record_rtt(time.monotonic() - started)
            if last == -1:  # another epoch than we believed: nothing applied, send again
                return True
            outbox.pop(pending)
            if last != -2:
                self.published += pending
            pending = 0
            self._publish_ok = True
            self._came_back()
            return True

        await self._retrying(attempt, "publisher")

    async def _run_publish(self, entries: list[OutboxEntry]) -> tuple[str, int]:
        args: list[Any] = [new_epoch(), self._epoch, self._batch_no, self.stream_cap,
                           self.max_machines, len(entries), self._seen(self._epoch),
                           b"".join([entry[5] for entry in entries])]
        for machine_id, state, given, activity, flags, data in entries:
            args += (machine_id, state, given, activity, flags, len(data))
        keys = [self._epoch_key, self._seq_key, self._stream_prefix + (self._epoch or "-"),
                self._registry_key, self._active_key, self._done_key]
        raw_epoch, raw_last = await self._publish(keys=keys, args=args)
        epoch, last = _epoch_text(raw_epoch), int(raw_last)
        if last > 0:
            self._published_to = (epoch, last)
        return epoch, last

    def _seen(self, epoch: str) -> int:
        """The last seq of ``epoch`` this relay knows to exist (relayed or published)."""
        seen = self.hub.seq if self.hub.history.epoch == epoch else 0
        published_epoch, published_last = self._published_to
        return max(seen, published_last) if published_epoch == epoch else seen

    def _record_rtt(self, seconds: float) -> None:
        self.last_publish_seconds = seconds
        self.publish_seconds += seconds
        hist = self.publish_histogram
        for index, bound in enumerate(PUBLISH_BUCKETS):
            if seconds <= bound:
                hist[index] += 1
                return
        hist[-1] += 1

    # -- reading ---------------------------------------------------------------------

    async def _read_forever(self) -> None:
        hub = self.hub
        reader = self._reader
        synced = self._reading.is_set()

        async def attempt() -> bool:
            nonlocal synced
            if not synced:
                await self._sync()
                synced = True
                self._reading.set()
                self._came_back()
            synced = False  # until this read succeeds
            epoch = hub.history.epoch
            reply = await reader.xread({self._stream_prefix + epoch: f"0-{hub.seq}"},
                                       count=READ_COUNT, block=BLOCK_MS)
            if reply:
                streams = cast("list[tuple[bytes, RawEntries]]", reply)
                synced = await self._deliver(*_stream_entries(streams[0][1]))
            else:
                # Quiet for a while, or writing to another epoch's stream now.
                current = cast("bytes | None", await reader.get(self._epoch_key))
                synced = current == epoch.encode()
            return True

        await self._retrying(attempt, "reader")

    async def _deliver(self, entries: list[StreamEntry], foreign: ForeignData | None) -> bool:
        """Relay the next events; when one is missing (the stream was trimmed past this
        relay) or is not a relay's (``foreign``, or not an event), take the stream up
        anew after it. Returns True: the position is the stream's."""
        hub = self.hub
        expected = hub.seq + 1
        count = 0
        for seq, _, _, _ in entries:
            if seq != expected:
                break
            expected += 1
            count += 1
        taken = hub.relay_entries(entries if count == len(entries) else entries[:count])
        self.received += taken
        if taken < count:
            foreign = ForeignData(f"event {hub.seq + 1} is not a JSON object")
        if foreign is not None:
            self._warn("foreign", "broker: the stream holds %s, which no relay wrote; taking "
                       "the stream up anew after it", foreign)
        elif count < len(entries):
            self._warn("gap", "broker: events %d to %d left the stream before this relay read "
                       "them; taking the stream up anew", hub.seq + 1, entries[count][0] - 1)
        else:
            return True
        await self._take_up()
        return True

    def _warn(self, key: str, message: str, *args: object) -> None:
        if self._log_limiter.allow(key):
            log.warning(message, *args)

    async def _sync(self) -> None:
        """After connecting: go on from where the hub is, or take the stream up anew."""
        hub = self.hub
        epoch, seq = await self._position()
        if epoch == hub.history.epoch and seq >= hub.seq:
            return
        if epoch != hub.history.epoch and self._took_up:
            first, _ = _stream_entries(cast(RawEntries, await self._reader.xrange(
                self._stream_prefix + epoch, count=1)))
            if (not first and seq == 0) or (first and first[0][0] == 1):
                # A new epoch began while we were cut off, and it begins empty:
                # relay it from its first event, so clients miss none of it.
                hub.restart_stream([], epoch, 0, [])
                self.resyncs += 1
                return
        await self._take_up()

    async def _position(self) -> tuple[str, int]:
        reply = await self._run_snapshot(with_registry=False)
        return _epoch_text(reply[0]), int(reply[1])

    async def _run_snapshot(self, *, with_registry: bool) -> list[bytes]:
        epoch = self.hub.history.epoch
        reply = await self._snapshot(
            keys=[self._epoch_key, self._seq_key, self._registry_key, self._active_key,
                  self._stream_prefix + epoch],
            args=[new_epoch(), "1" if with_registry else "0", epoch, self._seen(epoch)])
        return cast("list[bytes]", reply)

    async def _take_up(self) -> None:
        """Registry, position and history from Redis; every client gets a fresh ``initial``."""
        reply = await self._run_snapshot(with_registry=True)
        epoch, seq = _epoch_text(reply[0]), int(reply[1])
        machines = []
        for k in range(2, len(reply) - 1, 2):
            machine = _machine(reply[k], reply[k + 1])
            if machine is not None:
                machines.append(machine)
        entries = await self._recent(epoch, seq)
        self.hub.restart_stream(machines, epoch, seq, entries)
        self._took_up = True
        self.resyncs += 1

    async def _recent(self, epoch: str, seq: int) -> list[StreamEntry]:
        """The stream's events up to ``seq``, as many as the history holds (newest first,
        a few entries at a time, so a stream of large events is not read whole)."""
        history = self.hub.history
        if not history.enabled or seq <= 0:
            return []
        oldest = max(seq - history.max_events + 1, 1)
        newest_first: list[list[StreamEntry]] = []
        held = size = 0
        upper = f"0-{seq}"
        while held < history.max_events and size < history.max_bytes:
            raw = cast(RawEntries, await self._reader.xrevrange(
                self._stream_prefix + epoch, max=upper, min=f"0-{oldest}", count=8))
            if not raw:
                break
            for entry_id, fields in raw:
                try:
                    entry = _entry_events(entry_id, fields)
                except ForeignData:
                    raw = []  # nothing before it can be replayed
                    break
                newest_first.append(entry)
                held += len(entry)
                size += sum(len(data) for _, data, _, _ in entry)
            if not raw:
                break
            upper = "(" + raw[-1][0].decode()
        events = [event for entry in reversed(newest_first) for event in entry
                  if event[0] >= oldest]
        # Only an unbroken run that ends at seq can be replayed.
        if not events or events[-1][0] != seq:
            return []
        start = len(events) - 1
        while start > 0 and events[start - 1][0] == events[start][0] - 1:
            start -= 1
        return events[start:]

    # -- reading out -------------------------------------------------------------------

    def stats(self) -> BrokerStats:
        return BrokerStats(
            url=_redact(self.url), stream=self.stream, up=self.up,
            outbox_events=len(self.outbox), outbox_bytes=self.outbox.nbytes,
            published=self.published, received=self.received,
            reconnects=self.reconnects, resyncs=self.resyncs,
            publish_histogram=tuple(self.publish_histogram),
            publish_seconds=self.publish_seconds,
            last_publish_seconds=self.last_publish_seconds,
        )


def _redact(url: str) -> str:
    """``url`` without its password, for /healthz."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"
