"""DESIGN §9 over real relays, a real redis-server and real clients: several relays, one stream.

Every test runs on both backends. Relays pointed at one Redis share one stream:
an event accepted by any relay reaches the clients of every relay in one order,
under one epoch and one seq sequence, as the same bytes; history and registry
live in Redis. Redis may vanish (killed) and come back empty: the relays keep
their clients, queue what they accept in a bounded outbox, and start a new
epoch when Redis is back. Without --broker nothing of Redis is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import orjson
import pytest
import websockets
from clients import answer_ping, connect
from relayproc import Relay, RelayFactory
from waiting import until

# redisproc is a plugin of this module (its fixtures redis_server and redis_factory):
# have its asserts rewritten like the suite's, before the import below loads it.
pytest.register_assert_rewrite("redisproc")
pytest_plugins = ["redisproc"]

from redisproc import RedisServer, free_port  # noqa: E402

#: Long enough for a relay to reconnect (its backoff is capped at about 2 s a try).
RECONNECT = 15.0


# -- helpers ---------------------------------------------------------------------------------


def _brokered(factory: RelayFactory, redis: RedisServer, *extra: str, **options: Any) -> Relay:
    return factory.start("--broker", redis.url, *extra, **options)


def _up(health: dict[str, Any]) -> bool:
    return health.get("status") == "ok" and health.get("broker") == "up"


def _down(health: dict[str, Any]) -> bool:
    return health.get("status") == "degraded" and health.get("broker") == "down"


async def _until_up(*relays: Relay, timeout: float = RECONNECT) -> None:
    for relay in relays:
        await relay.until_health(_up, timeout, f"{relay.http} to say ok/up")


async def _until_down(*relays: Relay, timeout: float = 10.0) -> None:
    for relay in relays:
        await relay.until_health(_down, timeout, f"{relay.http} to say degraded/down")


def _outbox(health: dict[str, Any]) -> int:
    return int(health["broker_stats"]["outbox_events"])


def _dropped(health: dict[str, Any]) -> int:
    return int(health["rejects"].get("broker_unavailable", 0))


def _by_id(machines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(machines, key=lambda m: m["id"])


def _api_machines(relay: Relay) -> list[dict[str, Any]]:
    status, body, _ = relay.get("/api/machines")
    assert status == 200, body
    return _by_id(orjson.loads(body))


class Reader:
    """One WebSocket client read by a task: keeps every frame but pings, raw, as it came
    (``frames``) and parsed (``messages``); answers every ping at once, so it stays
    connected however long the test waits for something else."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.frames: list[bytes] = []
        self.messages: list[dict[str, Any]] = []
        self.pings = 0
        self.closed: BaseException | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                raw = await self.ws.recv(decode=False)
                message = orjson.loads(raw)
                if message.get("type") == "ping":
                    self.pings += 1
                    await answer_ping(self.ws)
                    continue
                self.frames.append(raw)
                self.messages.append(message)
        except websockets.ConnectionClosed as exc:
            self.closed = exc

    async def wait_count(self, n: int, timeout: float = 20.0, what: str = "") -> None:
        """Until it holds ``n`` frames (pings not counted); fails at once if it was closed."""
        await until(lambda: len(self.frames) >= n or self.closed is not None, timeout,
                    what or f"{n} frames (have {len(self.frames)}: {self.messages[-3:]})")
        assert self.closed is None, f"the client was closed: {self.closed!r}; got {self.messages}"

    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] not in ("initial", "resumed")]

    async def stop(self) -> None:
        """Close the connection, reading on until it is closed (a client that stopped
        reading first would wait out the close timeout behind the frames still coming)."""
        if not self._task.done():
            await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def reading(url: str) -> AsyncIterator[Reader]:
    async with await connect(url) as ws:
        reader = Reader(ws)
        try:
            yield reader
        finally:
            await reader.stop()


async def _two_relays(factory: RelayFactory, redis: RedisServer, *extra: str,
                      **options: Any) -> tuple[Relay, Relay]:
    """Relays A and B on one Redis, both up."""
    a = _brokered(factory, redis, *extra, **options)
    b = _brokered(factory, redis, *extra, **options)
    await _until_up(a, b)
    return a, b


@contextlib.asynccontextmanager
async def reading_both(a: Relay, b: Relay) -> AsyncIterator[tuple[Reader, Reader]]:
    """A client on each relay, once each has its ``initial``."""
    async with reading(a.url) as on_a, reading(b.url) as on_b:
        await _wait_both(on_a, on_b, 1)
        yield on_a, on_b


async def _wait_both(on_a: Reader, on_b: Reader, n: int, timeout: float = 20.0) -> None:
    """Until the clients of both relays hold ``n`` frames."""
    await on_a.wait_count(n, timeout)
    await on_b.wait_count(n, timeout)


def _assert_in_emit_order(events: list[dict[str, Any]], sources: dict[str, int]) -> None:
    """Each relay's events keep the order they were emitted in (``n`` counts per ``src``)."""
    for src, count in sources.items():
        assert [e["n"] for e in events if e.get("src") == src] == list(range(count)), src


# -- one stream across relays -------------------------------------------------------------------


