"""The machine registry: every machine's latest state, least recently active first.

Shared by both hub backends. It is an OrderedDict rather than a dict because
eviction takes the oldest entry: ``next(iter(dict))`` has to skip every slot
deleted since the dict last resized, which made a relay that evicts
continuously slow down the longer it ran; ``popitem(last=False)`` and
``move_to_end`` are O(1) however long it runs.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .subscription import Subscription

__all__ = ["Registry", "nesting_depth"]

log = logging.getLogger("fastrelay")
_time = time.time


def nesting_depth(value: object, limit: int) -> int:
    """How deeply arrays and objects nest in ``value``, counting stops just past ``limit``."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            children: Any = item.values()
        elif type(item) is list:
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return deepest


class Registry:
    """machine id -> entry; at most ``max_machines``, the least recently active evicted."""

    def __init__(self, max_machines: int) -> None:
        self.max_machines = max_machines
        self.machines: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.machines)

    def update(self, machine_id: str, event: dict[str, Any], at: float | None = None) -> str | None:
        """Apply ``event`` to its machine's entry; returns the state the machine had before.

        An event without a numeric ``timestamp`` was active ``at`` (now, when None).
        """
        machines = self.machines
        entry = machines.get(machine_id)
        if entry is None:
            if len(machines) >= self.max_machines:
                machines.popitem(last=False)
                self.evicted += 1
            entry = machines[machine_id] = {
                "id": machine_id,
                "current_state": None,
                "previous_state": None,
                "last_activity": None,
                "data": None,
            }
        else:
            machines.move_to_end(machine_id)
        previous: str | None = entry["current_state"]
        ts = event.get("timestamp")
        if type(ts) is not float and type(ts) is not int:
            ts = _time() if at is None else at
        entry["last_activity"] = ts
        state = event.get("state")
        if type(state) is str:
            given = event.get("previous_state", previous)
            entry["previous_state"] = given if type(given) is str else previous
            entry["current_state"] = state
        if "data" in event:
            entry["data"] = event["data"]
        return previous

    def snapshot_payload(self, epoch: str, seq: int,
                         subscription: Subscription | None = None) -> bytes:
        """The ``initial`` message: every machine's current entry (those ``subscription``
        shows), as JSON bytes, at stream position ``epoch``/``seq`` (the last event it
        reflects)."""
        return self._dumps({"type": "initial", "machines": None, "timestamp": _time(),
                            "epoch": epoch, "seq": seq}, subscription)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, least recently active first (what a saved state holds)."""
        return list(self.machines.values())

    def load(self, entries: list[dict[str, Any]]) -> int:
        """Replace the registry with saved ``entries`` (least recently active first); returns
        how many were taken. Entries that are not machine objects are skipped."""
        machines = self.machines
        machines.clear()
        for entry in entries[-self.max_machines:]:
            if type(entry) is not dict or type(entry.get("id")) is not str:
                continue
            state = entry.get("current_state")
            previous = entry.get("previous_state")
            machines[entry["id"]] = {
                "id": entry["id"],
                "current_state": state if type(state) is str else None,
                "previous_state": previous if type(previous) is str else None,
                "last_activity": entry.get("last_activity"),
                "data": entry.get("data"),
            }
        return len(machines)

    def machines_payload(self, subscription: Subscription | None = None) -> bytes:
        """The registry (the machines ``subscription`` shows) as a JSON array (GET /api/machines)."""
        return self._dumps(None, subscription)

    def _dumps(self, envelope: dict[str, Any] | None,
               subscription: Subscription | None) -> bytes:
        if subscription is None or subscription.machines is None:
            entries = list(self.machines.values())
        else:
            shows = subscription.matches_machine
            entries = [entry for machine_id, entry in self.machines.items() if shows(machine_id)]
        try:
            return _wrap(envelope, orjson.dumps(entries))
        except orjson.JSONEncodeError:
            pass
        # Intake refuses what cannot be serialised again, so this is a guard for
        # what may still slip through: such an entry loses its data, not the
        # snapshot of every other machine.
        parts = []
        for entry in entries:
            try:
                parts.append(orjson.dumps(entry))
            except orjson.JSONEncodeError:
                log.warning("machine %r: data cannot be serialised; sent as null", entry["id"])
                entry["data"] = None
                parts.append(orjson.dumps(entry))
        return _wrap(envelope, b"[" + b",".join(parts) + b"]")


def _wrap(envelope: dict[str, Any] | None, machines_json: bytes) -> bytes:
    if envelope is None:
        return machines_json
    head = orjson.dumps(envelope)
    # {"type":"initial","machines":null,"timestamp":...}: put the array in place of null.
    return head.replace(b'"machines":null', b'"machines":' + machines_json, 1)
