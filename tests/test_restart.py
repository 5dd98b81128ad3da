"""Issue 11's acceptance test: a relay restart loses nothing end to end.

An emitter process with the default ``hold`` emits 1,500 events at about 500/s
straight through a SIGTERM and restart of the relay on the same --state-dir,
socket and port; a Subscriber that resumes across the restart gets all of
them exactly once, in order, in one epoch. After a SIGKILL the relay cannot
vouch for what it lost: a new epoch and a fresh ``initial``, never a resume
over a gap.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from relayproc import Relay, RelayFactory
from waiting import until

from fastrelay import Subscriber

TOTAL = 1500

EMIT_THROUGH = textwrap.dedent("""
    import sys, time
    from fastrelay import Emitter
    e = Emitter(sys.argv[1])  # the default hold
    start = time.monotonic()
    for i in range(int(sys.argv[2])):
        e.emit("tick", "restart", n=i)
        # About 500/s, paced against the clock so a slow moment does not slow the rest.
        delay = start + (i + 1) / 500 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print("flushed" if e.flush(30) else "not flushed", e.stats(), flush=True)
""")


class Collect:
    """Everything a Subscriber yields, gathered by a task."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.subscriber:
            self.messages.append(message)

    def ticks(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "tick"]

    def initials(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "initial"]


async def _through_a_restart(relay_factory: RelayFactory, tmp_path: Path,
                             sig: int) -> tuple[Collect, Relay, subprocess.Popen[str]]:
    state = tmp_path / "state"
    relay = relay_factory.start("--state-dir", str(state), "--state-interval", "0.1")
    collect = Collect(Subscriber(relay.url, min_backoff=0.05, max_backoff=0.2))
    await until(lambda: collect.initials(), 10, "the subscriber's initial")
    emitter = subprocess.Popen([sys.executable, "-c", EMIT_THROUGH, relay.socket_path, str(TOTAL)],
                               stdout=subprocess.PIPE, text=True)
    await until(lambda: len(collect.ticks()) >= 300, 20, "300 events before the restart")
    # The registry is saved periodically: wait for a save that has the machine.
    await until(lambda: b'"restart"' in _read(state / "state.json"), 10, "a registry save")
    code = await asyncio.to_thread(relay.stop, sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    again = relay_factory.start("--state-dir", str(state), socket_path=relay.socket_path,
                                port=relay.port)
    return collect, again, emitter


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


async def test_a_clean_restart_loses_nothing_end_to_end(relay_factory, tmp_path):
    collect, relay, emitter = await _through_a_restart(relay_factory, tmp_path, signal.SIGTERM)
    try:
        out, _ = await asyncio.to_thread(emitter.communicate, timeout=60)
        assert out.startswith("flushed"), out
        await until(lambda: len(collect.ticks()) >= TOTAL, 30, f"all {TOTAL} events")
        await relay.until_health(lambda h: h["seq"] >= TOTAL, what="every event accepted")
        ticks = collect.ticks()
        assert [e["n"] for e in ticks] == list(range(TOTAL))  # all, once, in order
        assert [e["seq"] for e in ticks] == list(range(1, TOTAL + 1))
        assert len(collect.initials()) == 1  # resumed across the restart, never rebuilt
        assert collect.subscriber.epoch == collect.initials()[0]["epoch"] == relay.health()["epoch"]
        assert collect.subscriber.resumes >= 1
    finally:
        await collect.subscriber.close()


async def test_after_sigkill_a_new_epoch_and_a_fresh_initial(relay_factory, tmp_path):
    collect, relay, emitter = await _through_a_restart(relay_factory, tmp_path, signal.SIGKILL)
    try:
        first_epoch = collect.initials()[0]["epoch"]
        await asyncio.to_thread(emitter.communicate, timeout=60)
        await until(lambda: len(collect.initials()) == 2, 30, "a fresh initial")
        await until(lambda: collect.ticks() and collect.ticks()[-1]["n"] == TOTAL - 1, 30,
                    "the last event")
        rebuilt = collect.initials()[1]
        assert rebuilt["epoch"] != first_epoch and rebuilt["epoch"] == relay.health()["epoch"]
        assert [m["id"] for m in rebuilt["machines"]] == ["restart"]  # the registry came back
        after = collect.messages[collect.messages.index(rebuilt) + 1:]
        assert [e["seq"] for e in after] == list(range(rebuilt["seq"] + 1, rebuilt["seq"] + 1
                                                       + len(after)))
        ns = [e["n"] for e in after]
        assert ns == sorted(set(ns))  # in order, none twice
    finally:
        await collect.subscriber.close()
