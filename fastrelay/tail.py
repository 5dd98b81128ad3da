"""`fastrelay tail`: print each event on one readable line as it arrives.

Built on :class:`fastrelay.Subscriber`: it reconnects after a relay restart and
resumes where it left off, silently; when the relay could not resume, it says
so in one line before the fresh ``initial``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Any, TextIO

import orjson

from .subscriber import FilterRefused, Subscriber

__all__ = ["format_event", "tail"]

#: Not shown among an event's other fields: they have their own place in the line,
#: or (``seq``) are the stream's bookkeeping rather than the emitter's data.
_SHOWN_APART = frozenset({"type", "timestamp", "machine_id", "state", "previous_state", "seq"})


def format_event(event: Any) -> str:
    """One line for a relayed message: time, type, machine, state change, remaining fields."""
    if not isinstance(event, dict):
        return repr(event)
    ts = event.get("timestamp")
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "--:--:--"
    if isinstance(ts, float):
        clock += f".{int((ts % 1) * 1000):03d}"
    kind = event.get("type", "?")
    if kind == "initial":
        machines = event.get("machines") or []
        lines = [f"{clock} initial {len(machines)} machine(s)"]
        for m in machines:
            lines.append(f"    {m.get('id')}: {m.get('current_state')}")
        return "\n".join(lines)
    parts = [clock, str(kind)]
    if "machine_id" in event:
        parts.append(str(event["machine_id"]))
    if "state" in event:
        parts.append(f"{event.get('previous_state')} -> {event['state']}")
    rest = {k: v for k, v in event.items() if k not in _SHOWN_APART}
    if rest:
        parts.append(orjson.dumps(rest).decode())
    return " ".join(parts)


def _rebuilt_line(message: dict[str, Any]) -> str:
    return (f"# could not resume: events may have been missed; rebuilt from a fresh initial "
            f"(epoch {message.get('epoch')}, seq {message.get('seq')})")


async def _tail(url: str, token: str | None, machines: list[str] | None,
                types: list[str] | None, out: TextIO) -> None:
    # The subscriber reports connects, failures and disconnects on its logger:
    # shown on stderr as the comment lines they have always been.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("# %(message)s"))
    logger = logging.getLogger("fastrelay.subscriber")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    subscriber = Subscriber(url, machines=machines, types=types, token=token)

    async def follow() -> None:
        initials = 0
        async for message in subscriber:
            if message.get("type") == "initial":
                initials += 1
                if initials > 1:  # a resumed reconnect yields no initial
                    out.write(_rebuilt_line(message) + "\n")
            out.write(format_event(message) + "\n")
            out.flush()

    following = asyncio.ensure_future(follow())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await subscriber.close()
        await following  # ends once closed; re-raises what stopped it otherwise
        logger.removeHandler(handler)


def tail(url: str, *, token: str | None = None, machines: list[str] | None = None,
         types: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Follow ``url`` (only ``machines`` and ``types``, when given) until SIGINT or
    SIGTERM, reconnecting with backoff and resuming where it left off; returns the
    exit code: 0, or 2 when the relay refuses the filter."""
    try:
        asyncio.run(_tail(url, token, machines, types, out))
    except FilterRefused as exc:
        print(f"fastrelay tail: {exc}", file=sys.stderr)
        return 2
    return 0