async def test_two_relays_deliver_every_event_in_one_order_with_one_seq(relay_factory, redis_server):
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading_both(a, b) as (on_a, on_b):
        first_a, first_b = on_a.messages[0], on_b.messages[0]
        assert first_a["type"] == first_b["type"] == "initial"
        assert first_a["epoch"] == first_b["epoch"]
        assert first_a["seq"] == first_b["seq"] == 0
        for i in range(200):  # both relays update the same machines
            a.state(f"m{i % 7}", f"a{i}", src="A", n=i)
            b.state(f"m{i % 7}", f"b{i}", src="B", n=i)
        await _wait_both(on_a, on_b, 401)
        # One more, after the 400: it comes next on both, so neither got an extra one.
        a.emit("marker")
        await _wait_both(on_a, on_b, 402)
    assert on_a.frames[1:] == on_b.frames[1:]  # byte for byte, in one order
    events = on_a.messages[1:]
    assert [e["seq"] for e in events] == list(range(1, 402))
    assert events[-1]["type"] == "marker"
    _assert_in_emit_order(events[:-1], {"A": 200, "B": 200})
    # previous_state follows the one global order, whichever relay took the event.
    last: dict[str, str] = {}
    for event in events[:-1]:
        assert event["previous_state"] == last.get(event["machine_id"]), event
        last[event["machine_id"]] = event["state"]
    health_a, health_b = a.health(), b.health()
    for health in (health_a, health_b):
        assert (health["epoch"], health["seq"]) == (first_a["epoch"], 401)
        assert health["broker_stats"]["received"] == 401
    assert health_a["broker_stats"]["published"] == 201
    assert health_b["broker_stats"]["published"] == 200
    # Clients that join now get the same snapshot on either relay.
    async with reading(a.url) as late_a, reading(b.url) as late_b:
        await late_a.wait_count(1)
        await late_b.wait_count(1)
    snap_a, snap_b = late_a.messages[0], late_b.messages[0]
    assert (snap_a["epoch"], snap_a["seq"]) == (snap_b["epoch"], snap_b["seq"]) == (first_a["epoch"], 401)
    assert _by_id(snap_a["machines"]) == _by_id(snap_b["machines"])
    assert {m["id"]: m["current_state"] for m in snap_a["machines"]} == last
    assert _api_machines(a) == _api_machines(b) == _by_id(snap_a["machines"])


async def test_an_event_without_a_timestamp_has_one_last_activity_on_every_relay(relay_factory,
                                                                                 redis_server):
    """The registry's last_activity falls back to "now" for an event without a timestamp;
    whose now is decided once, so the relays (and one that takes the registry up from
    Redis later) keep one registry, not one each."""
    a, b = await _two_relays(relay_factory, redis_server)
    a.send(b'{"type":"state_change","machine_id":"no-clock","state":"on"}')
    b.send(b'{"type":"log","machine_id":"also-no-clock","data":{"k":1}}')
    for relay in (a, b):
        await relay.until_health(lambda h: h["seq"] == 2, what=f"{relay.http} to hold seq 2")
    again = await asyncio.to_thread(_brokered, relay_factory, redis_server)
    await _until_up(again)
    on_a, on_b, on_again = _api_machines(a), _api_machines(b), _api_machines(again)
    assert [m["id"] for m in on_a] == ["also-no-clock", "no-clock"]
    assert on_a == on_b == on_again, f"A {on_a}\nB {on_b}\nC {on_again}"


async def test_a_position_read_on_one_relay_resumes_on_another(relay_factory, redis_server):
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading(a.url) as stayed:  # the reference: connected all along
        await stayed.wait_count(1)
        epoch = stayed.messages[0]["epoch"]
        async with reading(a.url) as left:
            await left.wait_count(1)
            assert left.messages[0]["epoch"] == epoch
            for i in range(30):
                (a if i % 2 else b).emit("tick", "m", n=i)
            await left.wait_count(31)
            since = left.messages[-1]["seq"]
        assert since == 30
        for i in range(30, 60):  # missed by the client that left
            (a if i % 2 else b).emit("tick", "m", n=i)
        await stayed.wait_count(61)
        await b.until_health(lambda h: h["seq"] == 60, what="relay B to hold seq 60")
        async with reading(f"{b.url}?epoch={epoch}&since={since}") as resumed:
            await resumed.wait_count(1)
            assert resumed.messages[0] == {"type": "resumed", "epoch": epoch, "since": 30, "seq": 60}
            await resumed.wait_count(31)
            a.emit("tick", "m", n=60)  # live, after the replay
            await resumed.wait_count(32)
            await stayed.wait_count(62)
    assert resumed.frames[1:] == stayed.frames[31:62]
    assert [e["seq"] for e in resumed.messages[1:]] == list(range(31, 62))
    assert b.health()["resumes"]["resumed"] == 1


async def test_a_resume_from_a_position_a_lagging_relay_has_not_reached_yet_is_still_a_resume(
        relay_factory, redis_server):
    """A position read on A can be ahead of B by the propagation delay. The seq is in
    the stream already, so B resumes the client once it has read that far rather than
    answering ``initial`` as to a position from the future. Here B lags for sure: it is
    frozen while A takes 9,000 events, and the client connects while it is frozen."""
    a, b = await _two_relays(relay_factory, redis_server)
    total = 9_000
    async with reading(a.url) as on_a:
        await on_a.wait_count(1)
        epoch = on_a.messages[0]["epoch"]
        b.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(total):
                a.emit("tick", "m", n=i)
            await on_a.wait_count(1 + total, 30)
            # The kernel takes the connection and its upgrade request while B is frozen.
            pending = asyncio.create_task(connect(f"{b.url}?epoch={epoch}&since={total}"))
            await asyncio.sleep(0)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        async with await pending as ws:
            resumed = Reader(ws)
            try:
                await resumed.wait_count(1)
                a.emit("tick", "m", n=total)
                await resumed.wait_count(2)
            finally:
                await resumed.stop()
    assert resumed.messages[0] == {"type": "resumed", "epoch": epoch, "since": total, "seq": total}, \
        resumed.messages[0]
    assert resumed.messages[1]["seq"] == total + 1


