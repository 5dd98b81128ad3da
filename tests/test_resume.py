"""DESIGN §7 over real relays and real clients: seq and epoch, the history, resume, --state-dir.

Every test runs on both backends. A resume either gives exactly the missed
events (``resumed``, then S+1.., then live ones, none missing, none twice) or
a normal ``initial``; it is never an error or a close.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import orjson
import pytest
from clients import PONG, connect, recv_events, recv_json
from netns import Loopback
from relayproc import OwedWatch, Relay
from test_backpressure import raw_handshake, read_to_close
from waiting import until

KiB = 1024


def _resume_url(relay: Relay, epoch: str, since: int | str) -> str:
    return f"{relay.url}?epoch={epoch}&since={since}"


async def _events_until(ws: Any, last_seq: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Events (pings answered and skipped) until the one with ``last_seq``."""
    got: list[dict[str, Any]] = []
    while not got or got[-1].get("seq") != last_seq:
        got += await recv_events(ws, 1, timeout=timeout)
    return got


async def test_every_event_carries_the_next_seq_and_initial_the_position(relay):
    async with await connect(relay.url) as ws:
        initial = await recv_json(ws)
        assert initial["type"] == "initial" and initial["seq"] == 0
        assert isinstance(initial["epoch"], str) and initial["epoch"]
        relay.state("m1", "a")
        relay.send(b'{"type":"log","machine_id":"m1","seq":"mine","n":1}')  # the relay's seq wins
        relay.send(b'{"type":"state_change","machine_id":"m1","state":"b","seq":-5}')
        relay.send(b'not json')  # rejected: takes no seq
        relay.emit("note")
        events = await recv_events(ws, 4)
        assert [e["seq"] for e in events] == [1, 2, 3, 4]
        assert events[1]["n"] == 1
        assert events[2]["previous_state"] == "a"  # re-serialised, still gets previous_state
        await ws.send('{"type":"refresh"}')
        (refreshed,) = await recv_events(ws, 1)
        assert (refreshed["type"], refreshed["epoch"], refreshed["seq"]) == (
            "initial", initial["epoch"], 4)
    health = relay.health()
    assert (health["epoch"], health["seq"]) == (initial["epoch"], 4)
    assert health["history"]["events"] == 4 and health["history"]["oldest_seq"] == 1
    assert health["history"]["bytes"] > 0
    assert relay.metric("fastrelay_history_events") == 4
    assert relay.metric(f'fastrelay_stream_seq{{epoch="{initial["epoch"]}"}}') == 4


async def test_resume_gives_exactly_the_missed_events_then_live_ones(relay):
    async with await connect(relay.url) as ws:
        initial = await recv_json(ws)
        for i in range(5):
            relay.emit("tick", "m", n=i)
        seen = await recv_events(ws, 5)
    epoch, last = initial["epoch"], seen[-1]["seq"]
    for i in range(5, 12):  # missed while away
        relay.emit("tick", "m", n=i)
    await relay.until_accepted(12)
    async with await connect(_resume_url(relay, epoch, last)) as ws:
        resumed = await recv_json(ws)
        assert resumed == {"type": "resumed", "epoch": epoch, "since": last, "seq": 12}
        relay.emit("tick", "m", n=12)  # live, after the replay
        events = await _events_until(ws, 13)
    assert [e["seq"] for e in events] == list(range(6, 14))
    assert [e["n"] for e in events] == list(range(5, 13))
    assert relay.health()["resumes"]["resumed"] == 1
    assert relay.metric('fastrelay_resumes_total{outcome="resumed"}') == 1
    assert relay.metric("fastrelay_events_replayed_total") == 7


async def test_resume_at_the_last_seq_replays_nothing(relay):
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
    async with await connect(_resume_url(relay, epoch, 0)) as ws:
        assert await recv_json(ws) == {"type": "resumed", "epoch": epoch, "since": 0, "seq": 0}
        relay.emit("tick")
        assert [e["seq"] for e in await recv_events(ws, 1)] == [1]


EMIT_STEADILY = textwrap.dedent("""
    import sys, time
    from fastrelay import Emitter
    e = Emitter(sys.argv[1])
    for i in range(int(sys.argv[2])):
        e.emit("tick", "flow", n=i)
        time.sleep(0.0005)
    e.flush(10)
""")


