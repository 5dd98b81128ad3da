"""Configuration of the relay: one dataclass and the parsers for its values.

Every limit the relay enforces lives here with its default, so the CLI, the
README and RelayServer agree on one list.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "MAX_DEPTH_LIMIT",
    "MAX_SECONDS",
    "MAX_SOCKET_PATH",
    "ServeConfig",
    "default_socket_path",
    "parse_mode",
    "parse_size",
]

DEFAULT_SOCKET_PATH = "/tmp/statemachine-events.sock"
#: orjson refuses to serialise more than 254 levels, and a snapshot puts an
#: event's ``data`` three levels down ({"machines": [{"data": ...}]}).
MAX_DEPTH_LIMIT = 250

#: Upper bound of every interval option: a day is already no keepalive, and
#: larger values overflow the loop's timers and TCP_USER_TIMEOUT.
MAX_SECONDS = 86400
#: sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, one of
#: them the terminating NUL that C emitters write.
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103

_STREAM_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kib|kb|k|mib|mb|m|gib|gb|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def default_socket_path() -> str:
    """The datagram socket path: $FASTRELAY_SOCKET, else the original design's path."""
    return os.environ.get("FASTRELAY_SOCKET") or DEFAULT_SOCKET_PATH


def parse_size(text: str | int) -> int:
    """Parse ``65536``, ``64KiB`` or ``4MiB`` into bytes; raises ValueError with a readable message."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise ValueError(f"invalid size {text!r}: use a byte count or a KiB/MiB suffix, like 4MiB")
        unit = match.group(2).lower() if match.group(2) else None
        value = int(match.group(1)) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return value


def parse_mode(text: str | int) -> int:
    """Parse a file mode given in octal (``0o660`` or ``660``)."""
    if isinstance(text, int):
        value = text
    else:
        digits = text.strip().lower().removeprefix("0o")
        try:
            value = int(digits, 8)
        except ValueError:
            raise ValueError(f"invalid file mode {text!r}: use octal, like 0o660 or 660") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"invalid file mode {text!r}: must be between 0 and 0o777")
    return value


@dataclass
class ServeConfig:
    """Everything `fastrelay serve` can be told; the defaults are the documented ones."""

    host: str = "127.0.0.1"
    port: int = 3002
    socket_path: str = field(default_factory=default_socket_path)
    socket_mode: int = 0o660
    ws_path: str = "/ws/events"
    ping_interval: float = 10.0
    #: A client that sends nothing for this many ping intervals is closed.
    pong_misses: int = 3
    send_timeout: float = 2.0
    max_client_buffer: int = 4 * 1024 * 1024
    max_datagram: int = 64 * 1024
    #: Registry size: beyond it the least recently active machine is forgotten.
    max_machines: int = 100_000
    #: Deepest nesting of arrays and objects accepted in a datagram.
    max_depth: int = 64
    #: Refreshes wait for a fresh snapshot while this many are still being sent.
    max_snapshots: int = 4
    #: Datagrams taken from the socket per readable event before yielding to the loop.
    batch_cap: int = 1024
    #: 0 (natural batching): each drained batch is written at once, and what
    #: arrived meanwhile makes the next batch. Above 0, events arriving within
    #: this many seconds of the previous write wait for the next one (fewer
    #: writes per event under load, at the cost of that much latency).
    write_delay: float = 0.0
    #: Bytes of large HTTP responses (GET /api/machines) held for clients that
    #: have not read them yet; past it such requests get 503.
    max_http_buffer: int = 64 * 1024 * 1024
    #: Largest frame a client may send us (pongs and refreshes are tiny).
    max_client_frame: int = 64 * 1024
    hang_threshold: float = 15.0
    heartbeat_interval: float = 5.0
    log_dir: str = "logs"
    allow_origins: list[str] = field(default_factory=list)
    #: Host names clients may use besides loopback names, the bind name and IP
    #: literals (the DNS-rebinding guard); "*.example.com" covers subdomains, "*" all.
    allow_hosts: list[str] = field(default_factory=list)
    token: str | None = None
    backend: str = "auto"
    #: Events kept for resuming clients (DESIGN §7), and at most this many bytes
    #: of their frames; either 0 turns resume off.
    history: int = 10_000
    history_bytes: int = 16 * 1024 * 1024
    #: Where the registry, the stream's position and the history survive a restart.
    state_dir: str | None = None
    #: Seconds between saves of the registry to --state-dir while it changes.
    state_interval: float = 5.0
    #: Subscriptions (DESIGN §8): globs plus types one client's filter may hold,
    #: and UTF-8 bytes of its machines and types values together.
    max_filter_terms: int = 64
    max_filter_bytes: int = 2048
    #: Distinct filters served at once: each costs a buffer per batch, so a
    #: client asking for one more is closed with 1013.
    max_filters: int = 64
    #: Several relays, one stream (DESIGN §9): the Redis every relay of the stream
    #: shares (redis://, rediss:// or unix://), its keys' prefix, and the events
    #: accepted while Redis is unreachable that wait (at most so many, so many bytes).
    broker: str | None = None
    broker_stream: str = "fastrelay"
    broker_outbox: int = 100_000
    broker_outbox_bytes: int = 64 * 1024 * 1024

    def validate(self) -> None:
        """Raise ValueError naming the first option whose value cannot work."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must be between 0 and 65535")
        if not self.ws_path.startswith("/"):
            raise ValueError(f"--path {self.ws_path!r}: must start with /")
        for name in ("ping_interval", "send_timeout", "hang_threshold", "heartbeat_interval",
                     "state_interval"):
            value = getattr(self, name)
            # nan passes every comparison and inf overflows the loop's timers:
            # both used to get past here and fail only once the socket was bound.
            if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: must be a positive number "
                                 f"of seconds, at most {MAX_SECONDS}")
        if not 0 <= self.write_delay <= 1:  # false for nan too
            raise ValueError(f"--write-delay {self.write_delay!r}: must be between 0 and 1 second")
        if self.max_datagram > 16 * 1024 * 1024:
            raise ValueError("--max-datagram: at most 16MiB (the kernel caps datagrams well below)")
        if not 1 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise ValueError(f"--max-depth must be between 1 and {MAX_DEPTH_LIMIT}")
        if self.max_machines <= 0 or self.batch_cap <= 0:
            raise ValueError("--max-machines and --batch-cap must be positive")
        if min(self.max_filter_terms, self.max_filter_bytes, self.max_filters) <= 0:
            raise ValueError("--max-filter-terms, --max-filter-bytes and --max-filters must be "
                             "positive")
        if self.history < 0 or self.history_bytes < 0:
            raise ValueError("--history and --history-bytes must be 0 (no resume) or positive")
        if self.state_dir is not None and not self.state_dir:
            raise ValueError("--state-dir: the path must not be empty")
        if self.broker is not None:
            self._validate_broker()
        if self.backend not in ("auto", "cython", "python"):
            raise ValueError(f"--backend {self.backend!r}: use auto, cython or python")
        if not self.socket_path:
            raise ValueError("--socket: the path must not be empty")
        size = len(os.fsencode(self.socket_path))
        if size > MAX_SOCKET_PATH or "\0" in self.socket_path:
            raise ValueError(f"--socket {self.socket_path!r}: {size} bytes; socket paths hold at most "
                             f"{MAX_SOCKET_PATH} and no NUL (pick a shorter path)")
        for name in self.allow_hosts:
            bare = name.removeprefix("*.")
            if name != "*" and (not bare or any(c in bare for c in "/@?#* ")
                                or (":" in bare and not _is_ipv6(bare.strip("[]")))):
                raise ValueError(f"--allow-host {name!r}: give a host name without scheme or port, "
                                 "like relay.example.com or *.example.com")

    def _validate_broker(self) -> None:
        assert self.broker is not None
        scheme, sep, rest = self.broker.partition("://")
        if scheme not in ("redis", "rediss", "unix") or not sep or not rest:
            raise ValueError(f"--broker {self.broker!r}: give a Redis URL, like "
                             "redis://127.0.0.1:6379/0 (rediss:// for TLS)")
        if not _STREAM_RE.fullmatch(self.broker_stream):
            raise ValueError(f"--broker-stream {self.broker_stream!r}: 1 to 64 letters, digits, "
                             "'.', '_' or '-'")
        if self.broker_outbox <= 0 or self.broker_outbox_bytes <= 0:
            raise ValueError("--broker-outbox and --broker-outbox-bytes must be positive")
        if self.state_dir is not None:
            raise ValueError("--state-dir and --broker cannot be combined: with a broker the "
                             "registry and history live in Redis")