async def test_a_position_no_relay_reaches_gets_initial_after_the_wait(relay_factory, redis_server):
    """A position past anything in the stream (a client that lies, or one from before
    Redis lost data under the same epoch name) waits RESUME_AHEAD at most, then gets
    ``initial`` as any position past the last; the relay's other clients never wait."""
    a = _brokered(relay_factory, redis_server)
    await _until_up(a)
    async with reading(a.url) as first:
        await first.wait_count(1)
        epoch = first.messages[0]["epoch"]
        async with reading(f"{a.url}?epoch={epoch}&since=1000000") as waiting, \
                reading(a.url) as other:
            await other.wait_count(1)
            a.state("m1", "on")
            await other.wait_count(2)
            await waiting.wait_count(1, 10)
    assert waiting.messages[0]["type"] == "initial" and waiting.messages[0]["seq"] == 1
    assert a.health()["resumes"]["out_of_range"] == 1


EMIT_STEADILY = textwrap.dedent("""
    import sys, time
    from fastrelay import Emitter
    e = Emitter(sys.argv[1])
    for i in range(int(sys.argv[2])):
        e.emit("tick", "flow", src=sys.argv[3], n=i)
        time.sleep(0.0005)
    e.flush(10)
""")


async def test_a_client_hopping_between_relays_while_events_flow_misses_none(relay_factory, redis_server):
    """Emitters send into both relays; a client reads a while from one relay, leaves,
    resumes on the other, and so on: every hop is a ``resumed``, and what it got in all
    is the stream, contiguous from seq 1, none missing, none twice."""
    a, b = await _two_relays(relay_factory, redis_server)
    each = 1500
    async with reading(a.url) as first:
        await first.wait_count(1)
    epoch = first.messages[0]["epoch"]
    emitters = [subprocess.Popen([sys.executable, "-c", EMIT_STEADILY, relay.socket_path, str(each), src])
                for relay, src in ((a, "A"), (b, "B"))]
    try:
        last, hops, seqs = 0, 0, []
        while last < 2 * each:
            relay = (a, b)[hops % 2]
            async with reading(f"{relay.url}?epoch={epoch}&since={last}") as client:
                await client.wait_count(1)
                head = client.messages[0]
                assert head["type"] == "resumed" and head["since"] == last, (hops, relay.http, head)
                await client.wait_count(1 + min(97, 2 * each - last), 30)
            for event in client.messages[1:]:
                seqs.append(event["seq"])
                last = event["seq"]
            hops += 1
        assert seqs == list(range(1, 2 * each + 1))
        assert hops > 10
    finally:
        for emitter in emitters:
            assert emitter.wait(60) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
async def test_a_relay_started_anew_takes_registry_and_history_from_redis(relay_factory, redis_server,
                                                                          sig):
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading(a.url) as stayed:
        await stayed.wait_count(1)
        epoch = stayed.messages[0]["epoch"]
        async with reading(b.url) as on_b:
            for i in range(20):
                (a if i % 2 else b).state(f"m{i % 4}", f"s{i}", n=i)
            await on_b.wait_count(21)
            since = on_b.messages[10]["seq"]  # a position read on B before it stops
        assert since == 10
        # Its registry and history are Redis': even a SIGKILL loses nothing of them.
        assert await asyncio.to_thread(b.stop, sig) == (0 if sig == signal.SIGTERM else -sig)
        for i in range(20, 50):  # B is gone: only A takes these
            a.state(f"m{i % 6}", f"s{i}", n=i)
        await stayed.wait_count(51)
        again = await asyncio.to_thread(_brokered, relay_factory, redis_server)
        await _until_up(again)
        async with reading(again.url) as fresh:
            await fresh.wait_count(1)
        initial = fresh.messages[0]
        health_a = await a.ahealth()
        assert initial["type"] == "initial"
        assert (initial["epoch"], initial["seq"]) == (health_a["epoch"], health_a["seq"]) == (epoch, 50)
        assert _by_id(initial["machines"]) == _api_machines(a) == _api_machines(again)
        registry = {m["id"]: m["current_state"] for m in initial["machines"]}
        assert registry == {"m0": "s48", "m1": "s49", "m2": "s44", "m3": "s45", "m4": "s46",
                            "m5": "s47"}
        async with reading(f"{again.url}?epoch={epoch}&since={since}") as resumed:
            await resumed.wait_count(1)
            assert resumed.messages[0] == {"type": "resumed", "epoch": epoch, "since": 10, "seq": 50}
            await resumed.wait_count(41)
            assert resumed.frames[1:] == stayed.frames[11:51]
            again.state("m0", "live")  # through the new relay: its registry came from Redis
            await resumed.wait_count(42)
            await stayed.wait_count(52)
    assert resumed.frames[-1] == stayed.frames[51]
    live = resumed.messages[-1]
    assert (live["seq"], live["machine_id"], live["previous_state"]) == (51, "m0", "s48")


async def test_streams_of_other_names_on_one_redis_are_apart(relay_factory, redis_server):
    one = _brokered(relay_factory, redis_server, "--broker-stream", "one")
    two = _brokered(relay_factory, redis_server, "--broker-stream", "two")
    await _until_up(one, two)
    async with reading(one.url) as on_one, reading(two.url) as on_two:
        await on_one.wait_count(1)
        await on_two.wait_count(1)
        one.emit("tick", "m", src="one")
        await on_one.wait_count(2)
        two.emit("tick", "m", src="two")
        await on_two.wait_count(2)
        one.emit("tick", "m", src="one")
        await on_one.wait_count(3)
    # Each saw only its own stream's events, numbered from 1 in it.
    assert [(e["src"], e["seq"]) for e in on_one.messages[1:]] == [("one", 1), ("one", 2)]
    assert [(e["src"], e["seq"]) for e in on_two.messages[1:]] == [("two", 1)]


