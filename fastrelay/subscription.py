"""Subscriptions (DESIGN §8): which events and machines one client asked to see.

A client filters with ``?machines=GLOB[,GLOB...]&types=TYPE[,TYPE...]``. Globs
know ``*`` (any run of characters) and ``?`` (one character) and nothing else:
``[`` is an ordinary character, as machine ids may hold one. Types are exact.
Clients that ask for the same filter share one :class:`Subscription` (its
``key``), so the relay frames each batch once per distinct filter.

Matching stays cheap and bounded whatever a client asks: globs become one
regular expression through :func:`fnmatch.translate`, whose output cannot
backtrack exponentially, and each subscription remembers its answer for the
machine ids it has seen (a bounded cache, cleared when full).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "FilterLimits",
    "Subscription",
    "SubscriptionError",
    "subscription_request",
]

#: Machine ids whose match each subscription remembers before it starts over.
_CACHE_SIZE = 4096


class SubscriptionError(ValueError):
    """A filter the relay cannot serve; its message is the close reason a client gets."""


@dataclass(frozen=True)
class FilterLimits:
    """How much one client may ask for (``--max-filter-terms``, ``--max-filter-bytes``)."""

    #: Globs plus types in one filter.
    max_terms: int = 64
    #: UTF-8 bytes of the ``machines`` and ``types`` values together.
    max_bytes: int = 2048


class Subscription:
    """A filter on the stream: machine-id globs, event types, or both (None: any)."""

    __slots__ = ("key", "machines", "types", "_exact", "_any_machine", "_pattern", "_seen")

    def __init__(self, machines: tuple[str, ...] | None, types: tuple[str, ...] | None) -> None:
        self.machines = None if machines is None else tuple(sorted(set(machines)))
        self.types = None if types is None else frozenset(types)
        #: Equal for equal filters, however they were written: what clients share.
        self.key = (self.machines, None if types is None else tuple(sorted(set(types))))
        globs = self.machines or ()
        self._any_machine = "*" in globs
        wild = [g for g in globs if "*" in g or "?" in g]
        self._exact = frozenset(g for g in globs if g not in wild)
        self._pattern: Callable[[str], object] | None = None
        if wild and not self._any_machine:
            # fnmatch would read [...] as a character class: make [ literal first.
            alternatives = "|".join(fnmatch.translate(g.replace("[", "[[]")) for g in wild)
            self._pattern = re.compile(alternatives).match
        self._seen: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"Subscription(machines={self.machines!r}, types={self.key[1]!r})"

    def matches(self, machine_id: object, kind: object) -> bool:
        """True when an event with this ``machine_id`` and ``type`` is for this client."""
        types = self.types
        if types is not None and kind not in types:
            return False
        if self.machines is None:
            return True
        if type(machine_id) is not str:
            # Only an explicit "*" asks for events that name no machine.
            return self._any_machine
        return self.matches_machine(machine_id)

    def matches_machine(self, machine_id: str) -> bool:
        """True when the machine ``machine_id`` is one this filter shows (any, without globs)."""
        if self.machines is None or self._any_machine:
            return True
        seen = self._seen
        known = seen.get(machine_id)
        if known is not None:
            return known
        found = machine_id in self._exact or (
            self._pattern is not None and self._pattern(machine_id) is not None)
        if len(seen) >= _CACHE_SIZE:
            seen.clear()
        seen[machine_id] = found
        return found


def subscription_request(query: Mapping[str, list[str]],
                         limits: FilterLimits = FilterLimits()) -> Subscription | None:
    """The filter a connection's query asks for; None for the whole stream.

    Raises SubscriptionError (its text says what is wrong) for a filter given
    twice, an empty term, a control character, or one over ``limits``.
    """
    if "machines" not in query and "types" not in query:
        return None
    size = 0
    terms = 0
    parsed: dict[str, tuple[str, ...] | None] = {"machines": None, "types": None}
    for name in ("machines", "types"):
        values = query.get(name)
        if values is None:
            continue
        if len(values) != 1:
            raise SubscriptionError(f"bad filter: {name} given {len(values)} times; "
                                    "give one comma-separated list")
        raw = values[0].encode("utf-8", "surrogateescape")
        try:
            # Bytes the client sent unescaped arrive as surrogate escapes.
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SubscriptionError(f"bad filter: {name} is not valid UTF-8") from None
        size += len(raw)
        if size > limits.max_bytes:
            raise SubscriptionError(f"bad filter: longer than {limits.max_bytes} bytes")
        items = tuple(value.split(","))
        terms += len(items)
        if terms > limits.max_terms:
            raise SubscriptionError(f"bad filter: more than {limits.max_terms} terms")
        for item in items:
            if not item:
                raise SubscriptionError(f"bad filter: empty term in {name}")
            if any(ord(c) < 0x20 or c == "\x7f" for c in item):
                raise SubscriptionError(f"bad filter: control character in {name}")
        parsed[name] = items
    return Subscription(parsed["machines"], parsed["types"])
