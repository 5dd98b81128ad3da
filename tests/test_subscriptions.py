"""DESIGN §8 over real relays and real clients: subscriptions by machine glob and event type.

Every test runs on both backends. A filtered client gets exactly the matching
events with the stream's seqs (gaps expected, order kept), an ``initial`` of
the matching machines, resume within its filter; a filter the relay cannot
serve gets a close with a reason, never a crash; clients sharing a filter
share its frames.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.parse
from typing import Any

import orjson
import pytest
import websockets
from clients import PONG, connect, recv_events, recv_json
from netns import Loopback
from relayproc import Relay
from test_backpressure import raw_handshake, read_to_close
from waiting import until

import fastrelay


def _url(relay: Relay, query: str) -> str:
    return f"{relay.url}?{query}"


async def _collect_until(ws: Any, last_seq: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Events (pings answered) until one with seq >= ``last_seq``; a marker event
    every client's filter takes ends each test's stream."""
    got: list[dict[str, Any]] = []
    while not got or got[-1].get("seq", 0) < last_seq:
        got += await recv_events(ws, 1, timeout=timeout)
    return got


def _marker(relay: Relay, machine_id: str = "zz-marker") -> None:
    relay.emit("marker", machine_id)


async def _closed_with(ws: Any) -> tuple[int | None, str]:
    """Read until the relay closes; its close code and reason."""
    try:
        while True:
            message = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert message["type"] == "ping", f"a refused client got {message}"
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None
        return closed.rcvd.code, closed.rcvd.reason
    return None, ""


# ---------------------------------------------------------------- what matches


async def test_machine_globs_select_events_and_the_initial(relay):
    for machine in ("web-1", "web-22", "db-1", "x[1]", "x1"):
        relay.state(machine, "up")
    await relay.until_accepted(5)
    async with await connect(_url(relay, "machines=web-*,db-?,x[1]")) as ws:
        initial = await recv_json(ws)
        assert initial["type"] == "initial" and initial["seq"] == 5
        assert sorted(m["id"] for m in initial["machines"]) == ["db-1", "web-1", "web-22", "x[1]"]
        for machine in ("web-3", "db-12", "db-2", "x1", "x[1]", "webby"):
            relay.state(machine, "busy")
        relay.emit("log", message="no machine")  # only a filter with "*" takes it
        relay.state("web-1", "done")
        events = await _collect_until(ws, 13)
    assert [(e["machine_id"], e["seq"]) for e in events] == [
        ("web-3", 6), ("db-2", 8), ("x[1]", 10), ("web-1", 13)]
    assert events[-1]["previous_state"] == "up"  # the stream's registry, not the filter's


async def test_types_select_events_but_the_initial_lists_every_machine(relay):
    relay.state("a", "up")
    relay.state("b", "up")
    await relay.until_accepted(2)
    async with await connect(_url(relay, "types=alert,marker")) as ws:
        initial = await recv_json(ws)
        assert sorted(m["id"] for m in initial["machines"]) == ["a", "b"]
        relay.emit("alert", "a", level=1)
        relay.state("a", "down")
        relay.emit("alert", level=2)  # no machine_id: a types-only filter takes any machine
        relay.emit("alerts", "b")  # exact types, no prefixes
        _marker(relay)
        events = await _collect_until(ws, 7)
    assert [(e["type"], e["seq"]) for e in events] == [("alert", 3), ("alert", 5), ("marker", 7)]


async def test_machines_and_types_together_take_what_matches_both(relay):
    async with await connect(_url(relay, "machines=web-*,zz-*&types=state_change,marker")) as ws:
        await recv_json(ws)
        relay.state("web-1", "a")  # 1 yes
        relay.emit("log", "web-1")  # 2 wrong type
        relay.state("db-1", "a")  # 3 wrong machine
        relay.emit("state_change", state="x")  # 4 no machine, no "*"
        relay.state("web-2", "b")  # 5 yes
        _marker(relay)  # 6
        events = await _collect_until(ws, 6)
    assert [e["seq"] for e in events] == [1, 5, 6]


async def test_events_without_a_machine_match_only_a_filter_with_star(relay):
    async with await connect(_url(relay, "machines=*")) as star, \
            await connect(_url(relay, "machines=web-*,zz-*")) as globbed:
        await recv_json(star)
        await recv_json(globbed)
        relay.emit("note")  # 1
        relay.send(b'{"type":"note","machine_id":42}')  # 2: not a string id
        relay.state("web-1", "a")  # 3
        _marker(relay)  # 4
        assert [e["seq"] for e in await _collect_until(star, 4)] == [1, 2, 3, 4]
        assert [e["seq"] for e in await _collect_until(globbed, 4)] == [3, 4]


