"""The WebSocket contract (DESIGN §2): snapshot, ordering, pings, pongs, refresh, bad frames."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
import websockets
from clients import PONG, connect, picows_client, recv_events, recv_json
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from waiting import until


async def test_initial_snapshot_comes_first_with_registry(relay_factory):
    relay = relay_factory.start()
    relay.emit("state_change", "m1", state="idle", data={"k": 1})
    relay.emit("state_change", "m2", state="busy")
    await relay.until_accepted(2)
    async with await connect(relay.url) as ws:
        initial = await recv_json(ws)
    assert initial["type"] == "initial"
    assert isinstance(initial["timestamp"], float)
    machines = {m["id"]: m for m in initial["machines"]}
    assert machines["m1"]["current_state"] == "idle"
    assert machines["m1"]["data"] == {"k": 1}
    assert machines["m2"]["current_state"] == "busy"
    assert machines["m2"]["last_activity"] > 0


async def test_events_relayed_in_order_with_previous_state(relay):
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        relay.emit("state_change", "w1", state="a")
        relay.emit("log", "w1", message="hello")
        relay.emit("state_change", "w1", state="b")
        relay.emit("state_change", "w1", state="c", previous_state="given")
        events = await recv_events(ws, 4)
    assert [e["type"] for e in events] == ["state_change", "log", "state_change", "state_change"]
    assert events[0]["previous_state"] is None
    assert "previous_state" not in events[1]
    assert events[2]["previous_state"] == "a"
    assert events[3]["previous_state"] == "given"
    assert events[1]["message"] == "hello"


@pytest.mark.parametrize("write_delay", ["0", "0.05"])
async def test_snapshot_then_every_later_event_once(relay_factory, write_delay):
    """Connect while events stream in: the snapshot plus what follows is exact,
    also when accepted events are still waiting for a coalesced write."""
    relay = relay_factory.start("--write-delay", write_delay)
    stop = asyncio.Event()
    sent: list[int] = []

    async def stream() -> None:
        n = 0
        while not stop.is_set():
            relay.emit("state_change", "seq", state=str(n), n=n)
            sent.append(n)
            n += 1
            if n % 20 == 0:
                await asyncio.sleep(0)

    task = asyncio.create_task(stream())
    await until(lambda: len(sent) >= 200, what="events streaming before the connect")
    ws = await connect(relay.url)
    initial = await recv_json(ws)
    after = len(sent)
    await until(lambda: len(sent) >= after + 200, what="events streaming after the initial")
    stop.set()
    await task
    total = sent[-1] + 1
    await relay.until_accepted(total)
    seen_state = {m["id"]: m["current_state"] for m in initial["machines"]}.get("seq")
    first = int(seen_state) + 1 if seen_state is not None else 0
    events = await recv_events(ws, total - first)
    await ws.close()
    assert [e["n"] for e in events] == list(range(first, total))


async def test_json_pings_and_both_pong_forms_keep_clients(relay_factory):
    relay = relay_factory.start(ping_interval=0.2)
    async with await connect(relay.url) as json_ws, await connect(relay.url) as bare_ws:
        await recv_json(json_ws)
        await recv_json(bare_ws)
        # Answered, 6 pings span 5 intervals: past the 3 after which a silent client goes.
        for _ in range(6):
            for ws, pong in ((json_ws, PONG), (bare_ws, "pong")):
                message = await recv_json(ws, 5)
                assert message["type"] == "ping"
                assert isinstance(message["timestamp"], float)
                await ws.send(pong)
        health = await relay.ahealth()
        assert health["clients"] == 2
        assert health["closed"]["unresponsive"] == 0


async def test_silent_client_closed_after_three_ping_intervals(relay_factory):
    relay = relay_factory.start(ping_interval=0.2)
    async with await connect(relay.url) as silent:
        await recv_json(silent)
        pings = 0
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                message = await recv_json(silent, 5)
                assert message["type"] == "ping", message
                pings += 1
    # Pinged and unanswered, it is closed at the ping that finds it silent for
    # three intervals: after the third ping, by the fifth (the last one may go
    # out in the same step as the close).
    assert 3 <= pings <= 5, pings
    assert silent.close_code == 1011
    await relay.until_health(lambda h: h["closed"]["unresponsive"] == 1, what="unresponsive count")


async def test_refresh_answered_with_fresh_initial(relay):
    async with await connect(relay.url) as ws:
        first = await recv_json(ws)
        assert first["machines"] == []
        relay.emit("state_change", "r1", state="on")
        assert (await recv_events(ws, 1))[0]["state"] == "on"
        await ws.send(orjson.dumps({"type": "refresh"}).decode())
        again = (await recv_events(ws, 1))[0]
    assert again["type"] == "initial"
    assert [m["current_state"] for m in again["machines"]] == ["on"]


async def test_websocket_level_ping_answered(relay):
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        pongs = [await ws.ping(payload) for payload in (b"abc", b"def")]
        # Each resolves only on a PONG carrying its own payload (websockets matches them).
        await asyncio.wait_for(asyncio.gather(*pongs), 5)
        assert all(p.done() and not p.cancelled() for p in pongs)
        # The connection stays open and in use: events still arrive on it.
        relay.emit("state_change", "pinged", state="still-open")
        assert (await recv_events(ws, 1))[0]["state"] == "still-open"
        assert ws.state is websockets.protocol.State.OPEN


async def test_garbage_frames_do_not_disturb_others(relay):
    async with await connect(relay.url) as rude, await connect(relay.url) as polite:
        await recv_json(rude)
        await recv_json(polite)
        for junk in ("not json", "[1,2]", '{"type": 5}', "\x00\xff", '{"type":"refresh"'):
            await rude.send(junk)
        await rude.send(b"\x00\x01binary\xff")
        await rude.send(orjson.dumps({"type": "unknown", "x": [1] * 1000}).decode())
        relay.emit("state_change", "g1", state="fine")
        assert (await recv_events(polite, 1))[0]["state"] == "fine"
        assert (await recv_events(rude, 1))[0]["state"] == "fine"
    assert relay.proc.poll() is None


async def test_oversized_client_frame_closes_only_that_client(relay):
    async with await connect(relay.url) as big, await connect(relay.url) as other:
        await recv_json(big)
        await recv_json(other)
        await big.send("x" * (1024 * 1024))
        with pytest.raises(websockets.ConnectionClosed):
            await recv_events(big, 1)
        relay.emit("state_change", "o1", state="still")
        assert (await recv_events(other, 1))[0]["state"] == "still"


async def test_client_close_is_cleaned_up_at_once(relay):
    ws = await connect(relay.url)
    await recv_json(ws)
    assert relay.health()["clients"] == 1
    await ws.close()
    health = await relay.until_health(lambda h: h["clients"] == 0, 10, "client removed")
    assert health["closed"]["normal"] == 1


async def test_picows_client_receives_events(relay):
    client = await picows_client(relay.url, expected=51)
    for i in range(50):
        relay.emit("tick", "p1", i=i)
    await asyncio.wait_for(client.done, 10)
    assert client.messages[0]["type"] == "initial"
    assert [m["i"] for m in client.events()] == list(range(50))
    client.transport.send(WSMsgType.TEXT, b'{"type":"refresh"}')
    await until(lambda: client.messages[-1]["type"] == "initial", what="the refresh reply")
    assert len(client.messages) == 52
    client.transport.disconnect()


async def test_send_timeout_closes_a_client_that_stops_reading(relay_factory):
    """A client whose kernel buffers are full and who never reads is aborted after
    --send-timeout, although it is far below --max-client-buffer."""
    relay = relay_factory.start("--send-timeout", "0.5", "--max-client-buffer", "64MiB")
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ws = await websockets.connect(relay.url, sock=sock, ping_interval=None, max_size=None)
    ws.transport.pause_reading()  # stop reading: the relay's sends can no longer complete
    payload = "x" * 30000
    for i in range(400):  # ~12 MB: more than the kernel buffers hold
        relay.emit("bulk", "t1", i=i, payload=payload)
    health = await relay.until_health(lambda h: h["closed"]["timeout"] == 1, 10, "timeout close")
    assert health["clients"] == 0
    ws.transport.abort()


class _Order(WSListener):  # type: ignore[misc]
    """Records what arrives, in order: event payloads' ``type``, and "PONG" for PONG frames."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.PONG:
            self.seen.append("PONG")
        elif frame.msg_type is WSMsgType.TEXT:
            kind = orjson.loads(frame.get_payload_as_bytes())["type"]
            if kind != "ping":
                self.seen.append(kind)


async def test_write_delay_coalesces_bursts_but_not_sparse_events(relay_factory):
    relay = relay_factory.start("--write-delay", "0.5")
    _, client = await ws_connect(_Order, relay.url)
    await until(lambda: client.seen == ["initial"], what="the initial")
    # After a quiet spell an event goes out in the step that accepted it. The
    # relay answers a PING as soon as it reads it, so a PING sent once the event
    # was accepted comes back after the event if that was written at once, and
    # before it if it were held for the 0.5 s window.
    relay.emit("sparse", "sparse")
    await relay.until_accepted(1)
    client.transport.send_ping(b"after-sparse")
    await until(lambda: "PONG" in client.seen, what="the PONG")
    assert client.seen == ["initial", "sparse", "PONG"]
    for i in range(20):  # within the window of the previous write: coalesced
        relay.emit("tick", "burst", i=i)
    await until(lambda: client.seen.count("tick") == 20, what="the burst")
    client.transport.disconnect()
    metrics = relay.get("/metrics")[1].decode()
    # Two writes carried the 21 events: the sparse one, then the whole burst.
    assert "fastrelay_batch_size_count 2.0" in metrics
