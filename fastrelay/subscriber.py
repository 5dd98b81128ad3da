"""A Python consumer of the relay's stream that survives disconnects: :class:`Subscriber`.

::

    async with fastrelay.Subscriber("ws://127.0.0.1:3002/ws/events") as subscriber:
        async for message in subscriber:
            if message["type"] == "initial":
                view = {m["id"]: m for m in message["machines"]}  # (re)build the view
            else:
                apply(view, message)                               # one event, in order

What it yields: an ``initial`` first, then every event in seq order, none twice.
It answers the relay's JSON pings itself, and after any disconnect (a relay
restart, a network error, a close frame) it reconnects with capped exponential
backoff and full jitter, asking to resume with ``?epoch=E&since=S`` (DESIGN §7).

``resumed`` is handled here and never yielded: when the relay could resume,
the events simply continue after the last one yielded, as if nothing had
happened. When it could not (a new epoch after a crash, a history that no
longer reaches back far enough), the relay sends an ``initial`` and that is
yielded: a second ``initial`` always means "rebuild your view from this one;
events may have been missed before it". ``reconnects`` and ``resumes`` count
what happened, for those who want to know.

Memory is bounded by backpressure, not by dropping: messages wait for the
consumer in a queue of at most ``max_queue`` messages or ``max_queue_bytes``
payload bytes, whichever is reached first, plus the rest of the one read of
the socket that crossed it (picows hands over every whole frame a read
brought, and a read is at most its read buffer). At that bound the subscriber
stops reading the socket, so TCP pushes back on the relay; it reads again once
the consumer has taken half of the queue. A consumer that stops iterating
therefore costs a bounded queue. The relay may close the connection meanwhile
(its ping deadline or its per-client buffer); the subscriber then reconnects,
once the consumer has drained, and resumes after the last message it queued,
which is lossless while the relay's history still holds the events missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

__all__ = ["DEFAULT_URL", "FilterRefused", "Subscriber"]

DEFAULT_URL = "ws://127.0.0.1:3002/ws/events"

log = logging.getLogger("fastrelay.subscriber")

_PONG = b'{"type":"pong"}'
#: Query parameters the subscriber owns: given twice, the relay reads them as malformed.
_POSITION_KEYS = frozenset({"epoch", "since"})
#: The relay's close code for a filter it cannot serve (RFC 6455 §7.4.1: policy violation).
_POLICY_VIOLATION = 1008


class FilterRefused(Exception):
    """The relay refused this subscriber's filter (close code 1008, its reason in the
    message): asking again cannot help, so iteration ends with this error."""


class Subscriber:
    """Follow a relay's stream: ``async for message in subscriber`` yields decoded dicts.

    Yields ``initial`` (the first message, and again whenever a reconnect
    could not resume: rebuild from it), then each relayed event, in seq order
    within an epoch, never one twice. Pings are answered, not yielded;
    ``resumed`` is consumed, not yielded. Iteration ends (StopAsyncIteration)
    only after :meth:`close`; connection failures are retried forever, each
    one logged on the ``fastrelay.subscriber`` logger and kept in
    :attr:`last_error`.

    ``machines`` (globs with ``*`` and ``?``) and ``types`` subscribe to part of
    the stream (DESIGN §8): only matching events come, and seqs keep the
    stream's numbering, so they have gaps. A filter the relay refuses ends
    iteration with :class:`FilterRefused`. ``url`` keeps its query (a filter
    written there, a ``token=``); the subscriber adds its own ``epoch`` and
    ``since`` when resuming. A url that
    already carries both starts from that position: the relay then resumes
    there if it can, and the first message is an event instead of an
    ``initial``. ``token`` is sent as ``Authorization: Bearer``, so it appears
    in no url. Backoff between attempts is uniform in ``[0, min(max_backoff,
    min_backoff * 2**failures)]``; a connection that delivered its first
    message resets it.

    One consumer at a time: iterate from a single task. Use ``async with``
    or call :meth:`close` when done.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        machines: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        token: str | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_queue: int = 4096,
        max_queue_bytes: int = 8 * 1024 * 1024,
        connect_timeout: float = 5.0,
        max_message_size: int = 64 * 1024 * 1024,
    ) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError("backoff bounds must satisfy 0 < min_backoff <= max_backoff")
        if max_queue < 1 or max_queue_bytes < 1:
            raise ValueError("max_queue and max_queue_bytes must be >= 1")
        self.url = url
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        parts = urlsplit(url)
        self._parts = parts
        params = [p for p in parts.query.split("&") if p]
        self._query = [p for p in params if p.partition("=")[0] not in _POSITION_KEYS]
        for key, terms in (("machines", machines), ("types", types)):
            if terms is None:
                continue
            if isinstance(terms, str):
                raise TypeError(f"{key}: give a list of strings, not one string")
            if any(p.partition("=")[0] == key for p in self._query):
                raise ValueError(f"{key} is given both in the url and as an argument")
            self._query.append(f"{key}={quote(','.join(terms), safe=',*?')}")
        #: The epoch of the last message yielded (None before the first ``initial``).
        self.epoch: str | None = None
        #: The seq of the last message yielded: an event's seq, or an ``initial``'s.
        self.seq = 0
        #: Connections opened after the first one.
        self.reconnects = 0
        #: Connections the relay resumed (the others began with an ``initial``).
        self.resumes = 0
        #: Events dropped because their seq was not after the last one (defensive).
        self.duplicates = 0
        #: The last connection failure or disconnect, one line; None before any.
        self.last_error: str | None = None
        # The position of the last message queued: what a reconnect resumes from.
        self._epoch, self._seq = _position_in(params)
        self.epoch, self.seq = self._epoch, self._seq
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self._queued_bytes = 0
        self._paused: WSTransport | None = None
        self._transport: WSTransport | None = None
        self._connections = 0
        self._failures = 0
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._room: asyncio.Event | None = None

    # -- public API ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a WebSocket connection to the relay is open."""
        return self._transport is not None and not self._transport.is_disconnected

    @property
    def pending(self) -> int:
        """Messages received and waiting for the consumer."""
        return len(self._queue)

    def start(self) -> None:
        """Begin connecting in the background (iterating or ``async with`` does it too)."""
        if self._task is None and not self._closed:
            self._room = asyncio.Event()
            self._room.set()
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(lambda _task: self._wake())

    async def close(self) -> None:
        """Close the connection and stop reconnecting; iteration then ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self._wake()
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            transport.send_close(WSCloseCode.GOING_AWAY)
            transport.disconnect()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if transport is not None and not transport.is_disconnected:
            try:
                await asyncio.wait_for(transport.wait_disconnected(), self.connect_timeout)
            except Exception:  # timed out or ended with an error: it is going anyway
                transport.disconnect(graceful=False)

    async def __aenter__(self) -> Subscriber:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> dict[str, Any]:
        self.start()
        while True:
            if self._queue:
                return self._take()
            if self._closed:
                raise StopAsyncIteration
            task = self._task
            if task is not None and task.done() and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None

    # -- the queue ------------------------------------------------------------------

    def _take(self) -> dict[str, Any]:
        message, size = self._queue.popleft()
        self._queued_bytes -= size
        if message.get("type") == "initial":
            epoch, seq = message.get("epoch"), message.get("seq")
            self.epoch = epoch if type(epoch) is str else None
            self.seq = seq if type(seq) is int else 0
        else:
            seq = message.get("seq")
            if type(seq) is int:
                self.seq = seq
        if (len(self._queue) <= self.max_queue // 2
                and self._queued_bytes <= self.max_queue_bytes // 2):
            self._make_room()
        return message

    def _full(self) -> bool:
        return len(self._queue) >= self.max_queue or self._queued_bytes >= self.max_queue_bytes

    def _make_room(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.is_disconnected:
            try:
                paused.underlying_transport.resume_reading()
            except RuntimeError:  # closed meanwhile: the run loop reconnects
                pass
        if self._room is not None:
            self._room.set()

    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _put(self, transport: WSTransport, message: dict[str, Any], size: int) -> None:
        self._queue.append((message, size))
        self._queued_bytes += size
        self._wake()
        if self._full() and self._paused is None:
            # Backpressure: what the relay sends next waits in the kernel and in
            # its own bounded buffer for this client, not in this process.
            transport.underlying_transport.pause_reading()
            self._paused = transport
            if self._room is not None:
                self._room.clear()

    # -- messages from the relay (called from picows callbacks) --------------------------

    def _on_message(self, connection: _Connection, transport: WSTransport, message: dict[str, Any],
                    size: int) -> None:
        if self._closed:
            return
        kind = message.get("type")
        first = not connection.greeted
        connection.greeted = True
        if first:
            self._failures = 0  # a relay that talks: start the next backoff small again
        if kind == "resumed":
            if (not first or message.get("epoch") != self._epoch
                    or message.get("since") != self._seq):
                # Not the position asked for: following it could skip or repeat
                # events, so start over from a fresh initial.
                log.warning("unexpected resume %s at epoch %s seq %d; reconnecting for a fresh "
                            "initial", orjson.dumps(message).decode(), self._epoch, self._seq)
                self._epoch, self._seq = None, 0
                transport.disconnect()
                return
            self.resumes += 1
            return
        if kind == "initial":
            epoch, seq = message.get("epoch"), message.get("seq")
            self._epoch = epoch if type(epoch) is str else None
            self._seq = seq if type(seq) is int else 0
            self._put(transport, message, size)
            return
        seq = message.get("seq")
        if type(seq) is int and self._epoch is not None:
            if seq <= self._seq:
                self.duplicates += 1
                return
            self._seq = seq
        self._put(transport, message, size)

    def _on_ping(self, ping: dict[str, Any]) -> None:
        # Every event up to "through" that our filter takes came before this
        # ping: a reconnect resumes from there, which the relay still holds
        # even when the filter matched nothing for a long time.
        through = ping.get("through")
        if (not self._closed and type(through) is int and self._epoch is not None
                and ping.get("epoch") == self._epoch and through > self._seq):
            self._seq = through

    # -- connecting ------------------------------------------------------------------

    def _connect_url(self) -> str:
        query = list(self._query)
        if self._epoch is not None:
            query += [f"epoch={quote(self._epoch, safe='')}", f"since={self._seq}"]
        return urlunsplit(self._parts._replace(query="&".join(query)))

    def _shown_url(self) -> str:
        """The url for log lines: a ``token=`` in it is masked."""
        query = [p if p.partition("=")[0] != "token" else "token=***" for p in self._query]
        return urlunsplit(self._parts._replace(query="&".join(query)))

    async def _run(self) -> None:
        assert self._room is not None
        while not self._closed:
            await self._room.wait()  # a full queue reconnects only once the consumer drained
            opened = await self._open()
            if opened is not None:
                await self._follow(*opened)
                connection = opened[1]
                if connection.close_code == _POLICY_VIOLATION:
                    raise FilterRefused(connection.close_reason or "the relay refused the filter")
            if self._closed:
                return
            cap = min(self.max_backoff, self.min_backoff * 2 ** min(self._failures, 32))
            self._failures += 1
            delay = random.uniform(0, cap)
            log.info("reconnecting to %s in %.2f s", self._shown_url(), delay)
            await asyncio.sleep(delay)

    async def _open(self) -> tuple[WSTransport, _Connection] | None:
        try:
            transport, listener = await asyncio.wait_for(
                ws_connect(lambda: _Connection(self), self._connect_url(),
                           websocket_handshake_timeout=self.connect_timeout,
                           max_frame_size=self.max_message_size,
                           extra_headers=self._headers),
                self.connect_timeout * 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, reset, timed out, a handshake refused: try again
            self.last_error = f"cannot connect to {self._shown_url()}: {_describe(exc)}"
            log.warning("%s", self.last_error)
            return None
        assert isinstance(listener, _Connection)
        if self._closed:
            # close() came as the handshake completed, and wait_for (3.10, 3.11) may
            # then return the connection instead of raising CancelledError.
            transport.disconnect(graceful=False)
            return None
        self._transport = transport
        self._connections += 1
        if self._connections > 1:
            self.reconnects += 1
        log.info("connected to %s", self._shown_url())
        return transport, listener

    async def _follow(self, transport: WSTransport, connection: _Connection) -> None:
        try:
            await transport.wait_disconnected()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the error it ended with; the reason is logged below
            connection.error = connection.error or _describe(exc)
        finally:
            self._transport = None
            if self._paused is transport:
                # Reading stays off on a dead transport; the queue keeps what was read.
                self._paused = None
        if self._closed:
            return
        why = connection.error or (f"close code {connection.close_code}"
                                   if connection.close_code is not None else "connection lost")
        self.last_error = f"disconnected from {self._shown_url()}: {why}"
        log.info("%s", self.last_error)


class _Connection(WSListener):
    """One WebSocket connection's picows listener: decodes frames, answers pings."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.greeted = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.error: str | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = int(code.value)
            self.close_reason = (frame.get_close_message() or b"").decode("utf-8", "replace")
            transport.send_close(code)
            transport.disconnect()
            return
        if kind is not WSMsgType.TEXT:
            return  # PINGs are answered by picows (auto pong); the relay sends nothing else
        if not frame.fin:
            # The relay sends each message in one frame; a fragment would be one
            # message lost, so start over rather than skip it.
            self.error = "fragmented message"
            transport.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if type(message) is not dict:
            return
        if message.get("type") == "ping":
            transport.send(WSMsgType.TEXT, _PONG)
            self.subscriber._on_ping(message)
            return
        self.subscriber._on_message(self, transport, message, len(payload))


def _position_in(params: list[str]) -> tuple[str | None, int]:
    """The ``(epoch, since)`` a url's query parameters start from; ``(None, 0)`` if none."""
    found: dict[str, str] = {}
    for param in params:
        key, _, value = param.partition("=")
        if key in _POSITION_KEYS:
            found[key] = unquote(value)
    epoch, since = found.get("epoch"), found.get("since", "")
    if epoch and since.isdigit() and since.isascii():
        return epoch, int(since)
    return None, 0


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__
