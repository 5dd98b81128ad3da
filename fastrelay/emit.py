"""The emitter: hand one JSON datagram per event to the relay and return at once.

Only the standard library and orjson are imported here, so a state machine that
does ``import fastrelay`` to emit pays nothing for the server.

Why a backlog: the kernel queues at most ``net.unix.max_dgram_qlen`` datagrams
per Unix datagram socket (10 on many hosts). A burst from one process would
therefore be dropped whenever the relay is not running at that instant. On
EAGAIN the event waits, in order, in a bounded per-process deque; a daemon
thread polls the connected socket for POLLOUT (which Linux reports when the
relay's queue has room) and flushes it. The caller never waits for the relay.

Why a hold: a relay restart leaves its path without a listener for a moment.
Rather than drop what is emitted meanwhile, the emitter queues it in the same
backlog, and the flusher looks for a relay on the path every 50 ms and sends
the backlog, in order, once one is there. Events kept longer than ``hold``
seconds without a relay are dropped, oldest first; ``hold=0`` drops at once.
"""

from __future__ import annotations

import atexit
import errno
import math
import os
import select
import socket
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Literal

import orjson

from ._trim import trimmed
from .config import default_socket_path

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_HOLD",
    "DROP_REASONS",
    "Emitter",
    "default_emitter",
    "emit",
    "send_event",
]

DEFAULT_BACKLOG = 10_000
#: Seconds an event may wait for an absent relay: long enough for a restart.
DEFAULT_HOLD = 5.0
#: Why an event can be dropped; every drop is counted under one of these.
DROP_REASONS = ("no_relay", "backlog_full", "too_large", "unserializable", "os_error")

# A connected datagram socket whose relay went away reports one of these; the
# relay may have restarted on the same path, so reconnect once before giving up.
# EPIPE: the relay is stopping and has shut its socket for reading (it takes
# what was queued before that, and the rest waits here for the next relay).
_GONE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET,
                          errno.EPIPE})
_FLUSH_POLL_MS = 100  # how often the flusher re-checks a relay that stopped answering POLLOUT
# How often the flusher looks for a relay while none listens: a restart is seen
# within this, and an absent relay costs one connect() per look, not a spin.
_ABSENT_POLL_S = 0.05
# Datagrams the flusher sends per hold of the lock: an emitting thread never
# waits behind a long drain.
_FLUSH_CHUNK = 32
_SMALL_DGRAM_DEFAULT = sys.platform == "darwin" or "bsd" in sys.platform
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS  # json.dumps accepted int keys; stay compatible


