"""Fan-out at scale: many clients, bursts, every client complete and in order."""

from __future__ import annotations

import asyncio
import sys
import textwrap

from clients import picows_client, raise_fd_limit

EMIT_N = textwrap.dedent("""
    import sys
    from fastrelay import Emitter
    emitter = Emitter(sys.argv[1])
    ok = sum(emitter.emit("burst", "fan", n=i, pad="p" * 64) for i in range(int(sys.argv[2])))
    flushed = emitter.flush(60)
    print(ok, sum(emitter.dropped.values()), flushed)
""")


async def emit_in_subprocess(socket_path: str, n: int) -> tuple[int, int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EMIT_N, socket_path, str(n), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    ok, dropped, flushed = out.decode().split()
    return int(ok), int(dropped), flushed


async def test_thousand_clients_each_receive_a_burst_of_thousand(relay):
    raise_fd_limit()
    clients = []
    for _ in range(10):
        clients += await asyncio.gather(*(picows_client(relay.url, expected=1001)
                                          for _ in range(100)))
    await relay.until_health(lambda h: h["clients"] == 1000, 30, "1000 clients")
    assert await emit_in_subprocess(relay.socket_path, 1000) == (1000, 0, "True")
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), 120)
    expected = list(range(1000))
    for client in clients:
        assert client.messages[0]["type"] == "initial"
        assert [e["n"] for e in client.events()] == expected
    health = relay.health()
    assert health["events"]["relayed"] == 1000 * 1000
    assert health["closed"] == dict.fromkeys(health["closed"], 0)
    for client in clients:
        client.transport.disconnect()
