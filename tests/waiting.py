"""Waiting for a condition, with a deadline: the suite's only way to synchronise.

Tests never sleep for a while and hope: they poll what they wait for and fail,
naming it, when the deadline passes. A deadline is a timeout, never a claim
about speed; make it generous.

Async tests use :func:`until` (or :func:`poll`), which yields to the loop
between looks so the test's own clients keep reading and answering pings.
Sync tests use :func:`wait_for`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["poll", "until", "wait_for"]

_INTERVAL = 0.02


async def poll(predicate: Callable[[], Any], timeout: float, interval: float = _INTERVAL) -> Any:
    """Poll ``predicate`` (sync, or returning an awaitable) until truthy or ``timeout`` s
    have passed; returns its last value, falsy when it timed out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                interval: float = _INTERVAL) -> Any:
    """Like :func:`poll`, but an AssertionError naming ``what`` when it times out."""
    value = await poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value {value!r}")
    return value


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = _INTERVAL) -> Any:
    """Sync code only: poll ``predicate`` until truthy; AssertionError naming ``what``
    after ``timeout`` s. Returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value {value!r}")
        time.sleep(interval)