async def test_many_clients_with_distinct_filters_each_get_exactly_their_events(relay):
    filters = [
        ("", None, None),
        ("machines=g0-*", ("g0-",), None),
        ("machines=g1-*,g2-*", ("g1-", "g2-"), None),
        ("types=t1", None, ("t1",)),
        ("types=t0,t2", None, ("t0", "t2")),
        ("machines=g3-*&types=t0", ("g3-",), ("t0",)),
        ("types=t2,t0", None, ("t0", "t2")),  # the same filter as above, written otherwise
        ("machines=g?-1", None, None),  # checked by hand below
    ]
    clients = []
    for query, _, _ in filters:
        for _ in range(3):
            ws = await connect(_url(relay, query) if query else relay.url)
            await recv_json(ws)
            clients.append((query, ws))
    sent = []
    for i in range(240):
        machine, kind = f"g{i % 4}-{i % 3}", f"t{i % 3}"
        relay.emit(kind, machine, n=i)
        sent.append((i + 1, machine, kind))
    relay.emit("t0", "g3-9", last=True)  # seq 241: every filter above but g?-1 takes it...
    relay.emit("t0", "g0-1", last=True)  # seq 242: ...and this one every filter but g1/g2, g3
    sent += [(241, "g3-9", "t0"), (242, "g0-1", "t0")]

    def expected(query: str) -> list[int]:
        spec = next(f for f in filters if f[0] == query)
        if query == "machines=g?-1":
            return [seq for seq, machine, _ in sent if machine[0] == "g" and machine.endswith("-1")]
        prefixes, kinds = spec[1], spec[2]
        return [seq for seq, machine, kind in sent
                if (prefixes is None or machine.startswith(prefixes))
                and (kinds is None or kind in kinds)]

    try:
        for query, ws in clients:
            want = expected(query)
            got = await _collect_until(ws, want[-1])
            assert [e["seq"] for e in got] == want, query
            assert all(e["n"] + 1 == e["seq"] for e in got if "n" in e)
    finally:
        for _, ws in clients:
            await ws.close()
    health = relay.health()
    assert health["filters"]["distinct"] == 0 or health["clients"] == 0


async def test_clients_sharing_a_filter_share_its_frames(relay):
    clients = [await connect(_url(relay, "machines=shared-*")) for _ in range(20)]
    for ws in clients:
        await recv_json(ws)
    await relay.until_health(lambda h: h["filters"] == {"distinct": 1, "clients": 20})
    before_sent = relay.metric("fastrelay_frames_sent_total")
    before_relayed = relay.metric("fastrelay_events_relayed_total")
    for i in range(30):
        relay.emit("tick", "shared-1", n=i)
        relay.emit("tick", "other-1", n=i)  # framed for no client
    for ws in clients:
        assert len(await _collect_until(ws, 59)) == 30
    await relay.until_accepted(60)
    # Each event is built once for the feed, however many clients share it; every
    # client is delivered it.
    assert relay.metric("fastrelay_frames_sent_total") - before_sent == 30
    assert relay.metric("fastrelay_events_relayed_total") - before_relayed == 30 * 20
    assert relay.metric("fastrelay_filters") == 1
    for ws in clients:
        await ws.close()
    await relay.until_health(lambda h: h["filters"]["distinct"] == 0, what="the feed forgotten")


async def test_refresh_gets_a_filtered_initial(relay):
    relay.state("web-1", "a")
    relay.state("db-1", "a")
    await relay.until_accepted(2)
    async with await connect(_url(relay, "machines=web-*")) as ws:
        await recv_json(ws)
        relay.state("web-2", "b")
        await recv_events(ws, 1)
        await ws.send('{"type":"refresh"}')
        (refreshed,) = await recv_events(ws, 1)
    assert refreshed["type"] == "initial" and refreshed["seq"] == 3
    assert sorted(m["id"] for m in refreshed["machines"]) == ["web-1", "web-2"]


