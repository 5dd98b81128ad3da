"""Names shared by both hub implementations and the code that reports on them."""

from __future__ import annotations

__all__ = ["BATCH_BUCKETS", "CLOSE_REASONS", "REJECT_REASONS"]

#: Why a datagram was dropped; /healthz and /metrics count each.
REJECT_REASONS = ("invalid_utf8", "invalid_json", "not_object", "invalid_type", "too_large")
#: Why a client went away.
CLOSE_REASONS = ("normal", "slow", "timeout", "unresponsive", "shutdown")
#: Upper bounds of the batch-size histogram (powers of two; one more bucket is +Inf).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
