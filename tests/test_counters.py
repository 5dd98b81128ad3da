"""Counters mean what the README says (issue 9, items 5 and 11)."""

from __future__ import annotations

import asyncio

import orjson
from clients import picows_client
from waiting import until


async def _frames_sent_at_least(relay, n: int) -> bool:
    return await asyncio.to_thread(relay.metric, "fastrelay_frames_sent_total") >= n


async def test_relayed_counts_event_deliveries_not_pings(relay_factory):
    # Before the fix every JSON ping was counted as a relayed event.
    relay = relay_factory.start("--ping-interval", "0.1")
    collector = await picows_client(relay.url, expected=5)
    await relay.until_health(lambda h: h["clients"] == 1, what="client joined")
    for i in range(5):
        relay.emit("tick", "m", n=i)
    await asyncio.wait_for(collector.done, 10)
    # initial + 5 events + at least 3 pings written to the one client
    await until(lambda: _frames_sent_at_least(relay, 1 + 5 + 3), what="three pings")
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
