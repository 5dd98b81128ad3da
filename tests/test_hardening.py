"""Hardening (issue 3): slow and dead clients, descriptors, restarts, hangs, lifecycle."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
import websockets
from clients import connect, picows_client, recv_events, recv_json
from relayproc import OwedWatch
from stall import StallUnavailable, stalled_loop
from waiting import until

MiB = 1024 * 1024


def fd_settled(relay, baseline: int, slack: int = 0) -> bool:
    return relay.fds() <= baseline + slack


EVENTS_PER_BATCH = 64  # --batch-cap for tests that bound what one batch adds


async def test_slow_client_closed_with_1013_while_others_get_everything(relay_factory):
    # A long send timeout so the stalled client has time to read its backlog
    # afterwards and see the close code; the buffer bound alone must close it.
    relay = relay_factory.start("--send-timeout", "60", "--batch-cap", str(EVENTS_PER_BATCH))
    fast = [await picows_client(relay.url, expected=2001) for _ in range(10)]
    # Kernel buffers on loopback absorb ~10 MB before the relay's own buffer grows;
    # the 20 MB burst goes well past both.
    slow = await websockets.connect(relay.url, ping_interval=None, max_size=None, max_queue=None)
    slow.transport.pause_reading()
    await relay.until_health(lambda h: h["clients"] == 11, what="11 clients")

    payload = "z" * 10_000
    async with OwedWatch(relay) as owed:
        emitter = await asyncio.create_subprocess_exec(sys.executable, "-c", textwrap.dedent("""
            import sys
            from fastrelay import Emitter
            import time
            e = Emitter(sys.argv[1])
            ok = 0
            for i in range(2000):  # 20 MB, paced so that ten readers in one process keep up
                ok += e.emit("bulk", "slowtest", n=i, payload=sys.argv[2])
                if i % 50 == 49:
                    time.sleep(0.05)
            print(ok, e.flush(60), sum(e.dropped.values()))
        """), relay.socket_path, payload, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(emitter.communicate(), 120)
        assert out.decode().split() == ["2000", "True", "0"]
        await asyncio.wait_for(asyncio.gather(*(c.done for c in fast)), 60)
        await relay.until_health(lambda h: h["closed"]["slow"] == 1, what="slow close counted")
    for client in fast:
        assert [e["n"] for e in client.events()] == list(range(2000))
    # ~20 MB went out; by its own accounting the relay never held more for one
    # client than its bound plus the batch that crossed it (and it did count the
    # slow client's backlog: the accounting is live).
    one_batch = EVENTS_PER_BATCH * (len(payload) + 200)
    assert 0 < owed.worst() <= owed.max_client_buffer + one_batch, owed.describe()

    slow.transport.resume_reading()
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(slow.recv(), 30)
    assert slow.close_code == 1013
    health = relay.health()
    assert health["clients"] == 10
    for client in fast:
        client.transport.disconnect()


CLIENTS_PROC = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[3])
    from clients import picows_client
    async def main():
        clients = [await picows_client(sys.argv[1]) for _ in range(int(sys.argv[2]))]
        print("connected", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


async def test_killed_clients_and_stuck_handshakes_leave_no_leak(relay_factory):
    relay = relay_factory.start("--send-timeout", "0.4", ping_interval=0.3)
    assert relay.health()["clients"] == 0  # serving: what it opens at start is open
    baseline = relay.fds()
    procs = [subprocess.Popen([sys.executable, "-c", CLIENTS_PROC, relay.url, "20",
                               os.path.dirname(__file__)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "connected"
    await relay.until_health(lambda h: h["clients"] == 40, what="40 clients")
    # Half-open handshakes: a TCP connection that says nothing, one that stops mid-request.
    idle = socket.create_connection(("127.0.0.1", relay.port))
    partial = socket.create_connection(("127.0.0.1", relay.port))
    partial.sendall(b"GET /ws/events HTTP/1.1\r\nHost: x\r\n")
    # A client that completes the handshake but never answers a ping.
    mute = await connect(relay.url)
    await recv_json(mute)

    burst = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from fastrelay import Emitter
        e = Emitter(sys.argv[1])
        for i in range(3000):
            e.emit("bulk", "kill", n=i, pad="k" * 500)
        e.flush(30)
    """), relay.socket_path])
    # Kill the clients while the burst is being relayed to them.
    await relay.until_health(lambda h: h["events"]["accepted"] > 0, what="the burst under way")
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        await asyncio.to_thread(proc.wait, 10)
    await asyncio.to_thread(burst.wait, 60)

    await relay.until_health(lambda h: h["clients"] == 0, 15, "all clients gone")
    await until(lambda: fd_settled(relay, baseline), 15, f"fds back to {baseline}")
    closed = relay.health()["closed"]
    assert closed["unresponsive"] >= 1  # the mute client
    assert sum(closed.values()) == 41
    assert idle.recv(1) == b""  # the relay closed the idle handshake
    assert partial.recv(1) == b""
    idle.close()
    partial.close()
    await mute.close()


