"""fastrelay.Subscriber and `fastrelay tail` on it (DESIGN §2, §7), against real relays.

The subscriber yields an ``initial`` then every event in seq order, answers
pings itself, and after a disconnect reconnects and resumes with
``?epoch=E&since=S``: no gap, no duplicate, no second ``initial`` when the
relay could resume; a fresh ``initial`` when it could not (a new epoch after
SIGKILL). Relays restart on the same port and socket path, so the
subscriber's url stays valid.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from relayproc import Relay, RelayFactory
from waiting import until

from fastrelay import Subscriber

# Reconnect promptly in tests; the backoff's shape is not what they check.
FAST = {"min_backoff": 0.02, "max_backoff": 0.3}
TOKEN = "s3cret-token"


class Reader:
    """Iterates a subscriber in a task, keeping every message it yields."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.subscriber:
            self.messages.append(message)

    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] != "initial"]

    def initials(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "initial"]

    async def until_initial(self) -> dict[str, Any]:
        """The first message, once it came: the events emitted after it are all yielded."""
        await until(lambda: self.messages, 10, "the initial")
        assert self.messages[0]["type"] == "initial", self.messages[0]
        return self.messages[0]

    async def until_events(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        await until(lambda: len(self.events()) >= n or self.task.done(), timeout, f"{n} events")
        if self.task.done():
            self.task.result()  # what ended the iteration
        return self.events()

    async def close(self) -> None:
        await self.subscriber.close()
        await asyncio.wait_for(self.task, 10)


async def restart(factory: RelayFactory, relay: Relay, sig: int, state_dir: Path,
                  *extra: str, ping_interval: float = 10.0) -> Relay:
    """Stop ``relay`` with ``sig`` and start another on its port, socket path and state dir."""
    await asyncio.to_thread(relay.stop, sig)
    return await asyncio.to_thread(
        factory.start, "--state-dir", str(state_dir), *extra, socket_path=relay.socket_path,
        port=relay.port, ping_interval=ping_interval)


async def frames_sent_at_least(relay: Relay, n: int) -> bool:
    return await asyncio.to_thread(relay.metric, "fastrelay_frames_sent_total") >= n


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


async def test_yields_initial_then_events_in_order(relay: Relay):
    relay.state("sub-0", "idle")
    await relay.until_accepted(1)
    async with Subscriber(relay.url, **FAST) as subscriber:
        reader = Reader(subscriber)
        initial = await reader.until_initial()
        assert [m["id"] for m in initial["machines"]] == ["sub-0"]
        assert initial["seq"] == 1 and isinstance(initial["epoch"], str)
        assert (subscriber.epoch, subscriber.seq) == (initial["epoch"], 1)
        for i in range(50):
            relay.emit("tick", "sub-1", n=i)
        events = await reader.until_events(50)
        assert [e["n"] for e in events] == list(range(50))
        assert seqs(events) == list(range(2, 52))
        assert subscriber.seq == 51
        assert len(reader.initials()) == 1 and subscriber.reconnects == 0
        assert all(m["type"] not in ("ping", "resumed") for m in reader.messages)
        await reader.close()
    assert subscriber.connected is False


async def test_answers_json_pings_and_stays_connected(relay_factory: RelayFactory):
    relay = relay_factory.start(ping_interval=0.2)
    # Not iterated past the initial: the pings are answered all the same.
    async with Subscriber(relay.url, **FAST) as subscriber:
        first = await asyncio.wait_for(anext(subscriber), 10)
        assert first["type"] == "initial"
        # Ten pings: a subscriber that ignored them would have been closed at the
        # third silent interval. It is the only client: frames are its initial and pings.
        await until(lambda: frames_sent_at_least(relay, 1 + 10), 20, "ten pings")
        health = await relay.ahealth()
        assert health["clients"] == 1
        assert sum(health["closed"].values()) == 0, health["closed"]
        assert subscriber.reconnects == 0 and subscriber.connected
        relay.emit("tick", "p", n=1)
        event = await asyncio.wait_for(anext(subscriber), 10)
        assert event["type"] == "tick", "a ping was yielded"


async def test_resumes_across_a_clean_restart_without_gap_or_duplicate(
        relay_factory: RelayFactory, tmp_path: Path):
    state = tmp_path / "state"
    relay = relay_factory.start("--state-dir", str(state))
    subscriber = Subscriber(relay.url, **FAST)
    reader = Reader(subscriber)
    await reader.until_initial()
    for i in range(30):
        relay.emit("tick", "r", n=i)
    await reader.until_events(30)
    epoch = subscriber.epoch

    relay = await restart(relay_factory, relay, signal.SIGTERM, state)
    # Some of these are sent before the subscriber is back, and reach it from the history.
    for i in range(30, 60):
        relay.emit("tick", "r", n=i)
    events = await reader.until_events(60)
    await until(lambda: subscriber.resumes >= 1, 10, "a resumed reconnect")
    assert [e["n"] for e in events] == list(range(60))
    assert seqs(events) == list(range(1, 61))
    assert len(reader.initials()) == 1
    assert subscriber.epoch == epoch and subscriber.seq == 60
    assert subscriber.reconnects >= 1 and subscriber.duplicates == 0
    health = await relay.ahealth()
    assert health["epoch"] == epoch and health["resumes"]["resumed"] >= 1
    await reader.close()


async def test_fresh_initial_with_new_epoch_after_sigkill(relay_factory: RelayFactory, tmp_path: Path):
    state = tmp_path / "state"
    relay = relay_factory.start("--state-dir", str(state))
    subscriber = Subscriber(relay.url, **FAST)
    reader = Reader(subscriber)
    await reader.until_initial()
    for i in range(10):
        relay.emit("tick", "k", n=i)
    await reader.until_events(10)
    old_epoch = subscriber.epoch

    relay = await restart(relay_factory, relay, signal.SIGKILL, state)
    await until(lambda: len(reader.initials()) == 2, 20, "a fresh initial after the restart")
    fresh = reader.initials()[1]
    assert fresh["epoch"] != old_epoch
    for i in range(10, 20):
        relay.emit("tick", "k", n=i)
    events = await reader.until_events(20)
    after = reader.messages[reader.messages.index(fresh) + 1:]
    assert [e["n"] for e in after] == list(range(10, 20))
    assert seqs(after) == list(range(fresh["seq"] + 1, fresh["seq"] + 11))
    assert [e["n"] for e in events[:10]] == list(range(10))
    assert subscriber.epoch == fresh["epoch"] and subscriber.reconnects >= 1
    # The failed attempts while no relay listened were told, not raised.
    assert subscriber.last_error is not None
    await reader.close()


async def test_url_query_is_kept_across_reconnects(relay_factory: RelayFactory, tmp_path: Path):
    # The relay answers 401 without the token: reconnecting at all shows the query was kept.
    state = tmp_path / "state"
    relay = relay_factory.start("--state-dir", str(state), "--token", TOKEN)
    subscriber = Subscriber(f"{relay.url}?x=1&token={TOKEN}", **FAST)
    reader = Reader(subscriber)
    await reader.until_initial()
    relay.emit("tick", "q", n=0)
    await reader.until_events(1)
    relay = await restart(relay_factory, relay, signal.SIGTERM, state, "--token", TOKEN)
    relay.emit("tick", "q", n=1)
    events = await reader.until_events(2)
    assert [e["n"] for e in events] == [0, 1]
    assert subscriber.resumes >= 1 and len(reader.initials()) == 1
    await reader.close()


async def test_token_argument_is_sent_and_a_wrong_one_is_retried_not_raised(relay_factory: RelayFactory):
    relay = relay_factory.start("--token", TOKEN)
    async with Subscriber(relay.url, token=TOKEN, **FAST) as subscriber:
        assert (await asyncio.wait_for(anext(subscriber), 10))["type"] == "initial"
    wrong = Subscriber(relay.url, token="nope", **FAST)
    reader = Reader(wrong)
    await until(lambda: wrong.last_error and "401" in wrong.last_error, 10, "a 401, logged")
    assert not reader.task.done() and reader.messages == []
    await reader.close()


async def test_url_with_epoch_and_since_starts_from_there(relay: Relay):
    for i in range(5):
        relay.emit("tick", "e", n=i)
    await relay.until_accepted(5)
    epoch = (await relay.ahealth())["epoch"]
    subscriber = Subscriber(f"{relay.url}?epoch={epoch}&since=2", **FAST)
    assert (subscriber.epoch, subscriber.seq) == (epoch, 2)
    reader = Reader(subscriber)
    relay.emit("tick", "e", n=5)
    events = await reader.until_events(4)
    assert reader.initials() == []
    assert [e["n"] for e in events] == [2, 3, 4, 5] and seqs(events) == [3, 4, 5, 6]
    await reader.close()


async def test_a_consumer_that_stops_reading_holds_a_bounded_queue_and_loses_nothing(
        relay_factory: RelayFactory):
    # The subscriber stops reading at its bound, so it also stops answering pings:
    # the relay closes it (unresponsive, or over its buffer), forgetting what it had
    # not sent yet; once the consumer drains, the subscriber resumes from the history.
    # 6 MB is more than the kernel buffers between them hold, so some must be replayed.
    relay = relay_factory.start("--max-client-buffer", "1MiB", ping_interval=0.2)
    total, bound, pad = 3000, 20, "x" * 2000
    subscriber = Subscriber(relay.url, max_queue=bound, **FAST)
    first = await asyncio.wait_for(anext(subscriber), 10)
    assert first["type"] == "initial"
    for i in range(total):
        relay.emit("tick", "b", n=i, pad=pad)
    await relay.until_accepted(total, 30)
    await relay.until_health(lambda h: sum(h["closed"].values()) >= 1, 20,
                             "the relay to close the subscriber that stopped reading")
    # At most the bound plus what one read of the socket held (16 KiB: 8 of these).
    assert subscriber.pending < bound + 40, subscriber.pending
    got = []
    while len(got) < total:
        message = await asyncio.wait_for(anext(subscriber), 20)
        assert message["type"] != "initial", "rebuilt instead of resumed"
        got.append(message)
    assert [e["n"] for e in got] == list(range(total))
    assert seqs(got) == list(range(1, total + 1))
    # The relay's close came after what it had already written, so the last events
    # can arrive before the reconnect is seen: it follows, and resumes.
    await until(lambda: subscriber.reconnects >= 1 and subscriber.resumes >= 1, 20,
                "the subscriber to reconnect and resume after the relay closed it")
    assert relay.metric("fastrelay_events_replayed_total") > 0
    await subscriber.close()


async def test_close_ends_a_waiting_iteration(relay: Relay):
    subscriber = Subscriber(relay.url, **FAST)
    reader = Reader(subscriber)
    await reader.until_initial()
    await subscriber.close()
    await asyncio.wait_for(reader.task, 10)
    assert subscriber.connected is False
    await relay.until_health(lambda h: h["clients"] == 0, 10, "the relay to see it go")


async def test_close_as_the_first_message_arrives_never_hangs(relay: Relay):
    # The initial comes in the read that completes the handshake, so the consumer
    # can have it, and close, before the connect returns: that close must hold.
    for _ in range(20):
        subscriber = Subscriber(relay.url, **FAST)
        async with subscriber:
            assert (await asyncio.wait_for(anext(subscriber), 10))["type"] == "initial"
        assert subscriber.connected is False
    await relay.until_health(lambda h: h["clients"] == 0, 10, "every subscriber gone")


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        Subscriber(min_backoff=0)
    with pytest.raises(ValueError):
        Subscriber(min_backoff=2, max_backoff=1)
    with pytest.raises(ValueError):
        Subscriber(max_queue=0)


# -- fastrelay tail ---------------------------------------------------------------------


class Tail:
    """`python -m fastrelay tail` in a subprocess, its stdout lines read by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "tail", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    async def line(self, timeout: float = 20.0) -> str:
        try:
            return await asyncio.to_thread(self.lines.get, True, timeout)
        except queue.Empty:
            raise AssertionError(f"no line from tail within {timeout} s") from None

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read()


async def test_tail_prints_a_line_per_event_and_resumes_silently(relay_factory: RelayFactory,
                                                                 tmp_path: Path):
    state = tmp_path / "state"
    relay = relay_factory.start("--state-dir", str(state), "--token", TOKEN)
    tail = Tail("--url", relay.url, "--token", TOKEN)
    try:
        assert "initial 0 machine(s)" in await tail.line()
        relay.state("t-1", "idle")
        relay.emit("job_progress", "t-1", progress=0.5)
        assert (await tail.line()).endswith("state_change t-1 None -> idle")
        assert (await tail.line()).endswith('job_progress t-1 {"progress":0.5}')

        relay = await restart(relay_factory, relay, signal.SIGTERM, state, "--token", TOKEN)
        relay.state("t-1", "running")
        # Resumed: the next line is the event, no rebuild line, no initial.
        assert (await tail.line()).endswith("state_change t-1 idle -> running")

        relay = await restart(relay_factory, relay, signal.SIGKILL, state, "--token", TOKEN)
        rebuilt = await tail.line()
        assert rebuilt.startswith("# could not resume"), rebuilt
        # The registry is the one last saved (--state-interval), so its state is not checked.
        assert "initial 1 machine(s)" in await tail.line()
        assert (await tail.line()).strip().startswith("t-1: ")
        relay.state("t-1", "done")
        assert (await tail.line()).endswith("-> done")
    finally:
        code, stderr = tail.stop()
    assert code == 0, stderr
    assert "connected to" in stderr and TOKEN not in stderr


async def test_a_rarely_matching_subscriber_resumes_across_a_restart_from_its_pings(
        relay_factory: RelayFactory, tmp_path: Path):
    state = tmp_path / "state"
    relay = relay_factory.start("--state-dir", str(state), "--history", "5", ping_interval=0.3)
    subscriber = Subscriber(relay.url, machines=["rare"], **FAST)
    reader = Reader(subscriber)
    await reader.until_initial()
    relay.emit("tick", "rare", n=0)  # seq 1
    for _ in range(20):  # 2..21, none for it: the history forgets seq 1
        relay.emit("tick", "common")
    await reader.until_events(1)
    # Its position follows the pings, which say it was sent all it takes up to 21.
    await until(lambda: subscriber._seq >= 21, 10, "a ping after seq 21")
    relay = await restart(relay_factory, relay, signal.SIGTERM, state, "--history", "5",
                          ping_interval=0.3)
    relay.emit("tick", "rare", n=1)  # 22
    events = await reader.until_events(2)
    await until(lambda: subscriber.resumes >= 1, 10, "a resumed reconnect")
    assert seqs(events) == [1, 22] and [e["n"] for e in events] == [0, 1]
    assert len(reader.initials()) == 1
    await reader.close()
