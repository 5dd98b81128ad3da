"""Who may talk to the relay: the Host and Origin checks, and the optional shared token.

The Host check is what stops DNS rebinding: a page on ``http://evil.com:3002``
whose name the attacker re-points at the relay's address makes requests that
the browser treats as same-origin (so it may send no ``Origin`` at all) but
whose ``Host`` header still says ``evil.com``. Only names the relay knows are
answered: loopback names, its bind name, ``--allow-host`` names, and IP address
literals (a rebinding page cannot make its Host a literal: it is always the
attacker's DNS name).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from .logs import LogLimiter, printable

if TYPE_CHECKING:
    from .config import ServeConfig

__all__ = ["AccessPolicy", "Refusal", "split_target"]

log = logging.getLogger("fastrelay")

#: Bind addresses that say nothing about the names clients use.
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Headers(Protocol):
    def getall(self, key: str, default: list[str]) -> list[str]: ...


def split_target(target: bytes) -> tuple[str, dict[str, list[str]]]:
    """Split a request target like ``/ws/events?token=x`` into its path and query.

    Bytes that are not ASCII, raw or %-escaped, survive as surrogate escapes, so
    ``value.encode("utf-8", "surrogateescape")`` gives back exactly what was sent.
    Blank values are kept: ``?machines=`` is an empty filter, not no filter.
    """
    parts = urlsplit(target.decode("ascii", "surrogateescape"))
    return parts.path or "/", parse_qs(parts.query, keep_blank_values=True, encoding="utf-8",
                                     errors="surrogateescape")


def _authority(value: str) -> tuple[str, int | None] | None:
    """(host name, port) of a Host header value; None when it is not one."""
    try:
        parts = urlsplit("//" + value)
        name, port = parts.hostname, parts.port
    except ValueError:  # bad brackets, a port that is not a number or out of range
        return None
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    # "localhost." is the same name as "localhost" (DNS root), and no different a threat.
    return name.removesuffix("."), port


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    # RFC 6761: browsers resolve *.localhost to loopback themselves, never through DNS.
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Refusal:
    """An answer that ends the request: status, short fixed body, extra headers."""

    status: int
    body: bytes
    headers: dict[str, str]


_BAD_HOST = Refusal(400, b"unknown Host: start the relay with --allow-host NAME for the name "
                         b"clients use\n", {})
_BAD_ORIGIN = Refusal(403, b"origin not allowed: start the relay with --allow-origin ORIGIN\n", {})
_NO_TOKEN = Refusal(401, b"token required: pass ?token=... or Authorization: Bearer ...\n",
                    {"WWW-Authenticate": "Bearer"})


class AccessPolicy:
    """Decides, per HTTP request, between go ahead, 400 (Host), 403 (Origin) and 401 (token).

    Host: the request's ``Host`` must name the relay (see the module docstring);
    ``--allow-host '*'`` turns the check off. Origin: a request without one
    (curl, scripts, non-browser clients) is accepted, as is an http(s) page on
    a loopback name (any port) or on the very host and port of the request;
    anything else needs ``--allow-origin`` (``*`` allows all).
    """

    def __init__(self, allow_origins: Iterable[str] = (), token: str | None = None,
                 allow_hosts: Iterable[str] = (), bind_host: str | None = None) -> None:
        origins = [o.strip().rstrip("/").lower() for o in allow_origins]
        self.allow_any_origin = "*" in origins
        self.allowed_origins = frozenset(origins)
        hosts = {h.strip().lower().removesuffix(".") for h in allow_hosts}
        self.allow_any_host = "*" in hosts
        self._host_suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        names = {h for h in hosts if not h.startswith("*")}
        if bind_host is not None and bind_host.lower() not in _WILDCARD_BINDS:
            names.add(bind_host.strip("[]").lower().removesuffix("."))
        self._host_names = frozenset(names)
        # Bytes, compared as bytes: a token or a header that is not ASCII must
        # neither crash the comparison nor match by accident of an encoding.
        self._token = token.encode("utf-8", "surrogateescape") if token else None
        #: One log line per refused Origin or Host per minute, at most 64 remembered.
        self._refusals = LogLimiter(interval=60.0, max_keys=64)

    @classmethod
    def from_config(cls, config: ServeConfig) -> AccessPolicy:
        return cls(config.allow_origins, config.token, config.allow_hosts, config.host)

    @property
    def token_required(self) -> bool:
        return self._token is not None

    # -- the checks ------------------------------------------------------------------

    def check(self, path: str, query: dict[str, list[str]], headers: _Headers) -> Refusal | None:
        """None when the request may go ahead, else the answer to send. Never raises."""
        hosts = headers.getall("Host", [])
        host = hosts[0] if len(hosts) == 1 else None  # RFC 9112: none or several is a 400
        if not self.host_allowed(host):
            if host is None:
                self._log_refusal("no Host header, or several", None, None)
            else:
                self._log_refusal(f"Host {printable(host)}", "--allow-host", _host_flag_value(host))
            return _BAD_HOST
        origins = headers.getall("Origin", [])
        if len(origins) > 1 or not self.origin_allowed(origins[0] if origins else None, host):
            if len(origins) > 1:
                self._log_refusal("several Origin headers", None, None)
            else:
                self._log_refusal(f"Origin {printable(origins[0])}", "--allow-origin", origins[0])
            return _BAD_ORIGIN
        authorization = headers.getall("Authorization", [])
        if path != "/healthz" and not self.token_ok(query, authorization[0] if authorization else None):
            return _NO_TOKEN
        return None

    def host_allowed(self, host: str | None) -> bool:
        """Whether a Host header value names this relay."""
        if self.allow_any_host:
            return True
        if host is None:
            return False
        authority = _authority(host.strip().lower())
        if authority is None:
            return False
        name = authority[0]
        return (_is_ip_literal(name) or _is_loopback(name) or name in self._host_names
                or name.endswith(self._host_suffixes))

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """Whether a page from ``origin`` may use a relay reached as ``host`` (already allowed)."""
        if origin is None or self.allow_any_origin:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
            name, port = parts.hostname, parts.port
        except ValueError:
            return False
        # Browsers send the page's origin, always http(s); "null" (file://,
        # sandboxed frames) and anything else must be listed explicitly.
        if parts.scheme not in _DEFAULT_PORTS or not name or parts.username is not None \
                or parts.path or parts.query or parts.fragment:
            return False
        name = name.removesuffix(".")
        if _is_loopback(name):
            return True  # a page of this machine's own, e.g. a dev server on localhost:5173
        if host is None:
            return False
        authority = _authority(host.strip().lower())
        if authority is None:
            return False
        default = _DEFAULT_PORTS[parts.scheme]
        # Same origin as the browser saw it: the host and port it sent the
        # request to. That host is known (checked first), so a rebinding
        # page, whose host is the attacker's name, never gets this far.
        return (name, port or default) == (authority[0], authority[1] or default)

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
            ok |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), expected)
        return ok

    def _log_refusal(self, what: str, flag: str | None, flag_value: str | None) -> None:
        # Without this line an operator whose page cannot connect (a file://
        # page sends Origin "null") would see nothing at all in the relay's log.
        if not self._refusals.allow(what):
            return
        hint = ""
        if flag is not None:
            hint = f": start the relay with {flag} {printable(flag_value) if flag_value else '...'} " \
                   "to allow it"
        suppressed = self._refusals.take_suppressed()
        more = f" ({suppressed} other refusals not logged)" if suppressed else ""
        log.warning("refused a request with %s%s%s", what, hint, more)


def _host_flag_value(host: str | None) -> str | None:
    """The ``--allow-host`` value that would admit ``host``, for the log line."""
    authority = _authority(host.strip().lower()) if host else None
    return authority[0] if authority else None
