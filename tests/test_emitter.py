"""The emitter (DESIGN §4): light import, never blocks, never raises, backlog, fork/thread safety."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

from clients import picows_client

import fastrelay
from fastrelay.emit import Emitter


def test_import_is_light():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import fastrelay"],
                            capture_output=True, text=True, check=True)
    modules = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:")]
    assert "fastrelay.emit" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("picows", "uvloop", "prometheus_client",
                                                        "aiofastnet", "asyncio")
             or m in ("fastrelay.server", "fastrelay._core", "fastrelay._core_py",
                      "fastrelay.cli", "fastrelay.keepalive")]
    assert heavy == []


def test_emit_without_relay_returns_false_and_counts_it(tmp_path):
    # What one such call costs is a measurement: bench/emit_cost.py.
    # hold=0: dropped at once (the default holds them, see test_emit_hold.py).
    emitter = Emitter(str(tmp_path / "nobody.sock"), hold=0)
    for _ in range(200):
        assert emitter.emit("state_change", "m", state="x") is False
    assert emitter.dropped["no_relay"] == 200
    assert emitter.stats()["sent"] == 0
    assert emitter.pending == 0  # nothing kept to retry: dropped at once


def test_emit_never_raises_on_bad_values(tmp_path):
    emitter = Emitter(str(tmp_path / "nobody.sock"))
    assert emitter.emit("x", "m", thing=object()) is False
    assert emitter.dropped["unserializable"] == 1


SEND_EVENT_AS_ORIGINAL = textwrap.dedent("""
    import inspect, sys
    import fastrelay
    # The original function's signature, called as its users call it.
    params = inspect.signature(fastrelay.send_event).parameters.values()
    assert [(p.name, p.kind.name) for p in params] == [
        ("event_type", "POSITIONAL_OR_KEYWORD"), ("machine_id", "POSITIONAL_OR_KEYWORD"),
        ("kwargs", "VAR_KEYWORD")]
    assert fastrelay.send_event("state_change", "worker-123", state="processing",
                                data={"job_id": "task-456"}) is True
    assert fastrelay.send_event(event_type="log", machine_id="worker-123", message="hi") is True
    assert fastrelay.default_emitter().flush(10)
""")


def test_module_level_api_matches_original(tmp_path):
    # send_event, as the original design's callers use it, sends the original
    # wire format to the socket named by FASTRELAY_SOCKET.
    original = str(tmp_path / "original.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(original)
    result = subprocess.run([sys.executable, "-c", SEND_EVENT_AS_ORIGINAL], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "FASTRELAY_SOCKET": original})
    assert result.returncode == 0, result.stderr
    import orjson

    listener.settimeout(5)
    first, second = (orjson.loads(listener.recv(65536)) for _ in range(2))
    listener.close()
    assert {k: v for k, v in first.items() if k != "timestamp"} == {
        "type": "state_change", "machine_id": "worker-123", "state": "processing",
        "data": {"job_id": "task-456"}}
    assert isinstance(first["timestamp"], float)
    assert (second["type"], second["machine_id"], second["message"]) == ("log", "worker-123", "hi")
    assert fastrelay.send_event.__module__ == "fastrelay.emit"

    path = str(tmp_path / "r.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    emitter = Emitter(path)
    assert emitter.emit("state_change", "worker-123", state="processing",
                        data={"job_id": "task-456"}) is True
    import orjson

    event = orjson.loads(receiver.recv(65536))
    assert event["type"] == "state_change"
    assert event["machine_id"] == "worker-123"
    assert event["state"] == "processing"
    assert event["data"] == {"job_id": "task-456"}
    assert abs(event["timestamp"] - time.time()) < 5
    assert emitter.emit("x", "m", timestamp=12.5)
    assert orjson.loads(receiver.recv(65536))["timestamp"] == 12.5
    receiver.close()


def test_backlog_keeps_order_and_counts_when_full(tmp_path):
    """A socket nobody reads fills the kernel queue; then the backlog; then drops are counted."""
    path = str(tmp_path / "slow.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    emitter = Emitter(path, backlog=50)
    results = [emitter.emit("n", "m", i=i) for i in range(200)]
    assert all(results[:50])  # the kernel queue and the backlog take at least 50
    assert results[-1] is False
    accepted = results.count(True)
    assert emitter.dropped["backlog_full"] == 200 - accepted
    import orjson

    receiver.settimeout(5)
    got = [orjson.loads(receiver.recv(65536))["i"] for _ in range(accepted)]
    assert got == [i for i, ok in enumerate(results) if ok]
    assert emitter.flush(5)
    assert emitter.pending == 0
    receiver.close()


BACKLOG_MEMORY = """
import sys
from fastrelay.emit import Emitter

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

