"""Logging for `fastrelay serve`: a rotating file under --log-dir, and stderr."""

from __future__ import annotations

import logging
import logging.handlers
import os

__all__ = ["LOG_FILE", "configure_logging"]

LOG_FILE = "websocket-server.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_dir: str, level: int = logging.INFO) -> str:
    """Send the relay's logs to ``log_dir/websocket-server.log`` (10 MiB x 5) and stderr."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, LOG_FILE)
    formatter = logging.Formatter(_FORMAT)
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8")
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
