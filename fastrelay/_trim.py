"""Right-sized copies of orjson's output, for bytes that are kept.

orjson (3.12 and later) returns bytes whose allocation is rounded up, to 4 KiB
at least, and never shrunk: ``sys.getsizeof`` shows the length while the
allocator holds the rest. A 60-byte event kept in a backlog costs 4 KiB, and
a full 10,000-event backlog 40 MiB instead of 3. What is kept for a while
(the emitter's backlog, the broker's outbox) is copied to its size first; what
is written at once is not.
"""

from __future__ import annotations

__all__ = ["trimmed"]


def trimmed(data: bytes) -> bytes:
    """A copy of ``data`` that owns exactly its length."""
    return bytes(memoryview(data))
