"""fastrelay: relay live events from local processes to browsers over WebSocket.

Emitting is all most processes need, and it stays light::

    import fastrelay
    fastrelay.emit("state_change", "worker-123", state="processing", data={"job_id": "task-456"})

``import fastrelay`` loads only the emitter (stdlib + orjson). The server side
(``RelayServer``, picows, uvloop) and the consumer (``Subscriber``) are imported
on first use of those names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .emit import Emitter, default_emitter, emit, send_event

if TYPE_CHECKING:
    from .server import RelayServer
    from .subscriber import FilterRefused, Subscriber

__all__ = [
    "BACKEND",
    "Emitter",
    "FilterRefused",
    "RelayServer",
    "Subscriber",
    "__version__",
    "default_emitter",
    "emit",
    "send_event",
]


def __getattr__(name: str) -> Any:
    # PEP 562: keep picows, uvloop and the extension out of emitting processes.
    if name == "BACKEND":
        from ._backend import BACKEND

        return BACKEND
    if name == "RelayServer":
        from .server import RelayServer

        return RelayServer
    if name in ("Subscriber", "FilterRefused"):
        from . import subscriber

        return getattr(subscriber, name)
    raise AttributeError(f"module 'fastrelay' has no attribute {name!r}")
