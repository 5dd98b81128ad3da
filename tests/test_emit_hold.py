"""The emitter rides out a relay restart (DESIGN §7): ``Emitter(hold=...)``.

Events that meet an absent relay wait, in order, in the bounded backlog for up
to ``hold`` seconds and reach the relay once one listens again; older ones are
dropped and counted ``no_relay``; ``hold=0`` drops at once. The "relay" here is
mostly a plain datagram socket bound on the path (unlink and rebind it to
restart it); one test restarts a real relay.
"""

from __future__ import annotations

import math
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from relayproc import RelayFactory
from waiting import wait_for

from fastrelay.emit import DEFAULT_HOLD, DROP_REASONS, Emitter

NO_DROPS = dict.fromkeys(DROP_REASONS, 0)


def bind(path: str) -> socket.socket:
    """A stand-in relay: a datagram socket bound on ``path``, read without blocking."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    return receiver


def go_away(receiver: socket.socket, path: str) -> None:
    """What a relay does on shutdown: remove its socket file, then close the socket."""
    os.unlink(path)
    receiver.close()


def read_ready(receiver: socket.socket) -> list[dict[str, Any]]:
    """Every datagram queued on ``receiver`` right now."""
    got = []
    while True:
        try:
            got.append(orjson.loads(receiver.recv(65536)))
        except BlockingIOError:
            return got


def receive_all(receiver: socket.socket, emitter: Emitter, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Read until the emitter's backlog is empty and every datagram it sent has been read.

    Reading as we go matters: the kernel queues only a few datagrams per socket,
    so the flusher needs the room to get through a longer backlog.
    """
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        # Checked before reading: a datagram is on the receiver's queue once the
        # send that took it off the backlog has returned.
        done = emitter.pending == 0
        got.extend(read_ready(receiver))
        if done:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s with {emitter.stats()} and {len(got)} read")
        select.select([receiver], [], [], 0.02)


def test_default_hold_and_validation(tmp_path):
    path = str(tmp_path / "r.sock")
    assert DEFAULT_HOLD == 5.0
    assert Emitter(path).hold == 5.0
    assert Emitter(path, hold=0).hold == 0
    for bad in (-0.1, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="hold"):
            Emitter(path, hold=bad)


def test_events_emitted_without_relay_arrive_in_order_once_when_it_binds(tmp_path):
    path = str(tmp_path / "r.sock")
    emitter = Emitter(path, hold=60)
    # More than the kernel queues per socket, so the flusher also meets EAGAIN.
    assert all(emitter.emit("n", "m", i=i) for i in range(50))
    assert emitter.pending == 50
    assert emitter.stats() == {"sent": 0, "pending": 50, "dropped": NO_DROPS}

    receiver = bind(path)
    got = receive_all(receiver, emitter)
    assert [e["i"] for e in got] == list(range(50))
    # What is emitted now goes behind them, straight through.
    assert emitter.emit("n", "m", i=50)
    got = receive_all(receiver, emitter)
    assert [e["i"] for e in got] == [50]
    assert emitter.stats() == {"sent": 51, "pending": 0, "dropped": NO_DROPS}
    receiver.close()


def test_events_older_than_hold_are_dropped_oldest_first(tmp_path):
    path = str(tmp_path / "r.sock")
    emitter = Emitter(path, hold=0.3)
    # Emit at a steady pace until the oldest event has been held too long.
    emitted = 0
    deadline = time.monotonic() + 10
    while emitter.stats()["dropped"]["no_relay"] == 0:
        assert time.monotonic() < deadline, "no event was ever dropped for its age"
        assert emitter.emit("n", "m", i=emitted) is True
        emitted += 1
        time.sleep(0.005)  # pacing only: the loop waits on the counter above
    receiver = bind(path)
    got = [e["i"] for e in receive_all(receiver, emitter)]
    dropped = emitter.stats()["dropped"]
    # The dropped ones are the oldest: what arrives is the newest, in order, once.
    assert got == list(range(emitted - len(got), emitted))
    assert dropped == {**NO_DROPS, "no_relay": emitted - len(got)}
    assert emitter.stats()["sent"] == len(got)
    receiver.close()


def test_all_held_events_expire_and_later_ones_still_go_through(tmp_path):
    path = str(tmp_path / "r.sock")
    emitter = Emitter(path, hold=0.3)
    assert all(emitter.emit("old", "m", i=i) for i in range(5))
    wait_for(lambda: emitter.stats()["dropped"]["no_relay"] == 5 and emitter.pending == 0,
             what="the five held events dropped after hold")
    receiver = bind(path)
    assert emitter.emit("new", "m") is True
    got = receive_all(receiver, emitter)
    assert [e["type"] for e in got] == ["new"]  # none of the expired ones was sent
    assert emitter.stats() == {"sent": 1, "pending": 0, "dropped": {**NO_DROPS, "no_relay": 5}}
    receiver.close()


