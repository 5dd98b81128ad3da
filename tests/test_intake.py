"""Datagram intake (DESIGN §1): wire compatibility, bad input, limits, registry."""

from __future__ import annotations

import json
import socket
import time

import orjson
from clients import connect, recv_events, recv_json


def original_send_event(socket_path: str, event_type: str, machine_id: str, **kwargs) -> None:
    """The original design's emitter, verbatim: a socket per event, stdlib json."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        message = json.dumps({
            "type": event_type,
            "machine_id": machine_id,
            "timestamp": time.time(),
            **kwargs,
        }).encode()
        sock.sendto(message, socket_path)
    finally:
        sock.close()


async def test_original_emitter_is_wire_compatible(relay):
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        original_send_event(relay.socket_path, "state_change", "legacy-1", state="processing",
                            data={"job_id": "task-456"})
        original_send_event(relay.socket_path, "job_progress", "legacy-1", progress=0.5)
        first, second = await recv_events(ws, 2)
    assert first["type"] == "state_change"
    assert first["machine_id"] == "legacy-1"
    assert first["state"] == "processing"
    assert first["previous_state"] is None
    assert first["data"] == {"job_id": "task-456"}
    assert second == {**second, "type": "job_progress", "progress": 0.5}
    machines = orjson.loads(relay.get("/api/machines")[1])
    assert machines[0]["id"] == "legacy-1"
    assert machines[0]["current_state"] == "processing"


async def test_bad_datagrams_are_counted_by_reason_and_relay_goes_on(relay):
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        bad = {
            "invalid_utf8": [b'{"type": "x", "s": "\xff\xfe"}', b"\xc3\x28"],
            "invalid_json": [b"not json", b'{"type": "x"', b"", b"{'type': 'x'}"],
            "not_object": [b"[1, 2]", b'"type"', b"42", b"null"],
            "invalid_type": [b'{"machine_id": "m"}', b'{"type": 7}', b'{"type": null}'],
            "too_large": [orjson.dumps({"type": "big", "pad": "x" * 70_000})],
            "too_deep": [b'{"type": "x", "data": ' + b"[" * 64 + b"]" * 64 + b"}"],
        }
        for payloads in bad.values():
            for payload in payloads:
                relay.send(payload)
        relay.emit("state_change", "after", state="ok")
        (event,) = await recv_events(ws, 1)
        assert event["machine_id"] == "after"
    rejects = relay.health()["rejects"]
    # Every reason counted, broker_unavailable (DESIGN §9) at 0: there is no broker.
    assert rejects == {"broker_unavailable": 0} | {reason: len(payloads)
                                                   for reason, payloads in bad.items()}
    assert relay.health()["events"]["accepted"] == 1


async def test_60_kib_event_arrives_whole(relay):
    data = "y" * (60 * 1024)
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        relay.emit("blob", "b1", data=data)
        (event,) = await recv_events(ws, 1)
    assert event["data"] == data


async def test_max_datagram_is_configurable(relay_factory):
    relay = relay_factory.start("--max-datagram", "1KiB")
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        relay.emit("blob", "b1", data="z" * 2000)
        relay.emit("blob", "b2", data="z" * 500)
        (event,) = await recv_events(ws, 1)
    assert event["machine_id"] == "b2"
    assert relay.health()["rejects"]["too_large"] == 1


async def test_any_type_relayed_and_registry_tracks_activity(relay):
    async with await connect(relay.url) as ws:
        await recv_json(ws)
        relay.send(b'{"type": "custom.thing", "extra": [1, 2, 3]}')
        relay.emit("state_change", "reg", state="one", timestamp=1000.5)
        relay.emit("heartbeat", "reg", timestamp=1001.25, data={"load": 3})
        events = await recv_events(ws, 3)
    assert events[0] == {"type": "custom.thing", "extra": [1, 2, 3], "seq": 1}
    assert [e["seq"] for e in events] == [1, 2, 3]
    (machine,) = orjson.loads(relay.get("/api/machines")[1])
    assert machine == {"id": "reg", "current_state": "one", "previous_state": None,
                       "last_activity": 1001.25, "data": {"load": 3}}


async def test_registry_is_bounded(relay_factory):
    relay = relay_factory.start("--max-machines", "3")
    for i in range(5):
        relay.emit("state_change", f"m{i}", state="s")
    await relay.until_accepted(5)
    ids = [m["id"] for m in orjson.loads(relay.get("/api/machines")[1])]
    assert ids == ["m2", "m3", "m4"]
    metrics = relay.get("/metrics")[1].decode()
    assert "fastrelay_machines_evicted_total 2.0" in metrics
