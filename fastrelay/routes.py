"""The relay's HTTP surface, routed in one place: the WebSocket endpoint, /healthz,
/api/machines, /metrics and the dashboard.

Every request on the port arrives at :meth:`Routes.route` (picows's upgrade
callback); it applies the Host/Origin policy, hands the WebSocket path to the
hub and answers everything else itself.
"""

from __future__ import annotations

import logging
import re
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, cast

import orjson
from picows import WSListener, WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from ._hubdefs import BrokerStats
from ._version import __version__
from .access import AccessPolicy, split_target
from .clients import JoinRequest
from .config import ServeConfig
from .history import parse_since, resume_request
from .logs import LogLimiter
from .subscription import FilterLimits, SubscriptionError, subscription_request
from .watchdog import LoopMonitor

if TYPE_CHECKING:
    from .hub import Hub
    from .metrics import MetricsExporter

__all__ = ["Response", "Routes"]

log = logging.getLogger("fastrelay")
#: What picows's upgrade callback may return: a listener for a WebSocket, an
#: HTTP answer, or None for 404.
Answer = WSListener | WSUpgradeResponseWithListener | None

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
    """Answers every request on the relay's port."""

    def __init__(self, hub: Hub, config: ServeConfig, monitor: LoopMonitor,
                 uptime: Callable[[], float],
                 broker_stats: Callable[[], BrokerStats] | None = None) -> None:
        self.hub = hub
        #: The broker's state (DESIGN §9), None without --broker.
        self.broker_stats = broker_stats
        self.config = config
        self.monitor = monitor
        self.uptime = uptime
        self.access = AccessPolicy.from_config(config)
        self.filter_limits = FilterLimits(config.max_filter_terms, config.max_filter_bytes)
        self._metrics: MetricsExporter | None = None
        self._static: dict[str, Response] = {}
        #: Bytes of large responses not yet read by their clients (each held
        #: twice: the body and picows's copy of it with the headers).
        self.held = 0
        self.max_held = config.max_http_buffer
        self.refused_busy = 0

    def route(self, request: WSUpgradeRequest) -> Answer:
        """picows's upgrade callback: a listener for the WebSocket path, else an HTTP answer."""
        # picows answers an exception from here with 500 and str(exc) as the
        # body (an install path, a codec complaint): answer a fixed text
        # instead, and keep the details for the log.
        try:
            path, query = split_target(request.path)
            refusal = self.access.check(path, query, request.headers)
            if refusal is not None:
                return _error(refusal.status, refusal.body, refusal.headers)
            if path == self.config.ws_path:
                return self.hub.make_listener(self.join_request(query))
            response = self.get(path, query)
            if response is None:
                return None  # picows answers 404
            if response.status != 200:
                return _error(response.status, bytes(response.body))
            return _ok(response.content_type, response.body)
        except Exception as exc:
            _log_internal_error(exc)
            return _error(500, b"internal error\n")

    def join_request(self, query: dict[str, list[str]]) -> JoinRequest:
        """What a WebSocket connection asks for: a resume, a filter (or why it cannot have it)."""
        resume = resume_request(query)
        try:
            subscription = subscription_request(query, self.filter_limits)
        except SubscriptionError as exc:
            return JoinRequest(resume, None, str(exc))
        return JoinRequest(resume, subscription)

    def get(self, path: str, query: dict[str, list[str]] | None = None) -> Response | None:
        """The response for ``path`` (with its ``query``), or None for 404."""
        query = query or {}
        if path == "/healthz":
            return Response(200, _JSON, orjson.dumps(self.health()))
        if path == "/api/machines":
            try:
                subscription = subscription_request(query, self.filter_limits)
            except SubscriptionError as exc:
                return _bad_request(str(exc))
            return self._held(Response(200, _JSON, self.hub.machines_payload(subscription)))
        if path == "/api/history":
            return self.history(query)
        if path == "/metrics":
            from .metrics import CONTENT_TYPE

            return Response(200, CONTENT_TYPE, self.metrics().render())
        if path in ("/", "/index.html"):
            return self.static("index.html")
        if path.startswith("/static/"):
            return self.static(path[len("/static/"):])
        return None

    def history(self, query: dict[str, list[str]]) -> Response:
        """GET /api/history?since=S&limit=N&machines=...&types=...: the recent events
        the relay holds, as a filter sees them (what a timeline is drawn from)."""
        hub = self.hub
        held = hub.history.max_events
        try:
            subscription = subscription_request(query, self.filter_limits)
            since = _query_int(query, "since", 0, parse_since)
            limit = _query_int(query, "limit", held, parse_since)
        except (SubscriptionError, ValueError) as exc:
            return _bad_request(str(exc))
        return self._held(Response(200, _JSON, hub.history_payload(since, min(limit, held),
                                                                   subscription)))

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

    def metrics(self) -> MetricsExporter:
        if self._metrics is None:  # prometheus_client is loaded on the first scrape
            from .metrics import MetricsExporter

            self._metrics = MetricsExporter(self.hub, self.monitor, self.broker_stats)
        return self._metrics

    def health(self) -> dict[str, object]:
        stats = self.hub.stats()
        health: dict[str, object] = {
            "status": "ok",
            "backend": stats.backend,
            "version": __version__,
            "clients": stats.clients,
            "machines": stats.machines,
            "events": {"accepted": stats.accepted, "relayed": stats.relayed},
            "rejects": dict(stats.rejects),
            "closed": dict(stats.closed),
            "epoch": stats.epoch,
            "seq": stats.seq,
            "history": {"events": stats.history_events, "bytes": stats.history_bytes,
                        "oldest_seq": stats.history_oldest_seq},
            "resumes": dict(stats.resumes),
            "filters": {"distinct": stats.filters, "clients": stats.filtered_clients},
            "owed_bytes": stats.owed_bytes,
            "owed_bytes_max": stats.owed_bytes_max,
            "max_client_buffer": stats.max_client_buffer,
            "loop_lag_ms": round(self.monitor.last_lag * 1000, 3),
            "uptime_s": round(self.uptime(), 3),
            "ws_path": self.config.ws_path,
        }
        if self.broker_stats is not None:
            broker = self.broker_stats()
            if not broker.up:
                health["status"] = "degraded"
            health["broker"] = "up" if broker.up else "down"
            health["broker_stats"] = {
                "url": broker.url, "stream": broker.stream,
                "outbox_events": broker.outbox_events, "outbox_bytes": broker.outbox_bytes,
                "published": broker.published, "received": broker.received,
                "reconnects": broker.reconnects, "resyncs": broker.resyncs,
                "publish_rtt_ms": None if broker.last_publish_seconds is None
                else round(broker.last_publish_seconds * 1000, 3),
            }
        return health

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


