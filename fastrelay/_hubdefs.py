"""What both hub implementations share: reason names, framing, and the parts off the hot path."""

from __future__ import annotations

from typing import Any

__all__ = [
    "BATCH_BUCKETS",
    "CLOSE_REASONS",
    "REJECT_REASONS",
    "classify_undecodable",
    "frame_text",
    "hub_stats",
]

#: Why a datagram was dropped; /healthz and /metrics count each.
REJECT_REASONS = ("invalid_utf8", "invalid_json", "not_object", "invalid_type", "too_large",
                  "too_deep")
#: Why a client went away.
CLOSE_REASONS = ("normal", "slow", "timeout", "unresponsive", "protocol", "shutdown")
#: Upper bounds of the batch-size histogram (powers of two; one more bucket is +Inf).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame carrying ``payload`` (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def classify_undecodable(raw: bytes) -> str:
    """The reject reason for a datagram orjson could not parse."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"


def hub_stats(hub: Any) -> dict[str, Any]:
    """Plain counters for /healthz, /metrics and the heartbeat line."""
    peers = hub.peers
    return {
        "clients": len(peers),
        "machines": len(hub.machines),
        "accepted": hub.accepted,
        "relayed": hub.relayed,
        "frames_sent": hub.frames_sent + peers.frames_sent,
        "bytes_sent": hub.bytes_sent + peers.bytes_sent,
        "batches": hub.batches,
        "evicted": hub.evicted,
        "rejects": dict(hub.rejects),
        "closed": dict(peers.closed),
        "batch_histogram": list(hub.batch_histogram),
        "snapshots_built": peers.snapshots_built,
        "refreshes_coalesced": peers.refreshes_coalesced,
    }