async def test_a_types_filter_snapshot_reflects_the_events_it_leaves_out(relay):
    async with await connect(_url(relay, "types=state_change")) as first:
        assert (await recv_json(first))["machines"] == []
        for i in range(5):  # they change the registry, yet this filter does not take them
            relay.emit("heartbeat", f"m{i}", state="up")
        await relay.until_accepted(5)
        async with await connect(_url(relay, "types=state_change")) as second:
            joined = await recv_json(second)
            assert (joined["seq"], sorted(m["id"] for m in joined["machines"])) == (
                5, ["m0", "m1", "m2", "m3", "m4"])
        await first.send('{"type":"refresh"}')
        refreshed = await recv_json(first)
        assert refreshed["type"] == "initial" and refreshed["seq"] == 5
        assert all(m["current_state"] == "up" for m in refreshed["machines"])


async def test_a_refresher_that_vanishes_while_it_waits_delays_no_one(relay_factory):
    relay = relay_factory.start("--max-snapshots", "1")
    for i in range(3000):
        relay.emit("tick", f"m{i}", state="s", data={"pad": "y" * 300})
    await relay.until_accepted(3000, timeout=30)
    # A client that never reads holds the one snapshot allowed on its way.
    stuck = await raw_handshake(Loopback(), relay, rcvbuf=4096)
    gone = await connect(_url(relay, "machines=m1*"))
    waiting = await connect(_url(relay, "machines=m2"))
    await recv_json(gone)
    await recv_json(waiting)
    relay.state("m1", "t")
    relay.state("m2", "t")
    await recv_events(gone, 1)
    await recv_events(waiting, 1)
    await gone.send('{"type":"refresh"}')
    await waiting.send('{"type":"refresh"}')
    gone.transport.abort()  # while its refresh waits for the snapshot slot
    await relay.until_health(lambda h: h["clients"] == 2, what="the aborted client gone")
    stuck.close()  # the slot frees: the one still waiting is served
    refreshed = await recv_events(waiting, 1, timeout=20)
    assert refreshed[0]["type"] == "initial" and [m["id"] for m in refreshed[0]["machines"]] == ["m2"]
    await waiting.close()
    assert "Traceback" not in relay.log_text() and "Exception" not in relay.log_text()


async def test_pings_reach_filtered_clients_that_match_nothing(relay_factory):
    relay = relay_factory.start(ping_interval=0.3)
    async with await connect(_url(relay, "machines=nothing-here")) as ws:
        await recv_json(ws)
        relay.emit("tick", "elsewhere")
        for _ in range(3):
            message = await recv_json(ws)
            assert message["type"] == "ping"
            await ws.send(PONG)


# ---------------------------------------------------------------------- resume


async def test_resume_with_a_filter_replays_only_the_matching_missed_events(relay):
    query = "machines=web-*,zz-*"
    async with await connect(_url(relay, query)) as ws:
        initial = await recv_json(ws)
        relay.state("web-1", "a")  # 1
        relay.state("db-1", "a")  # 2
        (seen,) = await recv_events(ws, 1)
    for i in range(10):  # 3..12 missed; web-* are the odd ones
        relay.state("web-1" if i % 2 else "db-1", f"s{i}")
    await relay.until_accepted(12)
    epoch = initial["epoch"]
    async with await connect(_url(relay, f"{query}&epoch={epoch}&since={seen['seq']}")) as ws:
        resumed = await recv_json(ws)
        assert resumed == {"type": "resumed", "epoch": epoch, "since": 1, "seq": 12}
        _marker(relay)  # 13, live
        events = await _collect_until(ws, 13)
    assert [e["seq"] for e in events] == [4, 6, 8, 10, 12, 13]


async def test_a_filtered_resume_through_a_long_history_it_barely_matches(relay_factory):
    relay = relay_factory.start("--history", "20000")
    async with await connect(_url(relay, "machines=rare")) as ws:
        epoch = (await recv_json(ws))["epoch"]
    for i in range(6000):
        relay.emit("tick", "rare" if i in (10, 5000) else "common", n=i)
    await relay.until_accepted(6000, timeout=60)
    async with await connect(_url(relay, f"machines=rare&epoch={epoch}&since=0")) as ws:
        assert (await recv_json(ws))["type"] == "resumed"
        relay.emit("tick", "rare", n=6000)
        events = await _collect_until(ws, 6001)
    assert [e["seq"] for e in events] == [11, 5001, 6001]


