"""No datagram can poison the registry: what is stored can always be sent again (issue 9, item 2)."""

from __future__ import annotations

import orjson
from clients import connect, recv_events, recv_json


def nested(depth: int) -> bytes:
    """A datagram whose ``data`` nests arrays so that the whole object is ``depth`` levels deep."""
    inner = depth - 1
    return (b'{"type":"state_change","machine_id":"deep","state":"s","data":'
            + b"[" * inner + b"]" * inner + b"}")


async def test_deeply_nested_datagrams_are_refused_and_snapshots_survive(relay):
    # orjson parses up to 1,024 levels but writes at most 254: before the fix
    # such a datagram was stored, and every new client got 1011, /api/machines 500.
    for depth in (255, 300, 1024):
        relay.send(nested(depth))
    relay.send(nested(64))  # the default --max-depth: still accepted
    relay.emit("state_change", "plain", state="ok")
    relay.wait_accepted(2)
    health = relay.health()
    assert health["rejects"]["too_deep"] == 3
    assert health["machines"] == 2

    status, body, _ = relay.get("/api/machines")
    assert status == 200
    assert sorted(m["id"] for m in orjson.loads(body)) == ["deep", "plain"]
    async with await connect(relay.url) as ws:
        initial = await recv_json(ws)
        assert initial["type"] == "initial"
        assert sorted(m["id"] for m in initial["machines"]) == ["deep", "plain"]
        await ws.send('{"type":"refresh"}')
        (again,) = await recv_events(ws, 1)
        assert again["type"] == "initial"
        relay.emit("state_change", "plain", state="later")
        (event,) = await recv_events(ws, 1)
        assert event["state"] == "later"


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
