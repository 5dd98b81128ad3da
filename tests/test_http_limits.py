"""HTTP answers to clients that never read them are bounded too."""

from __future__ import annotations

import os
import socket

import orjson

MiB = 1024 * 1024


def fill_registry(relay, n: int) -> None:
    for i in range(n):
        relay.send(orjson.dumps({"type": "state_change", "machine_id": f"machine-{i:06d}",
                                 "state": "processing", "data": {"job": i}}))
    relay.wait_accepted(n, timeout=60)


def get_and_stall(relay, path: str) -> socket.socket:
    """Send a GET and read only the status line, then never read again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode())
    sock.settimeout(10)
    return sock


def relay_holds(relay, client_port: int) -> bool:
    """Whether the relay process still has a descriptor for the connection from ``client_port``."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == relay.port and remote_port == client_port:
                inodes.add(fields[9])
    fd_dir = f"/proc/{relay.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def status_of(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(64)
        assert chunk, "connection closed before the status line"
        head += chunk
    return int(head.split()[1])


def test_registry_requests_that_are_never_read_are_bounded(relay_factory):
    # Before the fix 30 such requests for a 60,000-machine registry held 448 MiB
    # until the relay exited.
    relay = relay_factory.start("--max-http-buffer", "16MiB", "--send-timeout", "1")
    fill_registry(relay, 40_000)
    status, body, _ = relay.get("/api/machines")  # read at once: holds nothing afterwards
    assert status == 200
    stalled = [get_and_stall(relay, "/api/machines") for _ in range(30)]
    statuses = [status_of(sock) for sock in stalled]
    # Each unread answer counts twice (the body and picows's copy with the
    # headers); the relay answers 503 once another would take it past
    # --max-http-buffer, so only so many 200s can be waiting at once.
    held_each = 2 * len(body)
    assert statuses.count(200) >= 1
    assert statuses.count(503) >= 1, statuses
    assert statuses.count(200) <= 16 * MiB // held_each + 1, (statuses, len(body))
    assert set(statuses) == {200, 503}, statuses

    # Reading them frees their share again.
    for sock in stalled:
        try:
            while sock.recv(1 << 20):
                pass
        except OSError:
            pass
        sock.close()
    relay.wait_for(lambda: relay.get("/api/machines")[0] == 200, timeout=30,
                   what="/api/machines served again")


def test_kernel_drops_a_connection_that_never_reads(relay_factory):
    # TCP_USER_TIMEOUT = 2 x --send-timeout + 1 s, inherited from the listening
    # socket: before it, a client that never read its answer kept the
    # connection and the answer in the relay forever.
    relay = relay_factory.start("--send-timeout", "1")
    # ~7 MB: more than the kernel's send buffer takes (4 MiB at most here), so
    # the relay itself holds the rest and cannot just hand it off and close.
    fill_registry(relay, 60_000)
    sock = get_and_stall(relay, "/api/machines")
    assert status_of(sock) == 200
    client_port = sock.getsockname()[1]
    assert relay_holds(relay, client_port), "the relay should still be sending the answer"
    relay.wait_for(lambda: not relay_holds(relay, client_port), timeout=30,
                   what="the relay to drop the stalled connection")
    sock.close()