def test_slow_relay_never_expires_the_backlog_and_its_outage_gets_a_full_hold(tmp_path):
    # Events queued on EAGAIN wait as long as the relay is there; hold counts
    # only from when the relay went away.
    hold = 1.0
    path = str(tmp_path / "r.sock")
    first = bind(path)  # never read: its queue fills, the rest waits in the backlog
    emitter = Emitter(path, hold=hold)
    assert all(emitter.emit("n", "m", i=i) for i in range(40))
    held = emitter.pending
    assert held > 0
    queued = time.monotonic()
    # Waiting on the clock is the point here: let the backlog grow older than hold.
    wait_for(lambda: time.monotonic() > queued + 1.5 * hold, what="the backlog older than hold")
    assert emitter.pending == held
    assert emitter.stats()["dropped"] == NO_DROPS

    go_away(first, path)  # what sat in its kernel queue is lost with it; the backlog is not
    # Rebind only once the emitter has found the path empty, so the outage is real.
    wait_for(lambda: emitter._absent_since is not None, what="the emitter seeing the relay gone")
    second = bind(path)
    got = [e["i"] for e in receive_all(second, emitter)]
    assert got == list(range(40 - held, 40))
    assert emitter.stats() == {"sent": 40, "pending": 0, "dropped": NO_DROPS}
    second.close()


def test_hold_zero_drops_at_once(tmp_path):
    path = str(tmp_path / "r.sock")
    emitter = Emitter(path, hold=0)
    for i in range(20):
        assert emitter.emit("n", "m", i=i) is False
    assert emitter.stats() == {"sent": 0, "pending": 0, "dropped": {**NO_DROPS, "no_relay": 20}}
    receiver = bind(path)
    assert emitter.emit("n", "m", i=20) is True
    assert [e["i"] for e in receive_all(receiver, emitter)] == [20]
    # A relay that goes away: the next event is dropped at once again.
    go_away(receiver, path)
    assert emitter.emit("n", "m", i=21) is False
    assert emitter.stats() == {"sent": 1, "pending": 0, "dropped": {**NO_DROPS, "no_relay": 21}}


def test_backlog_bound_holds_while_the_relay_is_absent(tmp_path):
    path = str(tmp_path / "r.sock")
    emitter = Emitter(path, backlog=20, hold=60)
    results = [emitter.emit("n", "m", i=i) for i in range(50)]
    assert results == [True] * 20 + [False] * 30
    assert emitter.stats() == {"sent": 0, "pending": 20, "dropped": {**NO_DROPS, "backlog_full": 30}}
    receiver = bind(path)
    assert [e["i"] for e in receive_all(receiver, emitter)] == list(range(20))
    assert emitter.stats()["sent"] == 20
    receiver.close()


def test_relay_that_goes_away_mid_stream_gets_the_gap(tmp_path):
    path = str(tmp_path / "r.sock")
    first = bind(path)
    emitter = Emitter(path, hold=60)
    assert all(emitter.emit("n", "m", i=i) for i in range(10))
    assert [e["i"] for e in receive_all(first, emitter)] == list(range(10))

    go_away(first, path)
    # The connected socket now meets a dead peer, then a missing path: held.
    assert all(emitter.emit("n", "m", i=i) for i in range(10, 40))
    assert emitter.pending == 30

    second = bind(path)
    assert [e["i"] for e in receive_all(second, emitter)] == list(range(10, 40))
    assert all(emitter.emit("n", "m", i=i) for i in range(40, 45))
    assert [e["i"] for e in receive_all(second, emitter)] == list(range(40, 45))
    assert emitter.stats() == {"sent": 45, "pending": 0, "dropped": NO_DROPS}
    second.close()


def test_stale_socket_file_counts_as_absent(tmp_path):
    # A relay that died without removing its socket file: connect is refused.
    path = str(tmp_path / "r.sock")
    bind(path).close()
    emitter = Emitter(path, hold=60)
    assert all(emitter.emit("n", "m", i=i) for i in range(5))
    os.unlink(path)  # what the next relay does with a stale file before it binds
    receiver = bind(path)
    assert [e["i"] for e in receive_all(receiver, emitter)] == list(range(5))
    receiver.close()


def test_emit_never_raises_at_unusable_paths(tmp_path):
    directory = tmp_path / "a-directory"
    directory.mkdir()
    regular = tmp_path / "a-file"
    regular.write_text("not a socket")
    paths = [str(directory), str(regular), str(tmp_path / "missing" / "r.sock"),
             "/" + "x" * 200]  # longer than sun_path
    emitters = [Emitter(p, hold=hold) for p in paths for hold in (0, 0.3)]
    for emitter in emitters:
        for i in range(5):
            assert emitter.emit("n", "m", i=i) is (emitter.hold > 0)
        assert emitter.emit("n", "m", thing=object()) is False
    for emitter in emitters:
        wait_for(lambda e=emitter: e.pending == 0, what=f"held events dropped at {emitter.socket_path!r}")
        assert emitter.stats() == {"sent": 0, "pending": 0,
                                   "dropped": {**NO_DROPS, "no_relay": 5, "unserializable": 1}}


