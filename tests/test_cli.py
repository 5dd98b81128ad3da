"""The command line (DESIGN §5): start-up line, bad values, emit and tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

SERVE = [sys.executable, "-m", "fastrelay", "serve"]


@pytest.mark.parametrize("args, complaint", [
    (["--port", "abc"], "--port"),
    (["--port", "70000"], "--port"),
    (["--max-client-buffer", "4XB"], "--max-client-buffer"),
    (["--max-datagram", "0"], "--max-datagram"),
    (["--socket-mode", "999"], "--socket-mode"),
    (["--ping-interval", "-1"], "--ping-interval"),
    (["--send-timeout", "soon"], "--send-timeout"),
    (["--backend", "rust"], "--backend"),
    (["--path", "ws"], "--path"),
    (["--no-such-option"], "unrecognized"),
])
def test_bad_values_are_one_line_and_exit_2(args, complaint):
    result = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert complaint in lines[0]
    assert result.stdout == ""


def test_emit_needs_valid_json_data():
    result = subprocess.run(
        [sys.executable, "-m", "fastrelay", "emit", "t", "m", "--data", "{oops"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_emit_without_relay_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastrelay", "emit", "t", "m", "--socket", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no_relay" in result.stderr and str(tmp_path / "none") in result.stderr


def test_startup_line_names_url_socket_and_backend(relay):
    line = next(line for line in relay.output if "relaying" in line)
    assert relay.socket_path in line
    assert relay.url in line
    assert f"backend {relay.backend}" in line


def test_port_in_use_is_one_line(relay, relay_factory, tmp_path):
    result = relay_factory.run_failing("--port", str(relay.port), "--socket",
                                       str(tmp_path / "other.sock"), "--log-dir", str(tmp_path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert str(relay.port) in line
    assert not (tmp_path / "other.sock").exists()


def test_tail_prints_events_and_answers_pings(relay_factory):
    relay = relay_factory.start(ping_interval=0.5)
    tail = subprocess.Popen([sys.executable, "-m", "fastrelay", "tail", "--url", relay.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = tail.stdout.readline()
        assert "initial 0 machine(s)" in first
        relay.emit("state_change", "tail-1", state="idle")
        relay.emit("state_change", "tail-1", state="running", data={"job": 7})
        relay.emit("job_progress", "tail-1", progress=0.5)
        lines = [tail.stdout.readline().strip() for _ in range(3)]
        assert lines[0].endswith("state_change tail-1 None -> idle")
        assert 'state_change tail-1 idle -> running {"data":{"job":7}}' in lines[1]
        assert 'job_progress tail-1 {"progress":0.5}' in lines[2]
        # Five pings: a tail that ignored them would be closed at the fourth or
        # fifth, in the step that sent it. The tail is the only client, so the
        # frames written are its initial, the 3 events and the pings.
        relay.wait_for(lambda: relay.metric("fastrelay_frames_sent_total") >= 1 + 3 + 5, 15,
                       "five pings to the tail")
        health = relay.health()
        assert health["clients"] == 1
        assert health["closed"]["unresponsive"] == 0
    finally:
        tail.send_signal(signal.SIGINT)
        try:
            tail.wait(10)
        except subprocess.TimeoutExpired:
            tail.kill()
            raise AssertionError("tail ignored SIGINT: " + tail.communicate()[1]) from None
    assert tail.returncode == 0
    assert "connected to" in tail.stderr.read()


def test_python_api_relay_server_in_process(tmp_path):
    script = f"""
import asyncio, fastrelay, json, urllib.request
async def main():
    async with fastrelay.RelayServer(port=0, socket_path={str(tmp_path / 's.sock')!r},
                                     log_dir={str(tmp_path / 'logs')!r}) as server:
        assert server.backend == fastrelay.BACKEND
        assert fastrelay.Emitter(server.config.socket_path).emit("state_change", "api", state="up")
        url = server.url.replace("ws://", "http://").replace("/ws/events", "/api/machines")
        deadline = asyncio.get_running_loop().time() + 10
        while not (machines := json.loads(await asyncio.to_thread(
                lambda: urllib.request.urlopen(url).read()))):
            assert asyncio.get_running_loop().time() < deadline, "the event never arrived"
            await asyncio.sleep(0.02)
        print(machines[0]["current_state"])
asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "up"
    assert not (tmp_path / "s.sock").exists()
