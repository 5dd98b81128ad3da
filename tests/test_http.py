"""HTTP on the WebSocket port (DESIGN §3)."""

from __future__ import annotations

import orjson


def test_healthz_reports_the_relay(relay):
    relay.emit("state_change", "h1", state="x")
    relay.send(b"junk")
    relay.wait_accepted(1)
    health = relay.health()
    assert health["status"] == "ok"
    assert health["backend"] == relay.backend
    assert health["clients"] == 0
    assert health["machines"] == 1
    assert health["events"]["accepted"] == 1
    assert health["rejects"]["invalid_json"] == 1
    assert isinstance(health["loop_lag_ms"], float)
    assert health["ws_path"] == "/ws/events"


def test_api_machines_is_the_registry(relay):
    relay.emit("state_change", "a", state="1")
    relay.emit("state_change", "b", state="2")
    relay.wait_accepted(2)
    status, body, headers = relay.get("/api/machines")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert {m["id"]: m["current_state"] for m in orjson.loads(body)} == {"a": "1", "b": "2"}


def test_unknown_paths_get_404(relay):
    for path in ("/nope", "/ws", "/healthz/x", "/static/../setup.py", "/static/nothing.js"):
        assert relay.get(path)[0] == 404, path


def test_websocket_path_without_upgrade_is_a_client_error(relay):
    status, _, _ = relay.get("/ws/events")
    assert status == 400


def test_metrics_in_prometheus_text_format(relay):
    relay.emit("state_change", "x", state="y")
    relay.send(b"[]")
    relay.wait_accepted(1)
    status, body, headers = relay.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for line in (
        "fastrelay_events_accepted_total 1.0",
        'fastrelay_events_rejected_total{reason="not_object"} 1.0',
        "fastrelay_clients_connected 0.0",
        'fastrelay_clients_closed_total{reason="slow"} 0.0',
        "fastrelay_batch_size_count",
        "fastrelay_loop_lag_seconds",
        "fastrelay_bytes_sent_total",
        "fastrelay_frames_sent_total",
        "fastrelay_events_relayed_total",
    ):
        assert line in text, line