async def test_a_rarely_matching_filter_resumes_from_the_position_its_pings_give(relay_factory):
    relay = relay_factory.start("--history", "5", ping_interval=0.3)
    async with await connect(_url(relay, "machines=rare")) as ws:
        epoch = (await recv_json(ws))["epoch"]
        relay.emit("tick", "rare")  # 1
        for _ in range(20):  # 2..21: the history forgets seq 1
            relay.emit("tick", "common")
        assert (await recv_json(ws))["seq"] == 1
        through = 0
        while through < 21:  # the ping says every event it takes up to here was sent
            ping = await recv_json(ws)
            assert ping["type"] == "ping" and ping["epoch"] == epoch
            through = ping["through"]
            await ws.send(PONG)
    relay.emit("tick", "common")  # 22
    relay.emit("tick", "rare")  # 23
    await relay.until_accepted(23)
    async with await connect(_url(relay, f"machines=rare&epoch={epoch}&since=1")) as ws:
        assert (await recv_json(ws))["type"] == "initial"  # its last event is long forgotten
    async with await connect(_url(relay, f"machines=rare&epoch={epoch}&since={through}")) as ws:
        assert (await recv_json(ws))["type"] == "resumed"
        assert [e["seq"] for e in await recv_events(ws, 1)] == [23]


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize("query", [
    "machines=",
    "types=",
    "machines=a,,b",
    "machines=a,",
    "machines=a&machines=b",
    "machines=%01bad",
    "types=" + ",".join(f"t{i}" for i in range(65)),
    "machines=" + "x" * 2100,
    "machines=%FF",
])
async def test_a_bad_filter_is_closed_with_a_reason_and_the_relay_carries_on(relay, query):
    async with await connect(relay.url) as other:
        await recv_json(other)
        async with await connect(_url(relay, query)) as ws:
            code, reason = await _closed_with(ws)
        assert code == 1008 and reason.startswith("bad filter:"), (code, reason)
        relay.emit("tick", "m")
        assert (await recv_events(other, 1))[0]["seq"] == 1
    assert relay.health()["closed"]["filter"] == 1


async def test_filter_limits_are_configurable(relay_factory):
    relay = relay_factory.start("--max-filter-terms", "2", "--max-filter-bytes", "10")
    async with await connect(_url(relay, "machines=a,b,c")) as ws:
        code, reason = await _closed_with(ws)
        assert (code, reason) == (1008, "bad filter: more than 2 terms")
    async with await connect(_url(relay, "machines=abcdefghijk")) as ws:
        code, reason = await _closed_with(ws)
        assert (code, reason) == (1008, "bad filter: longer than 10 bytes")
    async with await connect(_url(relay, "machines=a&types=b")) as ws:
        assert (await recv_json(ws))["type"] == "initial"


async def test_distinct_filters_are_bounded_and_forgotten_when_unused(relay_factory):
    relay = relay_factory.start("--max-filters", "2")
    first = await connect(_url(relay, "machines=a"))
    second = await connect(_url(relay, "machines=b"))
    same = await connect(_url(relay, "machines=a"))  # shares the first one's feed
    for ws in (first, second, same):
        assert (await recv_json(ws))["type"] == "initial"
    async with await connect(_url(relay, "machines=c")) as third:
        code, reason = await _closed_with(third)
        assert (code, reason) == (1013, "too many distinct filters")
    async with await connect(relay.url) as unfiltered:  # the whole stream is no filter
        assert (await recv_json(unfiltered))["type"] == "initial"
    await second.close()
    await relay.until_health(lambda h: h["filters"]["distinct"] == 1)
    async with await connect(_url(relay, "machines=c")) as third:
        assert (await recv_json(third))["type"] == "initial"
    await first.close()
    await same.close()


async def test_a_filtered_client_that_never_reads_is_closed_the_others_carry_on(relay_factory):
    relay = relay_factory.start("--max-client-buffer", "64KiB")
    stuck = await raw_handshake(Loopback(), relay, rcvbuf=4096, target="/ws/events?machines=m-*")
    async with await connect(_url(relay, "machines=m-*")) as reader:
        await recv_json(reader)
        seqs: list[int] = []

        async def read() -> None:
            while True:
                seqs.extend(e["seq"] for e in await recv_events(reader, 1, timeout=60))

        reading = asyncio.ensure_future(read())
        # More than the kernel's buffers hold (its send buffer grows to 4 MiB), in
        # steps the reader keeps up with: only the stuck client falls behind.
        total, step = 4000, 100
        try:
            for start in range(0, total, step):
                for i in range(start, start + step):
                    relay.emit("tick", "m-1", pad="p" * 3000, n=i)
                await until(lambda end=start + step: len(seqs) >= end, 30, "the reader")
        finally:
            reading.cancel()
        assert seqs == list(range(1, total + 1))
    texts, ended = await read_to_close(stuck, 30)
    stuck.close()
    assert ended == 1013  # told why, once it reads
    assert texts[0].startswith(b'{"type":"initial"')
    assert relay.health()["closed"]["slow"] == 1