emitter = Emitter(sys.argv[1], backlog=10_000, hold=60)
before = rss_kib()
for i in range(10_000):
    emitter.emit("state_change", f"m{i % 100}", state="idle", data={"i": i})
assert emitter.pending == 10_000, emitter.pending
print(rss_kib() - before)
"""


def test_a_full_backlog_costs_about_its_events_bytes(tmp_path):
    """10,000 small events waiting for an absent relay hold a few MiB, not 4 KiB each
    (orjson over-allocates what it returns: the backlog keeps right-sized copies)."""
    result = subprocess.run([sys.executable, "-c", BACKLOG_MEMORY, str(tmp_path / "absent.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # ~100 bytes of JSON per event plus the deque's bookkeeping: under 10 MiB
    # whatever the allocator does; 4 KiB each would be 40 MiB.
    assert int(result.stdout) < 10 * 1024, result.stdout


def test_threads_share_one_emitter_safely(tmp_path):
    path = str(tmp_path / "t.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    emitter = Emitter(path)
    received = []

    def read() -> None:
        import orjson
        for _ in range(8 * 500):
            received.append(orjson.loads(receiver.recv(65536)))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=lambda t=t: [emitter.emit("n", f"t{t}", i=i)
                                                     for i in range(500)]) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.join(20)
    assert len(received) == 4000
    for t in range(8):
        assert [e["i"] for e in received if e["machine_id"] == f"t{t}"] == list(range(500))
    assert sum(emitter.dropped.values()) == 0
    receiver.close()


def test_fork_gets_its_own_socket(tmp_path):
    path = str(tmp_path / "f.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    emitter = Emitter(path)
    assert emitter.emit("from", "parent")
    parent_fd = emitter._sock.fileno()
    pid = os.fork()
    if pid == 0:  # child
        ok = emitter.emit("from", "child") and emitter._sock is not None
        os._exit(0 if ok and emitter.stats()["sent"] == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert emitter.emit("from", "parent-again")
    assert emitter._sock.fileno() == parent_fd
    import orjson

    got = sorted(orjson.loads(receiver.recv(65536))["machine_id"] for _ in range(3))
    assert got == ["child", "parent", "parent-again"]
    receiver.close()


def test_cli_emit_reaches_relay(relay):
    result = subprocess.run(
        [sys.executable, "-m", "fastrelay", "emit", "state_change", "cli-1", "--state", "up",
         "--data", '{"n": 1}', "--socket", relay.socket_path],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    relay.wait_accepted(1)
    import orjson

    (machine,) = orjson.loads(relay.get("/api/machines")[1])
    assert (machine["id"], machine["current_state"], machine["data"]) == ("cli-1", "up", {"n": 1})


BURST = textwrap.dedent("""
    import sys
    from fastrelay import Emitter
    emitter = Emitter(sys.argv[1])
    results = [emitter.emit("burst", "b", n=i) for i in range(10_000)]
    flushed = emitter.flush(30)
    print(results.count(True), sum(emitter.dropped.values()), flushed)
""")


async def test_burst_of_10000_from_one_process_arrives_complete_in_order(relay):
    client = await picows_client(relay.url, expected=10_001)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BURST, relay.socket_path, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    ok, dropped, flushed = out.decode().split()
    await asyncio.wait_for(client.done, 30)
    assert (int(ok), int(dropped), flushed) == (10_000, 0, "True")
    assert [e["n"] for e in client.events()] == list(range(10_000))
    # What each emit cost and how far the loop ran ahead of the relay:
    # bench/emit_cost.py.
    client.transport.disconnect()


def test_relay_restart_emitter_reconnects(relay_factory):
    relay = relay_factory.start()
    emitter = Emitter(relay.socket_path, hold=0)  # with a hold: test_emit_hold.py
    assert emitter.emit("before", "r")
    relay.wait_accepted(1)
    relay.stop()
    assert emitter.emit("during", "r") is False
    relay2 = relay_factory.start(socket_path=relay.socket_path)
    assert emitter.emit("after", "r")
    relay2.wait_accepted(1)