async def test_resumes_while_events_flow_have_no_gap_and_no_duplicate(relay):
    """Clients reconnect again and again while an emitter keeps sending: each one's
    stream is contiguous from its ``since``, across every reconnect."""
    total = 3000
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
    emitter = subprocess.Popen([sys.executable, "-c", EMIT_STEADILY, relay.socket_path, str(total)])
    try:
        last = 0
        seqs: list[int] = []
        reconnects = 0
        while last < total:
            async with await connect(_resume_url(relay, epoch, last)) as ws:
                head = await recv_json(ws)
                assert head["type"] == "resumed" and head["since"] == last, head
                for event in await recv_events(ws, min(97, total - last), timeout=30):
                    seqs.append(event["seq"])
                    last = event["seq"]
            reconnects += 1
        assert seqs == list(range(1, total + 1))
        assert reconnects > 10
    finally:
        assert emitter.wait(60) == 0


@pytest.mark.parametrize("query", [
    "epoch=not-this-one&since=0",  # unknown epoch
    "epoch=EPOCH&since=999",  # beyond the last seq
    "epoch=EPOCH&since=1",  # too old: the history holds 3 events
    "epoch=EPOCH&since=abc",
    "epoch=EPOCH&since=-1",
    "epoch=EPOCH",
    "since=5",
    "epoch=EPOCH&epoch=EPOCH&since=9",
    "epoch=EPOCH&since=99999999999999999999999",
    "epoch=" + "x" * 100 + "&since=1",
])
async def test_a_resume_that_cannot_be_honoured_gets_a_normal_initial(relay_factory, query):
    relay = relay_factory.start("--history", "3")
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
    for i in range(10):
        relay.state("m", f"s{i}")
    await relay.until_accepted(10)
    async with await connect(f"{relay.url}?{query.replace('EPOCH', epoch)}") as ws:
        initial = await recv_json(ws)
        assert initial["type"] == "initial" and initial["epoch"] == epoch
        # A shared snapshot may be older than the connection; the events since
        # follow it (catch-up), then live ones: it stays connected.
        relay.emit("tick")
        caught_up = await recv_events(ws, 11 - initial["seq"])
        assert [e["seq"] for e in caught_up] == list(range(initial["seq"] + 1, 12))
    outcomes = relay.health()["resumes"]
    assert outcomes["resumed"] == 0 and sum(outcomes.values()) == 1


async def test_the_oldest_event_still_held_can_be_resumed_from(relay_factory):
    relay = relay_factory.start("--history", "3")
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
    for i in range(10):
        relay.emit("tick", n=i)
    await relay.until_accepted(10)
    assert relay.health()["history"]["oldest_seq"] == 8
    async with await connect(_resume_url(relay, epoch, 7)) as ws:
        assert (await recv_json(ws))["type"] == "resumed"
        assert [e["seq"] for e in await recv_events(ws, 3)] == [8, 9, 10]


@pytest.mark.parametrize("option", [("--history", "0"), ("--history-bytes", "0")])
async def test_history_off_means_every_resume_gets_initial(relay_factory, option):
    relay = relay_factory.start(*option)
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
        relay.emit("tick")
        assert (await recv_events(ws, 1))[0]["seq"] == 1  # seq stays on
    async with await connect(_resume_url(relay, epoch, 0)) as ws:
        assert (await recv_json(ws))["type"] == "initial"
    assert relay.health()["history"] == {"events": 0, "bytes": 0, "oldest_seq": None}


async def test_history_bytes_bound_the_history(relay_factory):
    relay = relay_factory.start("--history-bytes", "8KiB")
    for i in range(100):
        relay.emit("tick", pad="p" * 500, n=i)
    await relay.until_accepted(100)
    history = relay.health()["history"]
    assert 0 < history["bytes"] <= 8 * KiB
    assert history["oldest_seq"] == 100 - history["events"] + 1


async def test_a_long_replay_to_a_client_that_does_not_read_costs_at_most_its_bound(relay_factory):
    """10,000 events of history resumed by a client that reads nothing: the relay holds
    no more for it than its bound (the replay is pulled from the history as it
    reads); once it reads, it gets all of them, in order.

    The replay (~6.5 MB) is larger than the most a kernel lets one socket buffer
    (net.ipv4.tcp_wmem's maximum, 4 MiB here, which a BBR-paced connection reaches
    at once): with 2 MB the kernel took all of it and the relay never held any."""
    bound = 256 * KiB
    relay = relay_factory.start("--max-client-buffer", str(bound))
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
    for i in range(10_000):
        relay.emit("tick", "m", n=i, pad="r" * 600)
    await relay.until_accepted(10_000, timeout=30)
    link = Loopback()
    async with OwedWatch(relay) as owed:
        sock = await _raw_resume(link, relay, epoch, 0)
        await relay.until_health(lambda h: h["resumes"]["resumed"] == 1, what="the resume")
        await relay.until_health(lambda h: h["owed_bytes"] > 0, what="a stalled replay")
    # At most one piece of the replay (64 KiB of whole frames) waits in the transport.
    assert 0 < owed.worst() <= bound, owed.describe()
    texts, ended = await read_to_close_or_count(sock, 10_001)
    assert ended == "complete", ended
    assert orjson.loads(texts[0])["type"] == "resumed"
    sock.close()
    assert relay.health()["closed"]["slow"] == 0


