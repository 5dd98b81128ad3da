"""The hub's primitives in plain Python: the twin of the Cython ``fastrelay._core``.

The hub's algorithm lives once, in ``fastrelay.hub``; it calls only what is
here: take a batch of datagrams into slots, frame one slot (its ``seq`` spliced in) onto the
batch's buffer, write the buffer to every client. The compiled module offers
the same :class:`Batch` with the same behaviour, byte for byte; the tests run
both over the same inputs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from ._hubdefs import frame_text
from .clients import Client

__all__ = ["SLOTS", "Batch", "fan_out", "frame_text"]

#: Datagrams taken per receive (the compiled twin's recvmmsg vector).
SLOTS = 32

_PREV_KEY = b',"previous_state":'
_SEQ_KEY = b',"seq":'
_WHITESPACE = b" \t\r\n"


class Batch:
    """Slots for received datagrams and the buffer of frames made from them.

    ``receive`` fills the slots; the hub reads each one (``size``, ``view``,
    ``raw``, ``brackets``) and appends it to the buffer as a frame with its
    ``seq`` (and ``previous_state``) spliced in (``frame``); ``send`` writes the
    buffer to every client; ``clear`` starts the next batch.
    """

    def __init__(self, max_datagram: int) -> None:
        self.max_datagram = max_datagram
        #: Events framed into the buffer since the last clear().
        self.framed = 0
        #: Bytes in the buffer.
        self.nbytes = 0
        self._sock: socket.socket | None = None
        # One receive buffer, and each slot's datagram as bytes: 32 buffers of
        # max_datagram would be 32 x max_datagram of RSS (512 MiB at 16 MiB).
        self._buf = bytearray(max_datagram)
        self._view = memoryview(self._buf)
        self._data: list[bytes] = [b""] * SLOTS
        self._sizes = [0] * SLOTS
        self._got = 0
        self._parts: list[bytes] = []
        self._frames: list[bytes] = []

    # -- receiving ---------------------------------------------------------------

    def attach(self, sock: socket.socket | None) -> None:
        """Receive from ``sock`` (a non-blocking datagram socket) from now on; None stops."""
        self._sock = sock

    def receive(self, limit: int = SLOTS) -> int:
        """Fill up to ``limit`` slots from the socket; returns how many (0 when it is empty or detached)."""
        sock = self._sock
        self._got = 0
        if sock is None:
            return 0
        recv_into = sock.recv_into
        buf, view = self._buf, self._view
        max_datagram = self.max_datagram
        sizes, data = self._sizes, self._data
        got = 0
        for _ in range(max(0, min(limit, SLOTS))):
            try:
                # MSG_TRUNC makes the kernel report the datagram's real size, so
                # an over-size one is counted instead of silently cut.
                size = recv_into(buf, max_datagram, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if size <= max_datagram:
                sizes[got], data[got] = size, view[:size].tobytes()
            else:
                sizes[got], data[got] = -1, b""
            got += 1
        self._got = got
        return got

    def _check(self, i: int) -> None:
        if not 0 <= i < self._got:
            raise IndexError("no such slot in this batch")

    def size(self, i: int) -> int:
        """Slot ``i``'s datagram length, or -1 when it did not fit in ``max_datagram``."""
        self._check(i)
        return self._sizes[i]

    def view(self, i: int) -> memoryview:
        """Slot ``i``'s datagram, valid until the next receive()."""
        self._check(i)
        return memoryview(self._data[i])

    def raw(self, i: int) -> bytes:
        """Slot ``i``'s datagram as bytes."""
        self._check(i)
        return self._data[i]

    def brackets(self, i: int) -> int:
        """Opening brackets in slot ``i``: an upper bound on how deeply it nests."""
        data = self.raw(i)
        return data.count(b"[") + data.count(b"{")

    # -- framing -----------------------------------------------------------------

    def frame(self, i: int, seq: int, previous: bytes | None = None) -> None:
        """Append slot ``i`` (a JSON object) as one text frame, with ``,"previous_state":<previous>``
        (when given) and ``,"seq":<seq>`` added at its end."""
        if self.size(i) < 0:
            raise ValueError("slot holds a datagram larger than max_datagram")
        self._splice(self.raw(i), seq, previous, "slot")

    def splice(self, data: bytes, seq: int, previous: bytes | None = None) -> None:
        """Append ``data`` (a JSON object, as a broker carried it) as one text frame, the
        same way :meth:`frame` appends a slot: the same input makes the same bytes."""
        if type(data) is not bytes:
            raise TypeError("data must be bytes")
        self._splice(data, seq, previous, "data")

    def _splice(self, source: bytes, seq: int, previous: bytes | None, what: str) -> None:
        raw = source.rstrip(_WHITESPACE)
        if not raw.endswith(b"}"):
            raise ValueError(f"{what} is not a JSON object")
        if previous is not None and type(previous) is not bytes:
            raise TypeError("previous must be bytes")
        if not 0 <= seq < 1 << 64:
            raise OverflowError("seq out of range")
        extra = _SEQ_KEY + str(seq).encode() + b"}"
        if previous is not None:
            extra = _PREV_KEY + previous + extra
        self._append(frame_text(raw[:-1] + extra))

    def add(self, payload: bytes) -> None:
        """Append a relay-made message as one text frame."""
        self._append(frame_text(payload))

    def _append(self, frame: bytes) -> None:
        self._parts.append(frame)
        self._frames.append(frame)
        self.nbytes += len(frame)
        self.framed += 1

    def take(self) -> bytes:
        """The buffer's bytes (the batch stays in place)."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0] if parts else b""

    def frames(self) -> list[bytes]:
        """Each frame in the buffer as its own bytes, in order (what history keeps)."""
        return list(self._frames)

    def clear(self) -> None:
        self._parts = []
        self._frames = []
        self.framed = self.nbytes = 0

    # -- fan-out -------------------------------------------------------------------

    def send(self, clients: Iterable[Client], enqueue: Callable[[Client, bytes], bool],
             shared: bytes | None = None) -> list[Client] | None:
        """Write the buffer to every client; returns those it would put over their bound.

        See :func:`fan_out`; ``shared`` is the buffer's bytes when the caller
        has them already.
        """
        return fan_out(shared if shared is not None else self.take(), clients, enqueue)


def fan_out(data: bytes, clients: Iterable[Client],
            enqueue: Callable[[Client, bytes], bool]) -> list[Client] | None:
    """Write ``data`` to every client; returns those it would put over their bound.

    A client gets the bytes straight on its transport when nothing waits for
    it there or in its queue, checked at this moment; otherwise they join its
    queue through ``enqueue``.
    """
    over: list[Client] | None = None
    for client in clients:
        if client.queue or client.buffered():
            if not enqueue(client, data):
                if over is None:
                    over = []
                over.append(client)
        else:
            client.write(data)
    return over
