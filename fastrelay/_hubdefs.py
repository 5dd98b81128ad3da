"""What the hub and its readers share: reason names, framing and the stats record."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "BATCH_BUCKETS",
    "PUBLISH_BUCKETS",
    "BrokerStats",
    "REJECT_REASONS",
    "RESUME_OUTCOMES",
    "CloseReason",
    "HubStats",
    "classify_undecodable",
    "frame_payload",
    "frame_text",
]

#: Why a datagram was dropped; /healthz and /metrics count each. ``broker_unavailable``:
#: accepted while the broker was down and its outbox full (DESIGN §9).
REJECT_REASONS = ("invalid_utf8", "invalid_json", "not_object", "invalid_type", "too_large",
                  "too_deep", "broker_unavailable")
#: How a request to resume (``?epoch=E&since=S``) ended: honoured, or answered with
#: a fresh ``initial`` because the epoch is not this stream's, or the history no
#: longer (or never) held every event after ``since``, or the values were malformed.
RESUME_OUTCOMES = ("resumed", "unknown_epoch", "out_of_range", "malformed")
#: Upper bounds of the batch-size histogram (powers of two; one more bucket is +Inf).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class CloseReason(str, enum.Enum):
    """Why a client went away; /healthz and /metrics count each under its value."""

    NORMAL = "normal"  # the client closed, or its connection ended by itself
    SLOW = "slow"  # it fell more than --max-client-buffer behind (1013)
    TIMEOUT = "timeout"  # a send stayed pending longer than --send-timeout (aborted)
    UNRESPONSIVE = "unresponsive"  # silent for --pong-misses ping intervals (1011)
    PROTOCOL = "protocol"  # it broke RFC 6455 (1002, 1007, 1009)
    SHUTDOWN = "shutdown"  # the relay is stopping (1001)
    FILTER = "filter"  # its filter was malformed (1008) or one distinct filter too many (1013)
    RESTARTED = "restarted"  # the stream began again mid-snapshot or mid-replay (1013)


@dataclass(frozen=True)
class HubStats:
    """One consistent reading of the hub's counters, for /healthz, /metrics and the heartbeat."""

    backend: str
    clients: int
    machines: int
    #: Datagrams accepted (framed and relayed).
    accepted: int
    #: Event deliveries: events times the clients they were written to.
    relayed: int
    frames_sent: int
    bytes_sent: int
    batches: int
    evicted: int
    rejects: Mapping[str, int]
    closed: Mapping[str, int]
    batch_histogram: tuple[int, ...]
    snapshots_built: int
    refreshes_coalesced: int
    #: Bytes the relay holds for its clients: their queues plus their transports' buffers.
    owed_bytes: int
    #: The most any one client is owed (the bound is ``max_client_buffer``).
    owed_bytes_max: int
    max_client_buffer: int
    #: Clients whose transport holds unsent bytes.
    stalled: int
    #: The stream's position: its epoch and the seq of the newest accepted event.
    epoch: str
    seq: int
    #: What the history holds for resuming: events, bytes of frames, the oldest seq.
    history_events: int
    history_bytes: int
    history_oldest_seq: int | None
    #: Resume requests by outcome (RESUME_OUTCOMES).
    resumes: Mapping[str, int]
    #: Events sent from the history to resuming clients.
    replayed: int
    #: Distinct filters clients subscribe with (DESIGN §8), and clients on one.
    filters: int
    filtered_clients: int


#: Upper bounds (seconds) of the broker's publish round-trip histogram.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class BrokerStats:
    """One reading of the broker's state (DESIGN §9), for /healthz and /metrics."""

    url: str
    stream: str
    #: Both the publisher's and the reader's last round trip succeeded.
    up: bool
    outbox_events: int
    outbox_bytes: int
    #: Events this relay published, and stream entries it relayed (its own among them).
    published: int
    received: int
    #: Connections lost and found again; and times the relay took up the stream anew.
    reconnects: int
    resyncs: int
    #: Publish round trips by PUBLISH_BUCKETS (one more bucket is +Inf), their sum.
    publish_histogram: tuple[int, ...]
    publish_seconds: float
    last_publish_seconds: float | None


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame carrying ``payload`` (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def frame_payload(frame: bytes) -> memoryview:
    """The payload of one unmasked frame made by :func:`frame_text` (or the native framing)."""
    size = frame[1] & 0x7F
    start = 2 if size < 126 else 4 if size == 126 else 10
    return memoryview(frame)[start:]


def classify_undecodable(raw: bytes) -> str:
    """The reject reason for a datagram orjson could not parse."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"