async def _raw_resume(link: Any, relay: Relay, epoch: str, since: int) -> Any:
    """A raw socket that resumes with a small receive buffer and then reads nothing."""
    return await raw_handshake(link, relay, rcvbuf=4096,
                               target=f"/ws/events?epoch={epoch}&since={since}")


async def read_to_close_or_count(sock: Any, count: int, timeout: float = 60) -> tuple[list[bytes], str]:
    """Read text frames until ``count`` arrived: (their payloads, "complete" or how it ended)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    texts: list[bytes] = []
    deadline = loop.time() + timeout
    while len(texts) < count:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return texts, f"timeout after {len(texts)}"
        data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), remaining)
        if not data:
            return texts, f"eof after {len(texts)}"
        buf += data
        while len(buf) >= 2:
            n, head = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, head = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, head = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < head + n:
                break
            opcode, payload = buf[0] & 0x0F, bytes(buf[head:head + n])
            del buf[:head + n]
            if opcode == 1:
                message = orjson.loads(payload)
                if message.get("type") != "ping":
                    texts.append(payload)
            elif opcode == 8:
                return texts, f"close {int.from_bytes(payload[:2], 'big')} after {len(texts)}"
    seqs = [orjson.loads(t)["seq"] for t in texts[1:]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a duplicate"
    return texts, "complete"


async def test_a_replay_the_history_forgets_before_it_is_read_ends_in_1013_never_a_gap(relay_factory):
    relay = relay_factory.start("--history", "2000")
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
    for i in range(2000):  # 4 MB: more than the kernel buffers of one connection hold
        relay.emit("tick", "m", n=i, pad="f" * 2000)
    await relay.until_accepted(2000, timeout=30)
    link = Loopback()
    sock = await _raw_resume(link, relay, epoch, 0)
    await relay.until_health(lambda h: h["owed_bytes"] > 0, what="a stalled replay")
    for i in range(2000):  # the history moves on past what the client has not read
        relay.emit("tick", "m", n=2000 + i)
    await relay.until_accepted(4000, timeout=30)
    texts, ended = await read_to_close(sock, 30)
    sock.close()
    assert ended == 1013
    assert texts[0].startswith(b'{"type":"resumed"')
    # What it got before the close is contiguous from since + 1 (payloads are cut at 32
    # bytes, and every seq comes after them: count them instead).
    assert 1 < len(texts) < 4001
    assert relay.health()["closed"]["slow"] == 1


async def test_resume_with_a_token_in_the_query(relay_factory):
    relay = relay_factory.start("--token", "s3cret")
    async with await connect(f"{relay.url}?token=s3cret") as ws:
        epoch = (await recv_json(ws))["epoch"]
        relay.emit("tick")
        await recv_events(ws, 1)
    relay.emit("tick")
    async with await connect(f"{relay.url}?token=s3cret&epoch={epoch}&since=1") as ws:
        assert (await recv_json(ws))["type"] == "resumed"
        assert [e["seq"] for e in await recv_events(ws, 1)] == [2]


# -- --state-dir ---------------------------------------------------------------------------


async def test_a_clean_restart_continues_the_epoch_and_clients_resume_across_it(relay_factory,
                                                                             tmp_path):
    state = str(tmp_path / "state")
    relay = relay_factory.start("--state-dir", state)
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
        relay.state("m1", "a")
        relay.state("m2", "b")
        seen = await recv_events(ws, 2)
    relay.state("m1", "c")  # missed: the client left before it
    await relay.until_accepted(3)
    assert relay.stop(signal.SIGTERM) == 0
    assert sorted(os.listdir(state)) == ["history.bin", "state.json"]
    again = relay_factory.start("--state-dir", state, socket_path=relay.socket_path)
    assert again.health()["epoch"] == epoch and again.health()["seq"] == 3
    async with await connect(_resume_url(again, epoch, seen[-1]["seq"])) as ws:
        assert (await recv_json(ws))["type"] == "resumed"
        (missed,) = await recv_events(ws, 1)
        assert (missed["seq"], missed["machine_id"], missed["state"]) == (3, "m1", "c")
        assert missed["previous_state"] == "a"
        again.state("m2", "d")
        (live,) = await recv_events(ws, 1)
        assert (live["seq"], live["previous_state"]) == (4, "b")  # the registry came back too
    async with await connect(again.url) as ws:
        initial = await recv_json(ws)
    assert {m["id"]: m["current_state"] for m in initial["machines"]} == {"m1": "c", "m2": "d"}


async def test_after_an_unclean_stop_the_registry_returns_under_a_new_epoch(relay_factory,
                                                                            tmp_path):
    state = str(tmp_path / "state")
    relay = relay_factory.start("--state-dir", state, "--state-interval", "0.1")
    epoch = relay.health()["epoch"]
    relay.state("m1", "a")
    await relay.until_accepted(1)
    with open(os.path.join(state, "state.json"), "rb") as f:
        first = orjson.loads(f.read())
    assert first["clean"] is False  # a relay that runs is never "clean" on disk
    await until(lambda: _saved_machines(state) == {"m1": "a"}, what="the periodic save")
    assert relay.stop(signal.SIGKILL) != 0
    again = relay_factory.start("--state-dir", state, socket_path=relay.socket_path)
    health = again.health()
    assert health["epoch"] != epoch and health["seq"] == 0
    async with await connect(_resume_url(again, epoch, 1)) as ws:
        initial = await recv_json(ws)  # never a resume that could skip events
    assert initial["type"] == "initial" and initial["epoch"] == health["epoch"]
    assert [(m["id"], m["current_state"]) for m in initial["machines"]] == [("m1", "a")]


def _saved_machines(state: str) -> dict[str, Any]:
    try:
        with open(os.path.join(state, "state.json"), "rb") as f:
            saved = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {m["id"]: m["current_state"] for m in saved["machines"]}


@pytest.mark.parametrize("damage", ["garbage", "other-version", "history-mismatch", "history-cut"])
async def test_damaged_state_files_give_a_fresh_start_never_a_crash(relay_factory, tmp_path,
                                                                    damage):
    state = str(tmp_path / "state")
    relay = relay_factory.start("--state-dir", state)
    relay.state("m1", "a")
    await relay.until_accepted(1)
    epoch = relay.health()["epoch"]
    assert relay.stop(signal.SIGTERM) == 0
    state_file, history_file = os.path.join(state, "state.json"), os.path.join(state, "history.bin")
    if damage == "garbage":
        with open(state_file, "wb") as f:
            f.write(b"\x00{not json")
    elif damage == "other-version":
        with open(state_file, "wb") as f:
            f.write(b'{"version": 99}')
    elif damage == "history-mismatch":
        with open(history_file, "r+b") as f:
            f.write(b'{"version":1,"epoch":"x"')
    else:
        with open(history_file, "rb+") as f:
            f.truncate(os.path.getsize(history_file) - 3)
    again = relay_factory.start("--state-dir", state, socket_path=relay.socket_path)
    health = again.health()
    if damage.startswith("history"):
        # The position is intact, the history is not: the epoch continues and a
        # resume from before it gets initial, not a gap.
        assert (health["epoch"], health["seq"], health["history"]["events"]) == (epoch, 1, 0)
        async with await connect(_resume_url(again, epoch, 0)) as ws:
            assert (await recv_json(ws))["type"] == "initial"
    else:
        assert health["epoch"] != epoch and health["machines"] == 0
    again.state("m2", "b")
    await again.until_accepted(1)


def test_a_state_dir_that_cannot_be_written_is_a_one_line_error(relay_factory, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = relay_factory.run_failing("--port", "0", "--socket", relay_factory.socket_path(),
                                       "--log-dir", str(tmp_path / "logs"),
                                       "--state-dir", str(blocker / "state"))
    assert result.returncode == 1
    assert "--state-dir" in result.stderr and "Traceback" not in result.stderr


async def test_pings_do_not_take_seqs(relay_factory):
    relay = relay_factory.start(ping_interval=0.2)
    async with await connect(relay.url) as ws:
        epoch = (await recv_json(ws))["epoch"]
        pings = 0
        while pings < 2:
            message = await recv_json(ws)
            if message["type"] == "ping":
                pings += 1
                assert "seq" not in message
                assert (message["epoch"], message["through"]) == (epoch, 0)
                await ws.send(PONG)
        relay.emit("tick")
        assert (await recv_events(ws, 1))[0]["seq"] == 1