class Emitter:
    """Send events to a fastrelay socket: one reused socket per process, thread- and fork-safe.

    ``emit`` never raises and never blocks on the relay. It returns True when
    the event was handed to the kernel or queued in the backlog, False when it
    was dropped (see :attr:`dropped` for why).

    ``backlog`` bounds the events waiting in this process, in order, for a
    relay whose queue is full or that is not there; past it an event is
    dropped and counted ``backlog_full``.

    ``hold`` (seconds, default 5) is how long an event may wait for an absent
    relay (nobody bound on the path, as during a restart). Such events join the
    backlog, ``emit`` returns True, and a background thread sends them in order
    once a relay listens on the path again; an event that has been waiting
    longer than ``hold`` since it was queued, or since the relay went away if
    it was queued before, is dropped, oldest first, and counted ``no_relay``.
    While a relay is there, slow or not, nothing in the backlog expires.
    ``hold=0`` drops such events at once (``emit`` returns False), as before
    there was a hold.

    ``exit_flush_timeout`` (seconds) bounds the wait at interpreter exit for
    the backlog to reach the relay, including while the relay is absent; what
    is still waiting then is lost with the process.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        backlog: int = DEFAULT_BACKLOG,
        hold: float = DEFAULT_HOLD,
        exit_flush_timeout: float = 2.0,
    ) -> None:
        if backlog < 0:
            raise ValueError("backlog must be >= 0")
        if not (math.isfinite(hold) and hold >= 0):
            raise ValueError(f"hold must be a finite number of seconds >= 0, not {hold!r}")
        self.socket_path = socket_path or default_socket_path()
        self.backlog_limit = backlog
        #: Seconds an event may wait for an absent relay before it is dropped (0: at once).
        self.hold = float(hold)
        #: At interpreter exit, wait at most this long for the backlog to reach the relay.
        self.exit_flush_timeout = exit_flush_timeout
        self._reset_state()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(ref))
        atexit.register(_flush_at_exit, ref)

    def _reset_state(self) -> None:
        # Also the after-fork hook: the child gets its own lock, socket and an
        # empty backlog (the parent's queued events are the parent's to send).
        old = getattr(self, "_sock", None)
        if old is not None:
            old.close()
        self._lock = threading.Lock()
        self._has_backlog = threading.Condition(self._lock)
        self._sock: socket.socket | None = None
        # (time.monotonic() when queued, datagram), oldest first.
        self._backlog: deque[tuple[float, bytes]] = deque()
        # When this outage began (monotonic), None while a relay is connected
        # or none has been found missing yet.
        self._absent_since: float | None = None
        self._flusher: threading.Thread | None = None
        self._closed = False
        self.sent = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    # -- public API ---------------------------------------------------------

    def emit(self, event_type: str, machine_id: str | None = None, /, **fields: Any) -> bool:
        """Send ``{"type": event_type, "machine_id": machine_id, "timestamp": now, **fields}``.

        ``timestamp`` is filled only when absent; ``machine_id`` is left out when None.
        Never raises; returns False when the event was dropped. True means sent or
        queued: a queued event may still be dropped later, and is then counted.
        """
        event: dict[str, Any] = {"type": event_type}
        if machine_id is not None:
            event["machine_id"] = machine_id
        event["timestamp"] = time.time()
        event.update(fields)
        try:
            payload = orjson.dumps(event, option=_DUMPS_OPTIONS)
        except (TypeError, orjson.JSONEncodeError):
            with self._lock:
                self.dropped["unserializable"] += 1
            return False
        return self.send_bytes(payload)

    def send_bytes(self, payload: bytes) -> bool:
        """Send one already-serialized JSON object. Never raises; False when dropped."""
        with self._lock:
            if self._backlog:  # keep order: nothing overtakes what is already waiting
                return self._enqueue(payload)
            sock = self._sock or self._connect()
            if sock is None:
                return self._relay_absent(payload)
            return self._send_now(sock, payload, retry=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the backlog has reached the relay; True when it is empty.

        The only method that may wait, and only when asked to. Events dropped
        meanwhile (older than ``hold`` with no relay) leave the backlog too.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._backlog:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    @property
    def pending(self) -> int:
        """Events waiting in the backlog."""
        return len(self._backlog)

    def stats(self) -> dict[str, Any]:
        """Counters of this process: sent, pending, dropped by reason."""
        with self._lock:
            return {"sent": self.sent, "pending": len(self._backlog), "dropped": dict(self.dropped)}

    def close(self) -> None:
        """Drop the socket and the backlog (counted as no_relay); later emits reconnect."""
        with self._lock:
            self.dropped["no_relay"] += len(self._backlog)
            self._backlog.clear()
            self._absent_since = None
            self._close_socket()

    # -- internals (called with the lock held) --------------------------------

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:  # out of descriptors: like a missing relay, worth a later try
            return None
        try:
            if _SMALL_DGRAM_DEFAULT:
                # macOS and the BSDs cap a Unix datagram at the send buffer, 2 KiB
                # by default (net.local.dgram.maxdgram); events may be up to 64 KiB.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
            sock.setblocking(False)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            return None
        self._sock = sock
        self._absent_since = None
        return sock

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _relay_absent(self, payload: bytes) -> bool:
        """No relay on the path for ``payload``: hold it, or drop it when hold is 0."""
        if self.hold == 0:
            self.dropped["no_relay"] += 1
            return False
        if self._absent_since is None:
            self._absent_since = time.monotonic()
        return self._enqueue(payload)

    def _send_now(self, sock: socket.socket, payload: bytes, *, retry: bool) -> bool:
        try:
            sock.send(payload)
        except BlockingIOError:
            return self._enqueue(payload)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                self._close_socket()
                # EPIPE: this relay is stopping; reconnecting would find the same one.
                fresh = self._connect() if retry and exc.errno != errno.EPIPE else None
                if fresh is not None:
                    return self._send_now(fresh, payload, retry=False)
                return self._relay_absent(payload)
            if exc.errno == errno.EMSGSIZE:
                self.dropped["too_large"] += 1
            else:
                self.dropped["os_error"] += 1
            return False
        self.sent += 1
        return True

    def _enqueue(self, payload: bytes) -> bool:
        now = time.monotonic()
        backlog = self._backlog
        if len(backlog) >= self.backlog_limit:
            if self._absent_since is not None:
                self._expire(now)  # room held by events already past their hold is not full
            if len(backlog) >= self.backlog_limit:
                self.dropped["backlog_full"] += 1
                return False
        backlog.append((now, trimmed(payload)))
        if self._flusher is None or not self._flusher.is_alive():
            flusher = threading.Thread(target=self._flush_loop, name="fastrelay-emit-flusher", daemon=True)
            try:
                flusher.start()
            except RuntimeError:
                # Python 3.12+ refuses new threads at interpreter shutdown (an
                # emit from an atexit hook): nothing could send it, so drop it.
                backlog.pop()
                self.dropped["os_error"] += 1
                return False
            self._flusher = flusher
        elif len(backlog) == 1:
            # Wake the flusher only from an empty backlog: while the relay is
            # absent it sleeps on this condition between looks, and waking it
            # on every emit would turn those looks into a connect() per event.
            self._has_backlog.notify()
        return True

    def _expire(self, now: float) -> None:
        """Drop, oldest first, what has waited for an absent relay longer than ``hold``."""
        backlog = self._backlog
        if self.hold == 0:
            self.dropped["no_relay"] += len(backlog)
            backlog.clear()
            return
        cutoff = now - self.hold
        absent_since = self._absent_since
        if absent_since is not None and absent_since >= cutoff:
            return  # the outage itself is younger than hold: every event may still wait
        # Queue times only grow along the deque, so the expired ones are a prefix.
        expired = 0
        while backlog and backlog[0][0] < cutoff:
            backlog.popleft()
            expired += 1
        self.dropped["no_relay"] += expired

    def _flush_loop(self) -> None:
        poller = select.poll()
        polled: socket.socket | None = None
        room = False
        while True:
            with self._has_backlog:
                while not self._backlog:
                    self._has_backlog.wait()
                if self._absent_since is not None and self._sock is None:
                    # No relay on the path: look again after a pause, not in a spin.
                    self._has_backlog.wait(_ABSENT_POLL_S)
                sock = self._sock
            if sock is not None and not room:
                if sock is not polled:
                    if polled is not None:
                        try:
                            poller.unregister(polled)
                        except (KeyError, ValueError):
                            pass
                    poller.register(sock, select.POLLOUT)
                    polled = sock
                poller.poll(_FLUSH_POLL_MS)
            with self._lock:
                room = self._drain_backlog(_FLUSH_CHUNK) == "room"

    def _drain_backlog(self, limit: int) -> Literal["room", "full", "absent"]:
        """Send up to ``limit`` queued events.

        "room" when the socket may take more, "full" when it said EAGAIN (or
        the backlog is empty), "absent" when no relay listens on the path.
        """
        backlog = self._backlog
        while backlog and limit > 0:
            sock = self._sock or self._connect()
            if sock is None:
                now = time.monotonic()
                if self._absent_since is None:
                    self._absent_since = now
                self._expire(now)
                return "absent"
            try:
                sock.send(backlog[0][1])
            except BlockingIOError:
                return "full"
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    # A relay stopping: its path still connects until it is gone, so
                    # wait like for an absent one rather than reconnect in a loop.
                    self._close_socket()
                    if self._absent_since is None:
                        self._absent_since = time.monotonic()
                    return "absent"
                if exc.errno in _GONE_ERRNOS:
                    self._close_socket()  # the next turn reconnects or finds the relay absent
                    continue
                self.dropped["too_large" if exc.errno == errno.EMSGSIZE else "os_error"] += 1
                backlog.popleft()
                continue
            backlog.popleft()
            self.sent += 1
            limit -= 1
        return "room" if limit == 0 else "full"


def _reset_in_child(ref: weakref.ref[Emitter]) -> None:
    emitter = ref()
    if emitter is not None:
        emitter._reset_state()


def _flush_at_exit(ref: weakref.ref[Emitter]) -> None:
    emitter = ref()
    if emitter is not None and emitter.pending:
        emitter.flush(emitter.exit_flush_timeout)


_default: Emitter | None = None
_default_lock = threading.Lock()


def default_emitter() -> Emitter:
    """The process-wide emitter behind :func:`emit` (socket from $FASTRELAY_SOCKET or the default)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Emitter()
    return _default


def emit(event_type: str, machine_id: str | None = None, /, **fields: Any) -> bool:
    """Emit one event through the process-wide emitter. Never raises, never blocks.

    Returns True when the event was handed to the kernel or the backlog (which
    keeps it up to 5 s while no relay listens, see :class:`Emitter`), False
    when it was dropped (backlog full, too large, or not serializable);
    ``default_emitter().dropped`` counts why, including queued events that
    were dropped later (``no_relay``).
    """
    return default_emitter().emit(event_type, machine_id, **fields)


def send_event(event_type: str, machine_id: str, **kwargs: Any) -> bool:
    """The original design's ``send_event(event_type, machine_id, **kwargs)``, same wire format."""
    return default_emitter().emit(event_type, machine_id, **kwargs)
