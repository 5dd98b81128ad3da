"""What both hub implementations share: reason names, and the parts off the hot path."""

from __future__ import annotations

import time
from typing import Any

import orjson

__all__ = [
    "BATCH_BUCKETS",
    "CLOSE_REASONS",
    "REJECT_REASONS",
    "answer_close",
    "classify_undecodable",
    "hub_stats",
    "machines_payload",
    "new_entry",
    "snapshot_payload",
]

#: Why a datagram was dropped; /healthz and /metrics count each.
REJECT_REASONS = ("invalid_utf8", "invalid_json", "not_object", "invalid_type", "too_large")
#: Why a client went away.
CLOSE_REASONS = ("normal", "slow", "timeout", "unresponsive", "shutdown")
#: Upper bounds of the batch-size histogram (powers of two; one more bucket is +Inf).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def new_entry(machine_id: str) -> dict[str, Any]:
    """A registry entry for a machine seen for the first time."""
    return {
        "id": machine_id,
        "current_state": None,
        "previous_state": None,
        "last_activity": None,
        "data": None,
    }


def answer_close(transport: Any, frame: Any) -> None:
    """Echo a client's close frame (RFC 6455 §5.5.1) and drop the connection."""
    from picows import WSCloseCode

    try:
        code = frame.get_close_code()
    except ValueError:  # a code picows's enum does not know
        code = WSCloseCode.OK
    if code == WSCloseCode.NO_INFO:
        code = WSCloseCode.OK
    transport.send_close(code)
    transport.disconnect()


def classify_undecodable(raw: bytes) -> str:
    """The reject reason for a datagram orjson could not parse."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"


def snapshot_payload(machines: dict[str, dict[str, Any]]) -> bytes:
    """The ``initial`` message: every machine's current entry, as JSON bytes."""
    return orjson.dumps(
        {"type": "initial", "machines": list(machines.values()), "timestamp": time.time()})


def machines_payload(machines: dict[str, dict[str, Any]]) -> bytes:
    """The registry as a JSON array (GET /api/machines)."""
    return orjson.dumps(list(machines.values()))


def hub_stats(hub: Any) -> dict[str, Any]:
    """Plain counters for /healthz, /metrics and the heartbeat line."""
    return {
        "clients": len(hub.clients),
        "machines": len(hub.machines),
        "accepted": hub.accepted,
        "relayed": hub.relayed,
        "frames_sent": hub.frames_sent,
        "bytes_sent": hub.bytes_sent,
        "batches": hub.batches,
        "evicted": hub.evicted,
        "rejects": dict(hub.rejects),
        "closed": dict(hub.closed),
        "batch_histogram": list(hub.batch_histogram),
    }
