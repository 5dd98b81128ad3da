"""No datagram can poison the registry: what is stored can always be sent again (issue 9, item 2)."""

from __future__ import annotations

import orjson
from clients import connect, recv_events, recv_json


def nested(depth: int, machine_id: str = "deep") -> bytes:
    """A datagram whose ``data`` nests arrays so that the whole object is ``depth`` levels deep."""
    inner = depth - 1
    return (b'{"type":"state_change","machine_id":"' + machine_id.encode()
            + b'","state":"s","data":' + b"[" * inner + b"]" * inner + b"}")


async def test_deeply_nested_datagrams_are_refused_and_snapshots_survive(relay):
    # orjson parses up to 1,024 levels but writes at most 254: before the fix
    # such a datagram was stored, and every new client got 1011, /api/machines 500.
    relay.send(nested(64, "edge"))  # the default --max-depth: still accepted
    for depth in (255, 300, 1024):
        relay.send(nested(depth))
    relay.emit("state_change", "plain", state="ok")
    await relay.until_health(lambda h: h["machines"] >= 2, what="the registry filled")

    status, body, _ = relay.get("/api/machines")
    assert status == 200, body
    assert sorted(m["id"] for m in orjson.loads(body)) == ["edge", "plain"]
    async with await connect(relay.url) as ws:
        initial = await recv_json(ws)
        assert initial["type"] == "initial"
        assert sorted(m["id"] for m in initial["machines"]) == ["edge", "plain"]
        await ws.send('{"type":"refresh"}')
        (again,) = await recv_events(ws, 1)
        assert again["type"] == "initial"
        relay.emit("state_change", "plain", state="later")
        (event,) = await recv_events(ws, 1)
        assert event["state"] == "later"
    health = relay.health()
    assert health["rejects"]["too_deep"] == 3
    assert health["events"]["accepted"] == 3


def test_max_depth_is_configurable(relay_factory):
    relay = relay_factory.start("--max-depth", "8")
    relay.send(nested(8))
    relay.send(nested(9))
    relay.emit("state_change", "after", state="ok")
    relay.wait_accepted(2)
    assert relay.health()["rejects"]["too_deep"] == 1


def test_bad_max_depth_is_one_line_and_exit_2(relay_factory):
    for value in ("0", "251", "x"):
        result = relay_factory.run_failing("--max-depth", value, "--port", "0")
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--max-depth" in result.stderr


def test_snapshot_survives_an_entry_that_cannot_be_serialised():
    # Intake refuses such data; this is the guard behind it, for what may slip past.
    from fastrelay.registry import Registry

    registry = Registry(10)
    registry.update("good", {"state": "on", "data": {"k": 1}})
    registry.update("bad", {"state": "on"})
    deep: list[object] = []
    for _ in range(300):
        deep = [deep]
    registry.machines["bad"]["data"] = deep
    initial = orjson.loads(registry.snapshot_payload("e", 0))
    assert initial["type"] == "initial"
    assert {m["id"]: m["data"] for m in initial["machines"]} == {"good": {"k": 1}, "bad": None}
    assert [m["id"] for m in orjson.loads(registry.machines_payload())] == ["good", "bad"]