def low_nofile(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def _clients_now(relay) -> int | None:
    """Clients per /healthz, None while the relay has no descriptor to answer with."""
    try:
        return int(relay.health()["clients"])
    except (OSError, AssertionError):
        return None


async def test_running_out_of_descriptors_degrades_and_recovers(relay_factory):
    relay = relay_factory.start(preexec=low_nofile(48))
    first = [await picows_client(relay.url) for _ in range(10)]
    # Fill the table: attempts beyond the limit are refused or closed, never hang the relay.
    attempts = []
    for _ in range(60):
        try:
            attempts.append(await asyncio.wait_for(picows_client(relay.url), 3))
        except (OSError, asyncio.TimeoutError, Exception):
            pass
    # picows hands back no listener when the relay closed the connection
    # before the handshake finished: the clean refusal we want.
    established = [c for c in attempts if c is not None and not c.closed.done()]
    assert len(established) < len(attempts)
    assert len(established) + len(first) < 48
    relay.emit("state_change", "fd", state="still-alive")
    await until(lambda: all(c.events() and c.events()[-1]["state"] == "still-alive" for c in first),
                10, "the first clients to get the event")
    for client in established:
        client.transport.disconnect()
    # Descriptors come back as the relay sees those clients go.
    await until(lambda: _clients_now(relay) == len(first), 15, "the extra clients gone")
    late = await asyncio.wait_for(picows_client(relay.url, expected=2), 10)
    relay.emit("state_change", "fd", state="recovered")
    await asyncio.wait_for(late.done, 10)
    assert late.events()[-1]["state"] == "recovered"
    assert relay.proc.poll() is None
    for client in first + [late]:
        client.transport.disconnect()


EMIT_FOREVER = textwrap.dedent("""
    import sys, time
    from fastrelay import Emitter
    e = Emitter(sys.argv[1], hold=0)  # drop at once: this test counts the gap
    ok = fail = 0
    end = time.monotonic() + float(sys.argv[2])
    i = 0
    while time.monotonic() < end:
        if e.emit("tick", "restart", n=i):
            ok += 1
        else:
            if not fail:
                print("down", flush=True)  # the first event that met no relay
            fail += 1
        i += 1
        time.sleep(0.001)
    print(ok, fail)
""")


async def test_relay_restart_while_emitters_emit(relay_factory):
    relay = relay_factory.start()
    emitters = [subprocess.Popen([sys.executable, "-c", EMIT_FOREVER, relay.socket_path, "4"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    await relay.until_health(lambda h: h["events"]["accepted"] > 0, what="ticks before the stop")
    assert relay.stop() == 0
    # Down until every emitter has met the missing relay.
    for proc in emitters:
        assert await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10) == "down\n"
    restarted = relay_factory.start(socket_path=relay.socket_path)
    ws = await connect(restarted.url)
    await recv_json(ws)
    events = await recv_events(ws, 20, timeout=10)
    assert all(e["type"] == "tick" for e in events)
    for proc in emitters:
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
        ok, fail = out.split()
        assert int(ok) > 0 and int(fail) > 0  # some landed in the gap, none raised
    await ws.close()


def test_watchdog_dumps_stacks_when_loop_stalls(relay_factory):
    # The loop is stalled from outside: its thread is stopped (tests/stall.py)
    # while the watchdog thread runs on and must notice, once per stall.
    relay = relay_factory.start("--hang-threshold", "0.5")
    emergency = relay.log_dir / "hang-emergency.log"
    try:
        with stalled_loop(relay.pid):
            relay.wait_for(emergency.exists, 10, "hang-emergency.log")
            relay.wait_for(lambda: "event loop has not run for" in relay.log_text(), 10,
                           "the critical line")
    except StallUnavailable as exc:
        pytest.skip(f"cannot stop one thread of the relay here: {exc}")
    text = emergency.read_text()
    assert "event loop stalled" in text
    assert f"pid {relay.pid}" in text
    # Every thread's stack, the loop's marked: it was in the loop's run, waiting.
    assert "--- thread MainThread" in text and "(event loop)" in text
    assert "run_until_complete" in text
    assert "--- thread fastrelay-watchdog" in text
    # The loop runs again by itself, and one stall made one report.
    assert relay.health()["status"] == "ok"
    critical = [line for line in relay.log_text().splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, critical
    assert text.count("event loop stalled") == 1


def test_no_test_routes_in_the_relay(relay_factory):
    # The blocking hook once enabled by FASTRELAY_TEST_HOOKS=1 is gone for good.
    relay = relay_factory.start(env={"FASTRELAY_TEST_HOOKS": "1"})
    assert relay.get("/_test/block?seconds=0")[0] == 404


async def test_sigterm_closes_clients_with_1001_and_removes_socket(relay):
    clients = [await connect(relay.url) for _ in range(3)]
    for ws in clients:
        await recv_json(ws)
    relay.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    assert await asyncio.to_thread(relay.proc.wait, 10) == 0
    assert not os.path.exists(relay.socket_path)


def test_sigint_exits_cleanly(relay):
    relay.proc.send_signal(signal.SIGINT)
    assert relay.proc.wait(5) == 0
    assert not os.path.exists(relay.socket_path)


def test_socket_file_safety(relay_factory, tmp_path):
    # A stale socket file is replaced.
    stale_path = relay_factory.socket_path()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(stale_path)
    stale.close()
    relay = relay_factory.start(socket_path=stale_path)
    assert relay.health()["status"] == "ok"
    # A live relay on the path: a second one refuses, naming the path, and leaves it alone.
    second = relay_factory.run_failing("--port", "0", "--socket", stale_path,
                                       "--log-dir", str(tmp_path / "l2"))
    assert second.returncode != 0
    (line,) = second.stderr.strip().splitlines()
    assert stale_path in line and "already listening" in line
    relay.emit("state_change", "still", state="mine")
    relay.wait_accepted(1)
    # A path that is not a socket is never deleted.
    regular = tmp_path / "not-a-socket"
    regular.write_text("precious")
    third = relay_factory.run_failing("--port", "0", "--socket", str(regular),
                                      "--log-dir", str(tmp_path / "l3"))
    assert third.returncode != 0
    (line,) = third.stderr.strip().splitlines()
    assert str(regular) in line and "not a socket" in line
    assert regular.read_text() == "precious"


def test_socket_mode_is_applied(relay_factory):
    relay = relay_factory.start("--socket-mode", "0o600")
    assert stat.S_IMODE(os.stat(relay.socket_path).st_mode) == 0o600
    other = relay_factory.start("--socket-mode", "640")
    assert stat.S_IMODE(os.stat(other.socket_path).st_mode) == 0o640
    default = relay_factory.start()
    assert stat.S_IMODE(os.stat(default.socket_path).st_mode) == 0o660


async def test_browser_origins(relay_factory):
    relay = relay_factory.start("--allow-origin", "https://ops.example.com")
    host = f"127.0.0.1:{relay.port}"
    accepted = [None, f"http://{host}", "http://localhost:5173", "http://127.0.0.1:8080",
                "https://ops.example.com"]
    for origin in accepted:
        async with await connect(relay.url, origin=origin) as ws:
            assert (await recv_json(ws))["type"] == "initial", origin
    for origin in ("https://evil.example.com", "null", "http://ops.example.com"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await connect(relay.url, origin=origin)
        assert info.value.response.status_code == 403, origin
    assert relay.get("/api/machines", {"Origin": "https://evil.example.com"})[0] == 403
    anyone = relay_factory.start("--allow-origin", "*")
    async with await connect(anyone.url, origin="https://evil.example.com") as ws:
        assert (await recv_json(ws))["type"] == "initial"


async def test_token_required_everywhere_but_healthz(relay_factory):
    relay = relay_factory.start("--token", "s3cret")
    with pytest.raises(websockets.InvalidStatus) as info:
        await connect(relay.url)
    assert info.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus):
        await connect(relay.url + "?token=wrong")
    async with await connect(relay.url + "?token=s3cret") as ws:
        assert (await recv_json(ws))["type"] == "initial"
    async with await connect(relay.url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
        assert (await recv_json(ws))["type"] == "initial"
    assert relay.get("/healthz")[0] == 200
    for path in ("/api/machines", "/metrics", "/"):
        assert relay.get(path)[0] == 401, path
        assert relay.get(path + "?token=s3cret")[0] in (200, 404), path
    assert relay.get("/metrics", {"Authorization": "Bearer s3cret"})[0] == 200
    env_relay = relay_factory.start(env={"FASTRELAY_TOKEN": "fromenv"})
    assert env_relay.get("/api/machines")[0] == 401
    assert env_relay.get("/api/machines?token=fromenv")[0] == 200


def test_heartbeat_line(relay_factory):
    relay = relay_factory.start("--heartbeat-interval", "0.2")
    relay.emit("state_change", "hb", state="x")
    relay.wait_for(lambda: "heartbeat clients=0 machines=1" in relay.log_text(), 5, "heartbeat")
    line = [line for line in relay.log_text().splitlines() if "heartbeat" in line][-1]
    for field in ("events_per_s=", "rejects=", "loop_lag_ms=", "accepted="):
        assert field in line
