"""The stream's position and its recent past: epoch, last seq, the last events' frames.

An epoch names one unbroken run of sequence numbers (DESIGN §7). The history
keeps the frames exactly as they were written to the clients, so a resume
replays the same bytes and costs no second serialisation; it is bounded both
by count and by bytes, and it forgets the oldest first.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence

__all__ = ["History", "new_epoch", "parse_resume", "parse_since", "resume_request"]

_SINCE = re.compile(r"[0-9]{1,19}")
#: Longer epochs than this are not ours (ours are 8 characters).
MAX_EPOCH = 64


def new_epoch() -> str:
    """A fresh epoch name: short, URL-safe, and not expected to repeat."""
    return secrets.token_urlsafe(6)


def resume_request(query: Mapping[str, list[str]]) -> tuple[str, str] | None:
    """The raw ``(epoch, since)`` a connection's query asks to resume from; None when it
    does not ask. A parameter given twice reads as empty (and so malformed)."""
    if "epoch" not in query and "since" not in query:
        return None
    epoch, since = query.get("epoch", []), query.get("since", [])
    return (epoch[0] if len(epoch) == 1 else "", since[0] if len(since) == 1 else "")


def parse_since(text: str) -> int | None:
    """A seq given in a query (0 up to 2**63 - 1), or None when it is not one."""
    if _SINCE.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value < 1 << 63 else None


def parse_resume(epoch: str, since: str) -> tuple[str, int] | None:
    """``(epoch, since)`` as the stream's types, or None when either is malformed."""
    value = parse_since(since)
    if not 0 < len(epoch) <= MAX_EPOCH or value is None:
        return None
    return (epoch, value)


class History:
    """The last ``max_events`` frames (at most ``max_bytes`` of them) and the seq they end at.

    Frames live in a ring, so reading any seq is O(1) and appending never moves
    the others. ``max_events`` 0 keeps nothing, and then resume is off.
    """

    def __init__(self, max_events: int, max_bytes: int, epoch: str | None = None,
                 last_seq: int = 0) -> None:
        if max_events < 0 or max_bytes < 0:
            raise ValueError("history bounds must be >= 0")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.epoch = epoch or new_epoch()
        #: The seq of the newest event written to the stream (0 before the first).
        self.last_seq = last_seq
        #: Bytes of the frames held.
        self.nbytes = 0
        self._ring: list[bytes] = []
        self._head = 0  # ring index of the oldest frame
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def enabled(self) -> bool:
        return self.max_events > 0 and self.max_bytes > 0

    @property
    def first_seq(self) -> int:
        """The seq of the oldest frame held (``last_seq + 1`` when none is)."""
        return self.last_seq - self._count + 1

    def extend(self, frames: Sequence[bytes]) -> None:
        """Append the frames of the next events of the stream, in seq order."""
        if not self.enabled:
            self.last_seq += len(frames)
            return
        ring = self._ring
        max_events, max_bytes = self.max_events, self.max_bytes
        for frame in frames:
            self.last_seq += 1
            size = len(frame)
            if size > max_bytes:
                # It cannot be held, so nothing before it can be replayed either.
                self.clear()
                continue
            while self._count and (self._count >= max_events or self.nbytes + size > max_bytes):
                self._drop_oldest()
            if len(ring) < max_events:
                # The ring grows to max_events as events come, then only wraps;
                # while it grows, the frames held end at its end.
                ring.append(frame)
            else:
                ring[(self._head + self._count) % max_events] = frame
            self._count += 1
            self.nbytes += size

    def _drop_oldest(self) -> None:
        ring = self._ring
        self.nbytes -= len(ring[self._head])
        ring[self._head] = b""
        self._head = (self._head + 1) % self.max_events
        self._count -= 1

    def restart(self, epoch: str | None, last_seq: int) -> None:
        """Forget every frame and continue from ``last_seq`` in ``epoch`` (None: a new one)."""
        self.clear()
        self.epoch = epoch or new_epoch()
        self.last_seq = last_seq

    def clear(self) -> None:
        """Forget every frame (the position stays)."""
        self._ring.clear()
        self._head = self._count = 0
        self.nbytes = 0

    def holds_after(self, since: int) -> bool:
        """True when resume is on and every event after ``since`` up to the last is held
        (or none exists)."""
        return self.enabled and self.first_seq - 1 <= since <= self.last_seq

    def frame(self, seq: int) -> bytes:
        """The frame of event ``seq``; IndexError when it is not held."""
        offset = seq - self.first_seq
        if not 0 <= offset < self._count:
            raise IndexError(f"seq {seq} is not in the history")
        return self._ring[(self._head + offset) % len(self._ring)]

    def recent(self, since: int, limit: int,
               accept: Callable[[bytes], bool] | None = None) -> list[bytes]:
        """The frames after ``since`` that ``accept`` takes (all: None), the newest
        ``limit`` of them, oldest first."""
        picked: list[bytes] = []
        seq = self.last_seq
        first = max(since + 1, self.first_seq)
        while seq >= first and len(picked) < limit:
            frame = self.frame(seq)
            if accept is None or accept(frame):
                picked.append(frame)
            seq -= 1
        picked.reverse()
        return picked

    def frames(self, start: int, stop: int) -> list[bytes]:
        """The frames of events ``start`` to ``stop`` inclusive (all must be held)."""
        return [self.frame(seq) for seq in range(start, stop + 1)]
