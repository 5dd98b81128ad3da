"""Counters mean what the README says (issue 9, items 5 and 11)."""

from __future__ import annotations

import asyncio

import orjson
from clients import picows_client


async def until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll a blocking ``predicate`` off the loop until it holds, so clients keep running."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await asyncio.to_thread(predicate)):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def frames_sent(relay) -> float:
    for line in relay.get("/metrics")[1].decode().splitlines():
        if line.startswith("fastrelay_frames_sent_total "):
            return float(line.split()[1])
    raise AssertionError("no fastrelay_frames_sent_total")


async def test_relayed_counts_event_deliveries_not_pings(relay_factory):
    # Before the fix every JSON ping was counted as a relayed event.
    relay = relay_factory.start("--ping-interval", "0.1")
    collector = await picows_client(relay.url, expected=5)
    await until(lambda: relay.health()["clients"] == 1, what="client joined")
    for i in range(5):
        relay.emit("tick", "m", n=i)
    await asyncio.wait_for(collector.done, 10)
    # initial + 5 events + at least 3 pings written to the one client
    await until(lambda: frames_sent(relay) >= 1 + 5 + 3, what="three pings")
    health = relay.health()
    assert health["clients"] == 1
    assert health["events"]["accepted"] == 5
    assert health["events"]["relayed"] == 5
    assert "fastrelay_events_relayed_total 5.0" in relay.get("/metrics")[1].decode()
    collector.transport.disconnect()


def test_eviction_keeps_the_most_recently_active_machines(relay_factory):
    relay = relay_factory.start("--max-machines", "100")
    total = 20_000
    for i in range(total):
        relay.send(orjson.dumps({"type": "state_change", "machine_id": f"m{i}", "state": "s"}))
        if i % 50 == 0:  # keep one early machine active: LRU, not FIFO, must keep it
            relay.send(orjson.dumps({"type": "heartbeat", "machine_id": "keeper"}))
    relay.send(orjson.dumps({"type": "heartbeat", "machine_id": "keeper"}))
    relay.wait_accepted(total + total // 50 + 1, timeout=60)
    health = relay.health()
    assert health["machines"] == 100
    machines = orjson.loads(relay.get("/api/machines")[1])
    ids = [m["id"] for m in machines]
    assert ids == [f"m{i}" for i in range(total - 99, total)] + ["keeper"]
    metrics = relay.get("/metrics")[1].decode()
    assert f"fastrelay_machines_evicted_total {float(total + 1 - 100)}" in metrics
