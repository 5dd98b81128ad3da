"""The relay's small HTTP surface: /healthz, /api/machines, /metrics and the dashboard."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson

from ._version import __version__

if TYPE_CHECKING:
    from .server import RelayServer

__all__ = ["Response", "Routes"]

_JSON = "application/json"
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
#: Names of the shipped files: short, plain, no path. Anything else is 404
#: before the file system is asked (a 300-character name made open() fail
#: with ENAMETOOLONG, and the 500 said where the package is installed).
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Bodies smaller than this are not worth tracking (they are bounded by the
#: number of connections, which the descriptor limit bounds).
_TRACK_FROM = 64 * 1024



class _HeldBody(bytearray):
    """A response body whose lifetime the routes track: picows keeps it with the
    connection, so it is freed when the client has read it or gone."""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes | bytearray


class Routes:
    """Answers the plain-HTTP GETs that arrive on the WebSocket port."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self._static: dict[str, Response] = {}
        #: Bytes of large responses not yet read by their clients (each held
        #: twice: the body and picows's copy of it with the headers).
        self.held = 0
        self.max_held = server.config.max_http_buffer
        self.refused_busy = 0

    def get(self, path: str) -> Response | None:
        """The response for ``path``, or None for 404."""
        if path == "/healthz":
            return Response(200, _JSON, orjson.dumps(self.health()))
        if path == "/api/machines":
            return self._held(Response(200, _JSON, self.server.hub.machines_payload()))
        if path == "/metrics":
            from .metrics import CONTENT_TYPE

            return Response(200, CONTENT_TYPE, self.server.metrics.render())
        if path in ("/", "/index.html"):
            return self.static("index.html")
        if path.startswith("/static/"):
            return self.static(path[len("/static/"):])
        return None

    def _held(self, response: Response) -> Response:
        """``response``, or 503 when large responses to slow readers hold too much already.

        A client that asks for the registry and never reads the answer would
        otherwise keep its size alive until the kernel drops the connection.
        """
        size = 2 * len(response.body)
        if size < _TRACK_FROM:
            return response
        if self.held and self.held + size > self.max_held:
            self.refused_busy += 1
            return Response(503, "text/plain; charset=utf-8",
                            b"busy: large responses are waiting for their clients; retry\n")
        body = _HeldBody(response.body)
        self.held += size
        weakref.finalize(body, self._release, size)
        return Response(response.status, response.content_type, body)

    def _release(self, size: int) -> None:
        self.held -= size

    def health(self) -> dict[str, Any]:
        server = self.server
        hub = server.hub
        return {
            "status": "ok",
            "backend": hub.backend,
            "version": __version__,
            "clients": len(hub.clients),
            "machines": len(hub.machines),
            "events": {"accepted": hub.accepted, "relayed": hub.relayed},
            "rejects": dict(hub.rejects),
            "closed": dict(hub.closed),
            "loop_lag_ms": round(server.monitor.last_lag * 1000, 3),
            "uptime_s": round(server.uptime, 3),
            "ws_path": server.config.ws_path,
        }

    def static(self, name: str) -> Response | None:
        cached = self._static.get(name)
        if cached is not None:
            return cached
        suffix = name[name.rfind("."):] if "." in name else ""
        if not _STATIC_NAME.match(name) or suffix not in _STATIC_TYPES:
            return None
        try:
            body = resources.files("fastrelay").joinpath("static", name).read_bytes()
        except OSError:  # not there, a directory, unreadable: none of it is the client's business
            return None
        response = Response(200, _STATIC_TYPES[suffix], body)
        self._static[name] = response
        return response