# ------------------------------------------------------------------------ HTTP


async def test_history_endpoint_serves_recent_events_as_a_filter_sees_them(relay):
    for i in range(6):
        relay.state("web-1" if i % 2 else "db-1", f"s{i}")
    await relay.until_accepted(6)
    status, body, _ = relay.get("/api/history?machines=web-*")
    assert status == 200
    doc = orjson.loads(body)
    assert (doc["seq"], doc["oldest_seq"]) == (6, 1) and doc["epoch"] == relay.health()["epoch"]
    assert [e["seq"] for e in doc["events"]] == [2, 4, 6]
    assert doc["events"][0] == {"type": "state_change", "machine_id": "web-1", "state": "s1",
                                "previous_state": None, "seq": 2,
                                "timestamp": doc["events"][0]["timestamp"]}
    status, body, _ = relay.get("/api/history?since=3&limit=2")
    assert [e["seq"] for e in orjson.loads(body)["events"]] == [5, 6]
    status, body, _ = relay.get("/api/machines?machines=db-*")
    assert [m["id"] for m in orjson.loads(body)] == ["db-1"]
    for bad in ("since=x", "limit=-1", "machines=", "machines=a,,b", "since=1&since=2"):
        status, body, _ = relay.get(f"/api/history?{bad}")
        assert status == 400 and body.strip(), bad


# ---------------------------------------------------------- Subscriber and tail


async def test_subscriber_with_machines_and_types(relay):
    async with fastrelay.Subscriber(relay.url, machines=["web-*", "zz-*"],
                                    types=["state_change", "marker"]) as subscriber:
        messages = aiter(subscriber)
        initial = await asyncio.wait_for(anext(messages), 10)
        assert initial["type"] == "initial"
        relay.state("web-1", "a")
        relay.emit("log", "web-1")
        relay.state("db-1", "a")
        _marker(relay)
        got = [await asyncio.wait_for(anext(messages), 10) for _ in range(2)]
    assert [(e["machine_id"], e["seq"]) for e in got] == [("web-1", 1), ("zz-marker", 4)]


async def test_subscriber_with_a_refused_filter_ends_with_the_reason(relay):
    subscriber = fastrelay.Subscriber(relay.url, machines=["a", ""])
    try:
        with pytest.raises(fastrelay.FilterRefused, match="bad filter: empty term"):
            await asyncio.wait_for(anext(aiter(subscriber)), 20)
    finally:
        await subscriber.close()
    with pytest.raises(ValueError):
        fastrelay.Subscriber(relay.url + "?machines=a", machines=["b"])


async def test_tail_with_machines_and_types(relay):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "tail", "--url", relay.url,
         "--machines", "web-*,zz-*", "--types", "state_change,marker"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await relay.until_health(lambda h: h["clients"] >= 1, 20, "tail connected")
        relay.state("web-1", "up")
        relay.state("db-1", "up")
        relay.emit("log", "web-1")
        _marker(relay)
        await relay.until_accepted(4)
        lines: list[str] = []
        assert proc.stdout is not None
        while not any("marker" in line for line in lines):
            lines.append(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20))
    finally:
        proc.terminate()
        proc.wait(10)
    shown = [line for line in lines if not line.startswith(("#", " ")) and "initial" not in line]
    assert len(shown) == 2 and "web-1" in shown[0] and "zz-marker" in shown[1]
    bad = subprocess.run(
        [sys.executable, "-m", "fastrelay", "tail", "--url", relay.url, "--machines", "a,,b"],
        capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "bad filter: empty term" in bad.stderr


def test_query_parameters_are_percent_decoded_before_matching(relay):
    relay.state("a b/c", "up")
    relay.wait_accepted(1)
    query = urllib.parse.urlencode({"machines": "a b/*"})
    status, body, _ = relay.get(f"/api/machines?{query}")
    assert status == 200 and [m["id"] for m in orjson.loads(body)] == ["a b/c"]