async def test_the_relays_seq_replaces_the_emitters_and_rejects_take_none(relay_factory, redis_server):
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading_both(a, b) as (on_a, on_b):
        a.send(b'{"type":"log","machine_id":"m1","seq":"mine","n":0}')
        await on_b.wait_count(2)
        b.send(b"not json")  # rejected by B: never published, takes no seq
        b.send(b'{"type":"log","machine_id":"m1","seq":-5,"n":1}')
        await _wait_both(on_a, on_b, 3)
    assert on_a.frames[1:] == on_b.frames[1:]
    assert [(e["n"], e["seq"]) for e in on_a.messages[1:]] == [(0, 1), (1, 2)]
    assert b.health()["rejects"]["invalid_json"] == 1 and a.health()["rejects"]["invalid_json"] == 0


async def test_a_filtered_client_on_one_relay_sees_the_streams_seqs(relay_factory, redis_server):
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading(a.url) as everything, reading(f"{b.url}?machines=keep*") as filtered:
        await everything.wait_count(1)
        await filtered.wait_count(1)
        for i in range(10):
            (a if i % 2 else b).state("keep-1" if i % 3 == 0 else "drop-1", f"s{i}", n=i)
        await everything.wait_count(11)
        await filtered.wait_count(5)
    wanted = [frame for frame, event in zip(everything.frames[1:], everything.messages[1:], strict=True)
              if event["machine_id"].startswith("keep")]
    assert len(wanted) == 4 and filtered.frames[1:] == wanted  # the stream's seqs, with gaps


async def test_the_history_in_redis_is_capped_by_history(relay_factory, redis_server):
    a, b = await _two_relays(relay_factory, redis_server, "--history", "5")
    async with reading(a.url) as stayed:
        await stayed.wait_count(1)
        epoch = stayed.messages[0]["epoch"]
        for i in range(20):
            (a if i % 2 else b).emit("tick", "m", n=i)
        await stayed.wait_count(21)
    await b.until_health(lambda h: h["seq"] == 20, what="relay B to hold seq 20")
    async with reading(f"{b.url}?epoch={epoch}&since=2") as too_old:
        await too_old.wait_count(1)
    assert too_old.messages[0]["type"] == "initial"
    async with reading(f"{b.url}?epoch={epoch}&since=15") as recent:
        await recent.wait_count(6)
    assert recent.messages[0] == {"type": "resumed", "epoch": epoch, "since": 15, "seq": 20}
    assert recent.frames[1:] == stayed.frames[16:21]


async def test_a_relay_the_capped_stream_left_behind_starts_its_clients_over_never_a_gap(relay_factory,
                                                                                         redis_server):
    """B is frozen while A takes far more events than the stream keeps (10,000 at least):
    when B runs again what it missed is gone from Redis, so its clients get a fresh
    ``initial`` and go on from there; never a silent gap."""
    a, b = await _two_relays(relay_factory, redis_server)
    # The stream keeps whole entries (batches of up to 1,024 events) holding its last
    # 10,000 events, and B may hold one entry it read before it froze: 25,000 more
    # events leave it behind whatever the batches were (12,000 did not, once).
    total = 25_001
    async with reading(b.url) as on_b:
        await on_b.wait_count(1)
        a.emit("tick", "m", n=0)
        await on_b.wait_count(2)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(1, total):
                a.emit("tick", "m", n=i)
            await a.until_health(lambda h: h["seq"] == total, 30, f"relay A at seq {total}")
        finally:
            b.proc.send_signal(signal.SIGCONT)
        await until(lambda: on_b.messages[-1].get("seq") == total or on_b.closed, 30,
                    f"relay B's client to reach seq {total}")
        assert on_b.closed is None, on_b.closed
    position = None
    for message in on_b.messages:  # each event follows the last one, or the last initial
        if message["type"] == "initial":
            position = message["seq"]
            continue
        assert message["seq"] == position + 1, (position, message)
        position = message["seq"]
    initials = [m for m in on_b.messages if m["type"] == "initial"]
    assert len(initials) == 2, [(m["epoch"], m["seq"]) for m in initials]
    assert initials[1]["epoch"] == initials[0]["epoch"] and initials[1]["seq"] > 1
    assert b.health()["broker_stats"]["resyncs"] >= 1


# -- Redis lost and back -------------------------------------------------------------------------