def test_threads_emitting_through_relay_restarts_never_raise_and_keep_order(tmp_path):
    path = str(tmp_path / "r.sock")
    emitter = Emitter(path, hold=60)
    stop = threading.Event()
    calls = [0] * 4
    errors: list[BaseException] = []

    def emit_until_stopped(t: int) -> None:
        try:
            while not stop.is_set():
                emitter.emit("n", f"t{t}", i=calls[t])
                calls[t] += 1
                time.sleep(0.001)  # pacing only: keeps the test's CPU modest
        except BaseException as exc:  # the point is that there is none
            errors.append(exc)

    threads = [threading.Thread(target=emit_until_stopped, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    got: list[dict[str, Any]] = []

    def read_until_sent(receiver: socket.socket, target: int) -> bool:
        got.extend(read_ready(receiver))
        return emitter.sent > target

    receiver = bind(path)
    for _ in range(3):
        target = emitter.sent + 20
        wait_for(lambda r=receiver, n=target: read_until_sent(r, n), what="events reaching the relay")
        go_away(receiver, path)
        wait_for(lambda: emitter.pending > 20, what="events held while the relay is away")
        receiver = bind(path)
    stop.set()
    for thread in threads:
        thread.join(10)
    got.extend(receive_all(receiver, emitter))
    receiver.close()

    assert errors == []
    stats = emitter.stats()
    assert stats["dropped"] == NO_DROPS
    assert stats["sent"] == sum(calls)  # every call accounted for: sent (some to a socket then closed)
    for t in range(4):
        seen = [e["i"] for e in got if e["machine_id"] == f"t{t}"]
        assert seen == sorted(set(seen))  # in order, none twice
        assert seen[-1] == calls[t] - 1  # the last ones, held at the end, arrived


FORKED = textwrap.dedent("""
    import os, sys
    from fastrelay.emit import Emitter
    emitter = Emitter(sys.argv[1], hold=60)
    for i in range(3):
        assert emitter.emit("n", "parent", i=i)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        # The child starts with an empty backlog and holds only its own events.
        ok = emitter.pending == 0 and all(emitter.emit("n", "child", i=i) for i in range(2))
        os.write(w, b"1" if ok else b"0")
        ok = ok and emitter.flush(30) and emitter.stats()["sent"] == 2
        os._exit(0 if ok else 1)
    os.close(w)
    assert os.read(r, 1) == b"1"
    print("held", flush=True)
    sys.stdin.readline()  # the test has bound the relay
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child"
    assert emitter.flush(30) and emitter.stats()["sent"] == 3
    print("done", flush=True)
""")


def test_fork_child_holds_its_own_events(tmp_path):
    # In a subprocess: forking pytest itself while threads run is asking for trouble.
    path = str(tmp_path / "r.sock")
    proc = subprocess.Popen([sys.executable, "-c", FORKED, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "held\n", proc.stderr.read() if proc.stderr else ""
        receiver = bind(path)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (0, "done\n"), err
        got = read_ready(receiver)
        receiver.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_source = {source: [e["i"] for e in got if e["machine_id"] == source] for source in ("parent", "child")}
    assert by_source == {"parent": [0, 1, 2], "child": [0, 1]}


EXITING = textwrap.dedent("""
    import sys
    from fastrelay.emit import Emitter
    emitter = Emitter(sys.argv[1], hold=600, exit_flush_timeout=float(sys.argv[2]))
    print(all(emitter.emit("n", "m", i=i) for i in range(5)), flush=True)
    if sys.argv[3] == "wait":
        sys.stdin.readline()
""")


def test_exit_with_absent_relay_waits_exit_flush_timeout_not_hold(tmp_path):
    # hold is ten minutes; the process must be gone long before the test's timeout.
    result = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path / "r.sock"), "0.2", "go"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "True\n", "")


def test_exit_flush_delivers_to_a_relay_that_comes_back(tmp_path):
    path = str(tmp_path / "r.sock")
    proc = subprocess.Popen([sys.executable, "-c", EXITING, path, "60", "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "True\n"
        proc.stdin.write("exit now\n")  # it exits while nobody listens...
        proc.stdin.close()
        receiver = bind(path)  # ...and the exit flush meets the relay coming back
        assert proc.wait(60) == 0
        got = read_ready(receiver)
        receiver.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [e["i"] for e in got] == list(range(5))


def test_real_relay_restart_gets_the_events_of_the_gap(relay_factory: RelayFactory, tmp_path: Path):
    relay = relay_factory.start()
    emitter = Emitter(relay.socket_path, hold=60)
    assert emitter.emit("state_change", "gap", state="before")
    relay.wait_accepted(1)
    assert relay.stop() == 0
    assert all(emitter.emit("state_change", "gap", state=f"during-{i}") for i in range(30))
    restarted = relay_factory.start(socket_path=relay.socket_path)
    restarted.wait_accepted(30)
    assert emitter.flush(10)
    (machine,) = orjson.loads(restarted.get("/api/machines")[1])
    assert machine["current_state"] == "during-29"  # the last one emitted was the last applied
    assert restarted.health()["events"]["accepted"] == 30
    assert emitter.stats() == {"sent": 31, "pending": 0, "dropped": NO_DROPS}