#: One log line per kind of routing failure per minute: a client that found a
#: way to make one cannot fill the disk by repeating it.
_INTERNAL_ERRORS = LogLimiter(interval=60.0, max_keys=16)


def _log_internal_error(exc: Exception) -> None:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    key = f"{type(exc).__name__}@{where.filename}:{where.lineno}" if where else type(exc).__name__
    if _INTERNAL_ERRORS.allow(key):
        log.error("answered 500 to an HTTP request: %s", type(exc).__name__, exc_info=exc)


def _query_int(query: dict[str, list[str]], name: str, default: int,
               parse: Callable[[str], int | None]) -> int:
    values = query.get(name)
    if values is None:
        return default
    value = parse(values[0]) if len(values) == 1 else None
    if value is None:
        raise ValueError(f"{name}: give one non-negative integer")
    return value


def _bad_request(reason: str) -> Response:
    return Response(400, "text/plain; charset=utf-8", reason.encode() + b"\n")


def _ok(content_type: str, body: bytes | bytearray) -> WSUpgradeResponseWithListener:
    # picows types the body as bytes; it only concatenates it, so a bytearray works.
    response = WSUpgradeResponse.create_ok_response(
        cast(bytes, body), {"Content-Type": content_type, "Cache-Control": "no-store"})
    return WSUpgradeResponseWithListener(response, None)


def _error(status: int, body: bytes,
           headers: dict[str, str] | None = None) -> WSUpgradeResponseWithListener:
    extra = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
    return WSUpgradeResponseWithListener(
        WSUpgradeResponse.create_error_response(status, body, extra), None)