async def test_redis_lost_then_back_empty_starts_a_new_epoch_and_delivers_the_outbox(relay_factory,
                                                                                     redis_server):
    a, b = await _two_relays(relay_factory, redis_server, ping_interval=0.5)
    async with reading_both(a, b) as (on_a, on_b):
        old_epoch = on_a.messages[0]["epoch"]
        for i in range(3):
            a.state("m1", f"old{i}")
        await _wait_both(on_a, on_b, 4)

        redis_server.kill()
        await _until_down(a, b)
        for i in range(6):
            a.emit("tick", "ma", src="A", n=i)
        for i in range(4):
            b.emit("tick", "mb", src="B", n=i)
        down_a = await a.until_health(lambda h: _outbox(h) == 6, what="6 events in A's outbox")
        down_b = await b.until_health(lambda h: _outbox(h) == 4, what="4 events in B's outbox")
        assert down_a["broker_stats"]["outbox_bytes"] > 0 and down_b["broker_stats"]["outbox_bytes"] > 0
        # Pings go on over the same connections, and nothing else comes, while Redis is away.
        pings = on_a.pings, on_b.pings
        await until(lambda: on_a.pings >= pings[0] + 2 and on_b.pings >= pings[1] + 2,
                    10, "two more pings on each client while Redis is down")
        assert len(on_a.frames) == len(on_b.frames) == 4, (on_a.messages, on_b.messages)
        assert on_a.closed is None and on_b.closed is None

        await asyncio.to_thread(redis_server.restart)
        await _until_up(a, b)
        await _wait_both(on_a, on_b, 15)
        a.emit("marker")  # comes next on both: nothing else, nothing twice
        await _wait_both(on_a, on_b, 16)
    fresh_a, fresh_b = on_a.messages[4], on_b.messages[4]
    for fresh in (fresh_a, fresh_b):
        assert fresh["type"] == "initial", fresh
        assert fresh["epoch"] != old_epoch and fresh["seq"] == 0, fresh
    assert fresh_a["epoch"] == fresh_b["epoch"]
    assert _by_id(fresh_a["machines"]) == _by_id(fresh_b["machines"])
    assert on_a.frames[5:] == on_b.frames[5:]
    events = on_a.messages[5:]
    assert [e["seq"] for e in events] == list(range(1, 12))
    _assert_in_emit_order(events[:-1], {"A": 6, "B": 4})
    assert events[-1]["type"] == "marker"
    # The old epoch is gone with Redis' data: resuming into it rebuilds from initial.
    async with reading(f"{b.url}?epoch={old_epoch}&since=3") as late:
        await late.wait_count(1)
    assert late.messages[0]["type"] == "initial" and late.messages[0]["epoch"] == fresh_a["epoch"]
    for relay in (a, b):
        health = relay.health()
        assert (health["epoch"], health["seq"]) == (fresh_a["epoch"], 11)
        stats = health["broker_stats"]
        assert (stats["outbox_events"], stats["outbox_bytes"]) == (0, 0)
        assert stats["reconnects"] >= 1
        assert _dropped(health) == 0


async def test_redis_back_empty_with_nothing_pending_still_starts_a_new_epoch(relay_factory, redis_server):
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading_both(a, b) as (on_a, on_b):
        old_epoch = on_a.messages[0]["epoch"]
        b.state("m1", "before")
        await _wait_both(on_a, on_b, 2)
        await asyncio.to_thread(redis_server.restart)  # nothing waits in either outbox
        await _wait_both(on_a, on_b, 3, RECONNECT)
        await _until_up(a, b)
        b.state("m1", "after")
        await _wait_both(on_a, on_b, 4)
    for client in (on_a, on_b):
        fresh = client.messages[2]
        assert fresh["type"] == "initial" and fresh["epoch"] != old_epoch and fresh["seq"] == 0, fresh
    assert on_a.messages[2]["epoch"] == on_b.messages[2]["epoch"]
    assert on_a.messages[2]["machines"] == on_b.messages[2]["machines"]
    assert on_a.frames[3] == on_b.frames[3]
    assert on_a.messages[3]["seq"] == 1


async def test_redis_back_from_an_older_copy_starts_a_new_epoch_never_reuses_a_seq(
        relay_factory, redis_server):
    """A Redis with persistence that crashes comes back with its last snapshot: the
    stream is shorter than what the relays have relayed. Going on would give seqs 4..6 a
    second meaning; the relays start a new epoch instead, and clients a fresh ``initial``."""
    a, b = await _two_relays(relay_factory, redis_server)
    async with reading_both(a, b) as (on_a, on_b):
        old_epoch = on_a.messages[0]["epoch"]
        for i in range(3):
            a.state("m1", f"saved-{i}")
        await on_b.wait_count(4)
        await asyncio.to_thread(redis_server.save)  # the snapshot holds seqs 1..3
        for i in range(3):
            b.state("m1", f"lost-{i}")
        await _wait_both(on_a, on_b, 7)
        await asyncio.to_thread(redis_server.restart, keep_data=True)
        await _wait_both(on_a, on_b, 8, RECONNECT)
        await _until_up(a, b)
        a.state("m1", "after")
        await _wait_both(on_a, on_b, 9)
    for client in (on_a, on_b):
        assert [m["seq"] for m in client.messages[1:7]] == [1, 2, 3, 4, 5, 6]
        fresh = client.messages[7]
        assert fresh["type"] == "initial" and fresh["epoch"] != old_epoch, fresh
        # A new epoch begins empty: the copy's registry (seqs 1..3) is not taken up.
        assert fresh["seq"] == 0 and fresh["machines"] == [], fresh
        assert client.messages[8]["seq"] == 1 and client.messages[8]["state"] == "after"
    assert on_a.frames[7:] != [] and on_a.frames[8] == on_b.frames[8]
    assert on_a.messages[7]["epoch"] == on_b.messages[7]["epoch"]


