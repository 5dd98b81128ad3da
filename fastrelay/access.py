"""Who may talk to the relay: the browser Origin policy and the optional shared token."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

__all__ = ["AccessPolicy", "split_target"]

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def split_target(target: bytes) -> tuple[str, dict[str, list[str]]]:
    """Split a request target like ``/ws/events?token=x`` into its path and query."""
    parts = urlsplit(target.decode("latin-1"))
    return parts.path or "/", parse_qs(parts.query)


class AccessPolicy:
    """Decides, per HTTP request, between go ahead, 401 (token) and 403 (origin).

    Origins: a request without ``Origin`` (curl, scripts, non-browser clients)
    is accepted, as are pages served by this host itself or by localhost; any
    other browser origin needs ``--allow-origin`` (``*`` allows all).
    """

    def __init__(self, allow_origins: Iterable[str] = (), token: str | None = None) -> None:
        origins = [o.rstrip("/").lower() for o in allow_origins]
        self.allow_any_origin = "*" in origins
        self.allowed_origins = frozenset(origins)
        self._token = token.encode() if token else None

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.allow_any_origin:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        if origin == "null":  # sandboxed frames and file:// pages
            return False
        netloc = urlsplit(origin).netloc
        hostname = urlsplit(origin).hostname or ""
        if host is not None and netloc == host.strip().lower():
            return True
        return hostname in _LOCAL_HOSTS

    def token_ok(self, query: dict[str, list[str]], authorization: str | None) -> bool:
        """Constant-time check of ``?token=`` or ``Authorization: Bearer``; True when none is set."""
        expected = self._token
        if expected is None:
            return True
        candidates = list(query.get("token", ()))
        if authorization and authorization[:7].lower() == "bearer ":
            candidates.append(authorization[7:].strip())
        ok = False
        for candidate in candidates:
            ok |= hmac.compare_digest(candidate.encode(), expected)
        return ok
