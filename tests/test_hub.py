"""The hub in process, over both implementations: its primitives byte for byte, and its
edge cases (splice, eviction, natural batching, the buffer bound) through a real
RelayServer on loopback with real clients.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType

import orjson
import pytest
import websockets

from fastrelay import _core_py
from fastrelay.server import RelayServer

MAX_DATAGRAM = 4096


# -- the primitives: the C twin and the Python twin make the same bytes -----------------


def _primitives() -> list[ModuleType]:
    modules = [_core_py]
    if not os.environ.get("FASTRELAY_NO_EXTENSIONS"):
        from fastrelay import _core

        modules.append(_core)
    return modules


@pytest.fixture(params=_primitives(), ids=lambda m: "cython" if m.__name__.endswith("_core")
                else "python")
def primitives(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


@pytest.fixture
def dgram_pair() -> tuple[socket.socket, socket.socket]:
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setblocking(False)
    yield receiver, sender
    receiver.close()
    sender.close()


def _unframe(data: bytes) -> list[bytes]:
    """Split unmasked server text frames back into payloads, checking every header."""
    payloads = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x81, data[pos:pos + 2]
        n = data[pos + 1]
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos:pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(data[pos:pos + 8], "big")
            pos += 8
        payloads.append(data[pos:pos + n])
        pos += n
    assert pos == len(data)
    return payloads


def test_receive_frame_and_splice(primitives, dgram_pair):
    receiver, sender = dgram_pair
    batch = primitives.Batch(MAX_DATAGRAM)
    datagrams = [
        b'{"type":"state_change","machine_id":"m","state":"b"}',
        b'{"type":"state_change","state":"c"} \n\t',  # whitespace after the object
        b"x" * (MAX_DATAGRAM + 1),  # too large: reported, never cut
        b'[[[{"a":[1]}]]]',
        b"",
        b'{"type":"t","pad":"' + b"y" * 200 + b'"}',  # 126 bytes or more: a two-byte length
    ]
    for datagram in datagrams:
        sender.send(datagram)
    assert batch.receive() == 0  # not attached yet
    batch.attach(receiver)
    assert batch.receive() == len(datagrams)
    assert [batch.size(i) for i in range(len(datagrams))] == [
        len(datagrams[0]), len(datagrams[1]), -1, len(datagrams[3]), 0, len(datagrams[5])]
    assert bytes(batch.view(0)) == batch.raw(0) == datagrams[0]
    assert orjson.loads(batch.view(0))["state"] == "b"
    assert batch.brackets(3) == 5
    batch.frame(0, 7, b'"a"')
    batch.frame(1, 8, b"null")
    for i in (2, 3, 4):  # over-size, an array, empty: never framed
        with pytest.raises(ValueError):
            batch.frame(i, 9)
    batch.frame(5, 18446744073709551615)  # the largest seq there is
    batch.add(b'{"type":"ping"}')
    assert batch.framed == 4
    data = batch.take()
    assert batch.nbytes == len(data)
    expected = [
        b'{"type":"state_change","machine_id":"m","state":"b","previous_state":"a","seq":7}',
        b'{"type":"state_change","state":"c","previous_state":null,"seq":8}',
        datagrams[5][:-1] + b',"seq":18446744073709551615}', b'{"type":"ping"}',
    ]
    assert _unframe(data) == expected
    assert [_unframe(frame) for frame in batch.frames()] == [[e] for e in expected]
    assert b"".join(batch.frames()) == data
    batch.clear()
    assert (batch.framed, batch.nbytes, batch.take(), batch.frames()) == (0, 0, b"", [])
    assert batch.receive() == 0  # the socket is empty


def test_a_batch_larger_than_the_slots_takes_several_receives(primitives, dgram_pair):
    receiver, sender = dgram_pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    batch = primitives.Batch(MAX_DATAGRAM)
    batch.attach(receiver)
    sent = [orjson.dumps({"type": "t", "n": i}) for i in range(primitives.SLOTS + 5)]
    for datagram in sent:
        sender.send(datagram)
    got = []
    while n := batch.receive():
        assert n <= primitives.SLOTS
        got += [batch.raw(i) for i in range(n)]
        for i in range(n):
            batch.frame(i, len(got) - n + i + 1)
    assert got == sent
    # Frames accumulate across receives.
    assert _unframe(batch.take()) == [d[:-1] + b',"seq":%d}' % (i + 1) for i, d in enumerate(sent)]
    assert len(batch.frames()) == len(sent)


def test_the_buffer_grows_past_its_first_capacity(primitives, dgram_pair):
    receiver, sender = dgram_pair
    batch = primitives.Batch(70_000)
    batch.attach(receiver)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    big = b'{"type":"t","pad":"' + b"p" * 66_000 + b'"}'
    sender.send(big)
    sender.send(big)
    assert batch.receive() == 2
    batch.frame(0, 1)
    batch.frame(1, 2, b'"s"')
    first, second = _unframe(batch.take())
    assert first == big[:-1] + b',"seq":1}'
    assert second == big[:-1] + b',"previous_state":"s","seq":2}'


def test_twins_agree_byte_for_byte(dgram_pair):
    modules = _primitives()
    if len(modules) < 2:
        pytest.skip("pure build: one implementation only")
    receiver, sender = dgram_pair
    outputs = []
    for module in modules:
        batch = module.Batch(MAX_DATAGRAM)
        batch.attach(receiver)
        for payload in (b'{"type":"state_change"}', b'{"a":1}  ', b'{"z":"' + b"z" * 300 + b'"}',
                        b"{}", b'{"b":2}\r\n'):
            sender.send(payload)
        assert batch.receive() == 5
        for i in range(5):
            batch.frame(i, 10**i, orjson.dumps(i) if i % 2 else None)
        batch.add(b'{"type":"ping"}')
        outputs.append((batch.take(), batch.frames()))
    assert outputs[0] == outputs[1]


# -- the hub behind a real server ----------------------------------------------------------


@pytest.fixture
async def start_server(backend: str, tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    servers: list[RelayServer] = []

    async def start(**options: object) -> RelayServer:
        server = RelayServer(backend=backend, host="127.0.0.1", port=0,
                             socket_path=str(tmp_path / f"hub{len(servers)}.sock"),
                             log_dir=str(tmp_path / "logs"), ping_interval=30.0, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0.2)


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
                     what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _sender(server: RelayServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(server.config.socket_path)
    sock.setblocking(False)
    return sock


async def _send(sock: socket.socket, payload: bytes) -> None:
    """Send one datagram; the relay shares this thread, so a full queue waits for its loop."""
    while True:
        try:
            sock.send(payload)
            return
        except BlockingIOError:
            await asyncio.sleep(0.001)


async def _joined(server: RelayServer, **kwargs: object) -> websockets.ClientConnection:
    before = server.hub.stats().clients
    ws = await websockets.connect(server.url, max_size=None, **kwargs)
    initial = orjson.loads(await ws.recv())
    assert initial["type"] == "initial"
    await wait_until(lambda: server.hub.stats().clients == before + 1, what="client joined")
    return ws


async def test_splice_adds_the_registrys_previous_state(start_server, backend):
    server = await start_server()
    ws = await _joined(server)
    sender = _sender(server)
    sender.send(b'{"type":"state_change","machine_id":"m","state":"a"}')
    sender.send(b'{"type":"state_change","machine_id":"m","state":"b"}\n')
    sender.send(b'{"type":"state_change","machine_id":"m","state":"c","previous_state":"own"}')
    sender.send(b'{"type":"log","machine_id":"m"}')
    got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(4)]
    assert [e.get("previous_state", "absent") for e in got] == [None, "a", "own", "absent"]
    entry = orjson.loads(server.hub.machines_payload())[0]
    assert (entry["current_state"], entry["previous_state"]) == ("c", "own")
    await ws.close()
    sender.close()


async def test_eviction_forgets_the_least_recently_active(start_server, backend):
    server = await start_server(max_machines=3)
    sender = _sender(server)
    for name in ("a", "b", "c", "d"):
        sender.send(orjson.dumps({"type": "state_change", "machine_id": name, "state": "s"}))
    sender.send(b'{"type":"heartbeat","machine_id":"b"}')  # b is active again: c is next out
    sender.send(orjson.dumps({"type": "state_change", "machine_id": "e", "state": "s"}))
    await wait_until(lambda: server.hub.stats().accepted == 6, what="six accepted")
    stats = server.hub.stats()
    assert (stats.machines, stats.evicted) == (3, 2)
    ws = await websockets.connect(server.url)
    initial = orjson.loads(await ws.recv())
    assert [m["id"] for m in initial["machines"]] == ["d", "b", "e"]
    await ws.close()
    sender.close()


async def test_what_arrives_together_goes_out_in_one_batch(start_server, backend):
    server = await start_server()
    ws = await _joined(server)
    sender = _sender(server)
    before = server.hub.stats()
    # Sent while the loop is busy with this coroutine: the hub finds them all at
    # once and writes them with one send() per client, without any window.
    for i in range(8):
        sender.send(orjson.dumps({"type": "tick", "n": i}))
    got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5))["n"] for _ in range(8)]
    assert got == list(range(8))
    after = server.hub.stats()
    assert after.batches - before.batches == 1
    assert after.batch_histogram[3] - before.batch_histogram[3] == 1  # the 5..8 bucket
    assert after.relayed - before.relayed == 8
    # A lone event after that goes out by itself at once.
    sender.send(b'{"type":"tick","n":8}')
    assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["n"] == 8
    assert server.hub.stats().batches - after.batches == 1
    await ws.close()
    sender.close()


def _silent_client(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


async def test_a_client_over_its_bound_is_closed_and_others_get_everything(start_server, backend):
    bound = 64 * 1024
    server = await start_server(max_client_buffer=bound)
    reader = await _joined(server)
    silent = _silent_client(server.port)
    await wait_until(lambda: server.hub.stats().clients == 2, what="silent client joined")
    sender = _sender(server)
    event_size = 2000
    n = 0
    worst = 0
    received: list[int] = []

    async def read() -> None:
        async for message in reader:
            received.append(orjson.loads(message)["n"])

    task = asyncio.create_task(read())
    # Emit until the silent client has been dropped, a few events per turn of the
    # loop, watching the relay's own accounting of what it holds for clients.
    while server.hub.stats().closed["slow"] == 0:
        assert n < 100_000, "the silent client was never closed"
        for _ in range(4):
            await _send(sender, orjson.dumps({"type": "tick", "n": n, "pad": "x" * event_size}))
            n += 1
        await asyncio.sleep(0)
        worst = max(worst, server.hub.stats().owed_bytes_max)
    # What one client may be owed: its bound, plus the batch that crossed it.
    assert worst <= bound + 4 * (event_size + 100)
    for i in range(10):
        await _send(sender, orjson.dumps({"type": "tick", "n": n + i}))
    n += 10
    await wait_until(lambda: len(received) == n, what="the reader has every event")
    assert received == list(range(n))
    stats = server.hub.stats()
    assert stats.closed["slow"] == 1 and stats.clients == 1
    task.cancel()
    await reader.close()
    silent.close()
    sender.close()
