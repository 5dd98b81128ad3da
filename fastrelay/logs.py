"""Logging for `fastrelay serve`: a rotating file under --log-dir, and stderr."""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from collections import OrderedDict

__all__ = ["LOG_FILE", "LogDirUnavailable", "LogLimiter", "configure_logging", "ensure_log_dir",
           "printable"]

LOG_FILE = "websocket-server.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Characters of a client-supplied value shown in a log line.
_SHOWN = 100


class LogDirUnavailable(RuntimeError):
    """--log-dir cannot hold the relay's logs; the message names it and says why."""


def configure_logging(log_dir: str, level: int = logging.INFO) -> str:
    """Send the relay's logs to ``log_dir/websocket-server.log`` (10 MiB x 5) and stderr.

    Raises LogDirUnavailable (one line) when the directory cannot be made or written.
    """
    path = os.path.join(log_dir, LOG_FILE)
    ensure_log_dir(log_dir)
    try:
        file_handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8")
    except OSError as exc:
        raise _unavailable(log_dir, exc) from None
    formatter = logging.Formatter(_FORMAT)
    stderr_handler = logging.StreamHandler()
    root = logging.getLogger()
    for handler in (file_handler, stderr_handler):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    # picows logs every accepted connection at INFO: with thousands of clients
    # that drowns the relay's own lines.
    logging.getLogger("picows").setLevel(logging.WARNING)
    return path


def ensure_log_dir(log_dir: str) -> None:
    """Make ``log_dir`` if needed; raises LogDirUnavailable (one line) when it cannot be."""
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as exc:
        raise _unavailable(log_dir, exc) from None


def _unavailable(log_dir: str, exc: OSError) -> LogDirUnavailable:
    # makedirs says "File exists" for a file in the way: say what is wrong instead.
    reason = "not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
    return LogDirUnavailable(f"cannot write logs to {log_dir} (--log-dir): {reason}")


def printable(value: str) -> str:
    """``value`` quoted, ASCII only and cut short: safe to log whatever a client sent.

    Header values may hold surrogate escapes, which a UTF-8 log file refuses,
    and a line must not grow with what a client chose to send.
    """
    shown = ascii(value[:_SHOWN])
    return shown + "..." if len(value) > _SHOWN else shown


class LogLimiter:
    """Lets a line with a given key through at most once per ``interval`` seconds.

    It remembers at most ``max_keys`` keys: while that many are fresh, new keys
    are refused too, so a flood of distinct keys (a hostile client can invent
    any number of Origins) costs bounded memory and at most ``max_keys`` lines
    per interval. Refused lines are counted for the next line to mention.
    """

    def __init__(self, interval: float = 60.0, max_keys: int = 64) -> None:
        self.interval = interval
        self.max_keys = max_keys
        #: key -> when it was last let through; oldest first, since a key is
        #: only ever (re)inserted after its previous entry expired.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._suppressed = 0

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        seen = self._seen
        while seen:
            oldest, at = next(iter(seen.items()))
            if now - at < self.interval:
                break
            del seen[oldest]
        if key in seen or len(seen) >= self.max_keys:
            self._suppressed += 1
            return False
        seen[key] = now
        return True

    def take_suppressed(self) -> int:
        """Lines refused since the last call."""
        count, self._suppressed = self._suppressed, 0
        return count