def _runs(messages: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The stream as one client saw it: each ``initial`` with the events that follow it.
    Fails when an event does not follow the one before it (or its initial) by one seq."""
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for message in messages:
        if message["type"] == "initial":
            runs.append((message, []))
            continue
        initial, events = runs[-1]
        expected = (events[-1] if events else initial)["seq"] + 1
        assert message["seq"] == expected, (initial["epoch"], expected, message)
        events.append(message)
    return runs


async def test_redis_killed_while_events_flow_never_leaves_a_silent_gap(relay_factory, redis_server):
    """An emitter keeps sending into A while Redis is killed and comes back empty. On
    both relays' clients every event follows the one before it or a fresh ``initial``;
    in each epoch the events are the emitter's, in order, none skipped; the last one
    arrives."""
    a, b = await _two_relays(relay_factory, redis_server)
    total = 3000
    async with reading(a.url) as on_a, reading(b.url) as on_b:
        await _wait_both(on_a, on_b, 1)
        emitter = subprocess.Popen([sys.executable, "-c", EMIT_STEADILY, a.socket_path, str(total), "A"])
        try:
            await on_b.wait_count(500, 30)
            redis_server.kill()
            await a.until_health(lambda h: _outbox(h) >= 100, 20, "100 events in A's outbox")
            await asyncio.to_thread(redis_server.restart)
            await _until_up(a, b)
        finally:
            assert await asyncio.to_thread(emitter.wait, 60) == 0
        for client in (on_a, on_b):
            await until(lambda c=client: c.messages[-1].get("n") == total - 1, 30, "the last event")
    after: list[int] = []
    for client in (on_a, on_b):
        runs = _runs(client.messages)
        assert len(runs) == 2, [(initial["epoch"], initial["seq"], len(events)) for initial, events in runs]
        for _initial, events in runs:
            ns = [e["n"] for e in events]
            assert ns == list(range(ns[0], ns[0] + len(ns))), "an event skipped or repeated in an epoch"
        assert runs[0][1][0]["n"] == 0 and runs[1][0]["seq"] == 0
        after.append(len(runs[1][1]))
    # The new epoch, from its first event, is the same bytes on both relays.
    assert after[0] == after[1] and on_a.frames[-after[0]:] == on_b.frames[-after[0]:]


#: How long the backoff test watches the attempts: a backoff doubling from 0.05 s
#: reaches a 2 s cap within about 3 s; the WATCH - SETTLE s after that show the cap.
SETTLE, WATCH = 4.0, 14.0
#: The cap, 2 s, plus its 20% jitter and room for a loaded machine. A backoff that
#: kept doubling would leave a gap of 5 s or more in the window.
MAX_GAP = 3.5


async def test_reconnect_attempts_back_off_but_never_past_about_2_s(relay_factory, redis_server):
    """While Redis is away the relay retries with a backoff that grows (it does not hammer
    the port) and is capped at about 2 s (it is back soon after Redis is). The attempts
    are seen on the port itself: a listener there takes each connection and hangs up."""
    relay = _brokered(relay_factory, redis_server)
    await _until_up(relay)
    loop = asyncio.get_running_loop()
    attempts: list[float] = []

    def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(loop.time())
        writer.close()

    async with reading(relay.url) as client:
        await client.wait_count(1)
        redis_server.kill()
        listener = await asyncio.start_server(hang_up, "127.0.0.1", redis_server.port)
        start = loop.time()
        try:
            await _until_down(relay)
            # An observation window, not a wait for something: what happens on the port in it.
            await asyncio.sleep(WATCH - (loop.time() - start))
            end = loop.time()
        finally:
            listener.close()
            await listener.wait_closed()
        marks = [start + SETTLE, *(t for t in attempts if t > start + SETTLE), end]
        gaps = [round(b - a, 2) for a, b in pairwise(marks)]
        assert max(gaps) <= MAX_GAP, f"gaps between attempts after {SETTLE} s: {gaps}"
        assert len(attempts) <= 60, f"{len(attempts)} connection attempts in {WATCH} s"
        await asyncio.to_thread(redis_server.start)
        await _until_up(relay)
        relay.emit("tick", "m")
        await client.wait_count(3)  # the fresh initial, then the event
    assert client.messages[1]["type"] == "initial" and client.messages[2]["seq"] == 1


async def test_a_full_outbox_drops_and_counts_what_does_not_fit(relay_factory, redis_server):
    relay = _brokered(relay_factory, redis_server, "--broker-outbox", "5")
    await _until_up(relay)
    async with reading(relay.url) as client:
        await client.wait_count(1)
        redis_server.kill()
        await _until_down(relay)
        for i in range(8):
            relay.emit("tick", "m", n=i)
        health = await relay.until_health(lambda h: _outbox(h) + _dropped(h) >= 8,
                                          what="8 events kept or dropped")
        assert (_outbox(health), _dropped(health)) == (5, 3)
        await asyncio.to_thread(redis_server.restart)
        await _until_up(relay)
        # "up" comes with the reader; the marker must find the outbox's room again.
        await relay.until_health(lambda h: _outbox(h) == 0, what="the outbox published")
        relay.emit("marker")  # after the outbox: the next event once the 5 are delivered
        await client.wait_count(8)
    assert client.messages[1]["type"] == "initial"
    events = client.messages[2:]
    assert [e.get("n") for e in events] == [0, 1, 2, 3, 4, None]  # the first five: the rest met a full one
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6] and events[-1]["type"] == "marker"
    health = relay.health()
    assert _dropped(health) == 3 and _outbox(health) == 0
    assert relay.metric('fastrelay_events_rejected_total{reason="broker_unavailable"}') == 3


async def test_the_outbox_bytes_bound_drops_and_counts_too(relay_factory, redis_server):
    bound = 2000
    relay = _brokered(relay_factory, redis_server, "--broker-outbox-bytes", str(bound))
    await _until_up(relay)
    async with reading(relay.url) as client:
        await client.wait_count(1)
        redis_server.kill()
        await _until_down(relay)
        for i in range(10):  # each over 400 bytes: at most 4 fit
            relay.emit("tick", "m", n=i, pad="p" * 400)
        health = await relay.until_health(lambda h: _outbox(h) + _dropped(h) >= 10,
                                          what="10 events kept or dropped")
        kept = _outbox(health)
        assert 1 <= kept <= 4, health["broker_stats"]
        assert 0 < health["broker_stats"]["outbox_bytes"] <= bound
        assert _dropped(health) == 10 - kept
        await asyncio.to_thread(redis_server.restart)
        await _until_up(relay)
        # "up" comes with the reader; the marker must find the outbox's room again.
        await relay.until_health(lambda h: _outbox(h) == 0, what="the outbox published")
        relay.emit("marker")
        await client.wait_count(3 + kept)
    assert client.messages[1]["type"] == "initial"
    events = client.messages[2:]
    assert [e.get("n") for e in events] == [*range(kept), None]
    assert [e["seq"] for e in events] == list(range(1, kept + 2))
    assert _dropped(relay.health()) == 10 - kept


async def test_a_relay_started_while_redis_is_unreachable_serves_and_joins_it_later(relay_factory,
                                                                                    redis_factory):
    redis = redis_factory(free_port())  # nothing listens there yet
    relay = _brokered(relay_factory, redis)
    await _until_down(relay)
    async with reading(relay.url) as client:
        await client.wait_count(1)
        assert client.messages[0]["type"] == "initial"
        relay.emit("tick", "m", n=0)  # waits for Redis in the outbox
        await relay.until_health(lambda h: _outbox(h) == 1, what="1 event in the outbox")
        await asyncio.to_thread(redis.start)
        await _until_up(relay)
        await until(lambda: client.events(), 10, "the outbox event")
        other = await asyncio.to_thread(_brokered, relay_factory, redis)  # proof it goes through Redis
        await _until_up(other)
        async with reading(other.url) as on_other:
            await on_other.wait_count(1)
            relay.emit("tick", "m", n=1)
            other.emit("tick", "m", n=2)
            await until(lambda: len(client.events()) >= 3, 10, "three events on the first relay")
            await on_other.wait_count(3)
    events = client.events()
    assert events[0]["n"] == 0
    assert sorted(e["n"] for e in events[1:]) == [1, 2]  # two relays: either may publish first
    # The seqs follow the last initial it got before them (a fresh one, when the
    # relay joined Redis' epoch after it had served the first one).
    first_event = client.messages.index(events[0])
    last_initial = [m for m in client.messages[:first_event] if m["type"] == "initial"][-1]
    assert last_initial["epoch"] == relay.health()["epoch"] == on_other.messages[0]["epoch"]
    assert [e["seq"] for e in events] == [last_initial["seq"] + k for k in (1, 2, 3)]
    assert client.frames[-2:] == on_other.frames[1:]


async def test_a_rediss_url_is_accepted(relay_factory):
    relay = relay_factory.start("--broker", f"rediss://127.0.0.1:{free_port()}/0")
    await _until_down(relay)
    async with reading(relay.url) as client:
        await client.wait_count(1)
    assert client.messages[0]["type"] == "initial"


@pytest.mark.parametrize("args, complaint", [
    (["--broker", "http://127.0.0.1:6379/0"], "--broker"),
    (["--broker", "redis://127.0.0.1:6379/0", "--broker-outbox", "-1"], "--broker-outbox"),
    (["--broker", "redis://127.0.0.1:6379/0", "--broker-outbox-bytes", "4XB"], "--broker-outbox-bytes"),
])
def test_bad_broker_values_are_one_line_and_exit_2(relay_factory, tmp_path, args, complaint):
    result = relay_factory.run_failing("--port", "0", "--socket", relay_factory.socket_path(),
                                       "--log-dir", str(tmp_path / "logs"), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert complaint in lines[0]


# -- /healthz and /metrics -----------------------------------------------------------------------


async def test_metrics_follow_the_broker(relay_factory, redis_server):
    relay = _brokered(relay_factory, redis_server)
    await _until_up(relay)
    assert relay.metric("fastrelay_broker_up") == 1
    async with reading(relay.url) as client:
        await client.wait_count(1)
        relay.emit("tick", "m", n=0)
        await client.wait_count(2)
        assert relay.metric("fastrelay_broker_publish_seconds_count") >= 1
        assert relay.metric("fastrelay_broker_outbox_events") == 0
        assert relay.metric("fastrelay_broker_outbox_bytes") == 0
        health = relay.health()
        assert set(health["broker_stats"]) >= {"outbox_events", "outbox_bytes", "published", "received",
                                               "reconnects", "resyncs"}
        assert "broker_unavailable" in health["rejects"]
        redis_server.kill()
        await until(lambda: relay.metric("fastrelay_broker_up") == 0, 10, "fastrelay_broker_up 0")
        relay.emit("tick", "m", n=1)
        relay.emit("tick", "m", n=2)
        await until(lambda: relay.metric("fastrelay_broker_outbox_events") == 2, 10, "2 in the outbox")
        assert relay.metric("fastrelay_broker_outbox_bytes") > 0
        await asyncio.to_thread(redis_server.restart)
        await until(lambda: relay.metric("fastrelay_broker_up") == 1, RECONNECT, "fastrelay_broker_up 1")
        await client.wait_count(5)  # the fresh initial, then the two
        assert relay.metric("fastrelay_broker_outbox_events") == 0
        assert relay.metric("fastrelay_broker_outbox_bytes") == 0


# -- without --broker ----------------------------------------------------------------------------


def _mapped(relay: Relay) -> str:
    with open(f"/proc/{relay.pid}/maps") as maps:
        return maps.read()


async def test_without_broker_the_relay_loads_nothing_of_redis(relay_factory, redis_server):
    plain = relay_factory.start()
    plain.state("m", "up")
    await plain.until_accepted(1)
    health = plain.health()
    assert health["status"] == "ok"
    assert "broker" not in health and "broker_stats" not in health
    maps = _mapped(plain)
    assert "hiredis" not in maps and "redis" not in maps
    # The control: the same look sees it in a relay that has a broker.
    brokered = _brokered(relay_factory, redis_server)
    await _until_up(brokered)
    assert "hiredis" in _mapped(brokered)


IN_PROCESS = textwrap.dedent("""
    import asyncio, json, sys, urllib.request
    import fastrelay, fastrelay.server
    async def main():
        server = fastrelay.server.RelayServer(port=0, backend=sys.argv[1], socket_path=sys.argv[2],
                                              log_dir=sys.argv[3])
        await server.start()
        try:
            assert fastrelay.Emitter(server.config.socket_path).emit("state_change", "m", state="up")
            url = server.url.replace("ws://", "http://").replace("/ws/events", "/healthz")
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                health = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url).read()))
                if health["events"]["accepted"] or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.02)
        finally:
            await server.stop()
        print(json.dumps({"health": health, "modules": sorted(
            name for name in sys.modules if name.split(".")[0] in ("redis", "hiredis"))}))
    asyncio.run(main())
