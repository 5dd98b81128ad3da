"""Feeds: the clients that share one filter, and what they share.

Every client belongs to one feed: the firehose (no filter) or the feed of its
:class:`~fastrelay.subscription.Subscription`. A feed is what fan-out frames
for: each batch becomes one buffer per feed, written to each of its members,
so a thousand clients on ten filters cost ten buffers, not a thousand. A feed
also holds its current shared snapshot and the batches written since (the
catch-up a joiner gets behind that snapshot), since both are the feed's view
of the stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from ._hubdefs import frame_payload
from .subscription import Subscription

if TYPE_CHECKING:
    from .clients import Client, _Generation

__all__ = ["EventKey", "Feed", "frame_key", "takes_frame"]

_monotonic = time.monotonic
#: What a filter looks at in an event: its machine_id (None when it has no
#: string one) and its type.
EventKey = tuple[str | None, str]


def frame_key(frame: bytes) -> EventKey:
    """The key of a relayed event, read back from its frame (as the history holds it).

    Live batches carry their keys from intake; only replays and the history
    endpoint read them back, and only for filtered clients.
    """
    try:
        event = orjson.loads(frame_payload(frame))
    except orjson.JSONDecodeError:  # not ours: a state directory someone else wrote
        return (None, "")
    if type(event) is not dict:
        return (None, "")
    machine_id, kind = event.get("machine_id"), event.get("type")
    return (machine_id if type(machine_id) is str else None, kind if type(kind) is str else "")


def takes_frame(subscription: Subscription, frame: bytes) -> bool:
    """True when ``subscription`` takes the event framed in ``frame``."""
    return subscription.matches(*frame_key(frame))


class Feed:
    """The members of one filter (None: the whole stream) and their shared snapshot."""

    __slots__ = ("subscription", "members", "generation", "catchup", "catchup_bytes",
                 "catchup_limit")

    def __init__(self, subscription: Subscription | None, catchup_limit: int) -> None:
        self.subscription = subscription
        #: Clients that get this feed's batches (joined, not being closed).
        self.members: set[Client] = set()
        #: The current shared snapshot, and the feed's batches written since it was taken.
        self.generation: _Generation | None = None
        self.catchup: list[bytes] = []
        self.catchup_bytes = 0
        #: Past this much catch-up the next joiner gets a fresh snapshot instead.
        self.catchup_limit = catchup_limit

    def __repr__(self) -> str:
        return f"<Feed {self.subscription!r} members={len(self.members)}>"

    @property
    def collecting(self) -> bool:
        """True while written batches must be :meth:`record`-ed (a snapshot is current)."""
        return self.generation is not None

    def record(self, batch: bytes) -> None:
        """Remember a batch just written to the members, as catch-up for the next joiner."""
        generation = self.generation
        if generation is not None and not generation.users and (
                _monotonic() >= generation.reusable_from):
            # The next joiner would get a fresh one anyway: hold no snapshot
            # nobody is being sent.
            self.forget_snapshot()
            return
        self.catchup.append(batch)
        self.catchup_bytes += len(batch)
        if self.catchup_bytes > self.catchup_limit:
            self.forget_snapshot()

    def forget_snapshot(self) -> None:
        self.generation = None
        self.catchup = []
        self.catchup_bytes = 0

    def select(self, frames: Sequence[bytes], keys: Sequence[EventKey]) -> tuple[bytes, int]:
        """The frames of a batch this feed's filter takes, joined; and how many."""
        subscription = self.subscription
        if subscription is None:
            return b"".join(frames), len(frames)
        matches = subscription.matches
        # A types filter leaves out events that still change machines it lists:
        # its snapshot plus catch-up would then be stale, so it is not shared again.
        hides = subscription.types is not None and self.generation is not None
        chosen = []
        for frame, (machine_id, kind) in zip(frames, keys, strict=True):
            if matches(machine_id, kind):
                chosen.append(frame)
            elif hides and machine_id is not None and subscription.matches_machine(machine_id):
                self.forget_snapshot()
                hides = False
        return b"".join(chosen), len(chosen)