""")


def test_without_broker_a_relay_server_in_process_imports_no_redis(backend, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, backend, f"/tmp/frt-broker-{os.getpid()}-{backend}.sock",
         str(tmp_path / "logs")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] == []
    assert report["health"]["events"]["accepted"] == 1
    assert report["health"]["status"] == "ok" and "broker" not in report["health"]


def test_a_brokered_relay_stops_cleanly_while_redis_is_down(relay_factory, redis_server):
    relay = _brokered(relay_factory, redis_server)
    relay.wait_for(lambda: _up(relay.health()), RECONNECT, "ok/up")
    redis_server.kill()
    relay.wait_for(lambda: _down(relay.health()), 10, "degraded/down")
    relay.emit("tick", "m")
    relay.wait_for(lambda: _outbox(relay.health()) == 1, 10, "1 in the outbox")
    assert relay.stop(signal.SIGTERM, timeout=10) == 0, "\n".join(relay.output)


FLOOD = textwrap.dedent("""
    import socket, sys, time
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    payload = b'{"type":"tick","machine_id":"flood","n":0}'
    while True:
        try:
            sock.sendto(payload, sys.argv[1])
        except BlockingIOError:
            time.sleep(0.0001)
        except OSError:
            break  # the relay is gone
""")


@pytest.mark.parametrize("round_", range(3))
def test_a_brokered_relay_under_load_stops_at_once(relay_factory, redis_server, round_):
    """SIGTERM while events pour in and Redis answers: a cancel that redis-py swallows
    must not keep the relay waiting for its broker tasks (it used to hang for good)."""
    relay = _brokered(relay_factory, redis_server)
    relay.wait_for(lambda: _up(relay.health()), RECONNECT, "ok/up")
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, relay.socket_path])
    try:
        relay.wait_for(lambda: relay.health()["seq"] > 2000, 20, "events flowing")
        assert relay.stop(signal.SIGTERM, timeout=10) == 0, "\n".join(relay.output[-20:])
    finally:
        flood.kill()
        flood.wait()


def _shows_two(message: dict[str, Any]) -> bool:
    if message["type"] == "initial":
        return any(m["current_state"] == "two" for m in message["machines"])
    return bool(message.get("state") == "two")


def _redis(redis: RedisServer) -> Any:
    import redis as redis_py  # the test's own client, to write what no relay would

    return redis_py.Redis(port=redis.port)


@pytest.mark.parametrize("foreign", ["star_id", "bad_fields", "not_an_object", "bad_previous",
                                     "bad_epoch", "bad_record"])
async def test_what_no_relay_wrote_in_redis_never_reaches_clients_and_the_stream_goes_on(
        relay_factory, redis_server, foreign):
    """Someone writes into the stream's keys: a relay never sends it on (or a frame
    that is not JSON), never dies or hangs, and the stream goes on, under the same
    epoch after a fresh ``initial`` or under a new one."""
    a, b = await _two_relays(relay_factory, redis_server)
    r = _redis(redis_server)
    async with reading(a.url) as on_a, reading(b.url) as on_b:
        await _wait_both(on_a, on_b, 1)
        epoch = on_a.messages[0]["epoch"]
        a.state("m1", "one")
        await on_b.wait_count(2)
        stream = f"{{fastrelay}}:stream:{epoch}"
        if foreign == "star_id":
            r.xadd(stream, {"foo": "bar"})
        elif foreign == "bad_fields":
            r.xadd(stream, {"n": "1", "d": "x"}, id="0-2")
            r.incr("{fastrelay}:seq")
        elif foreign == "not_an_object":
            r.xadd(stream, {"n": "1", "d": "[1]", "l": "3", "p": "", "a": ""}, id="0-2")
            r.incr("{fastrelay}:seq")
        elif foreign == "bad_previous":
            r.xadd(stream, {"n": "1", "d": '{"type":"x"}', "l": "12", "p": "garbage", "a": ""},
                   id="0-2")
            r.incr("{fastrelay}:seq")
        elif foreign == "bad_epoch":
            r.set("{fastrelay}:epoch", b"\xff\xfe")
        else:
            r.hset("{fastrelay}:registry", "m1", "bad\nworse\nx\n")
        b.state("m1", "two")
        for client in (on_a, on_b):
            # As an event, or in the fresh initial of a take-up that came after it.
            await until(lambda c=client: any(_shows_two(m) for m in c.messages), 15,
                        "the event after the foreign data")
        await _until_up(a, b)
    for client in (on_a, on_b):
        assert all(m["type"] != "x" and m.get("foo") is None for m in client.messages)
        for two in (m for m in client.messages if m.get("state") == "two"):
            assert two["previous_state"] in ("one", None), two  # a new epoch begins empty
        for frame in client.frames:
            orjson.loads(frame)  # every frame is JSON
        _runs(client.messages)  # each run of events follows its initial without a gap
    r.close()
