"""What clients send, judged by RFC 6455 over a raw socket (both backends).

Each test does the opening handshake by hand, reads the relay's ``initial``,
then writes masked frames byte by byte as a client would, including the
broken ones no client library will send, and checks the relay's answer: the
close code it puts on the wire and that it then closes the connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

import orjson
import pytest

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TIMEOUT = 5.0
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Close codes an endpoint may send (RFC 6455 §7.4.1): never 1005, 1006, 1015, 0 or >= 5000.
WIRE_CODES = {*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)}


class RawClient:
    """A WebSocket client that writes whatever frames it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, relay) -> RawClient:  # type: ignore[no-untyped-def]
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET /ws/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n" % (relay.port, key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head
        client = cls(reader, writer)
        opcode, payload = await client.recv()
        assert opcode == TEXT and orjson.loads(payload)["type"] == "initial"
        return client

    def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> None:
        """One masked frame; ``rsv`` is the three reserved bits (0-7)."""
        head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def recv(self) -> tuple[int, bytes]:
        """The next frame from the relay (unfragmented, unmasked, as the relay sends them)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        assert first & 0x80 and not first & 0x70, f"relay frame header {first:#x}"
        assert not second & 0x80, "the relay masked a frame"
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def recv_data(self) -> tuple[int, bytes]:
        """The next frame that is not one of the relay's JSON pings."""
        while True:
            opcode, payload = await self.recv()
            if opcode == TEXT and orjson.loads(payload).get("type") == "ping":
                continue
            return opcode, payload

    async def expect_close(self) -> int:
        """The code of the relay's CLOSE (it must come next), then the end of the connection."""
        opcode, payload = await self.recv_data()
        assert opcode == CLOSE, (opcode, payload)
        assert len(payload) >= 2, "a close frame without a code"
        code = int.from_bytes(payload[:2], "big")
        assert code in WIRE_CODES, f"close code {code} is not allowed on the wire"
        payload[2:].decode("utf-8")  # the reason is valid UTF-8
        try:
            rest = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        except ConnectionResetError:
            # The relay closed with frames of ours still unread (sent after the
            # bad one), so its kernel answered them with a reset: closed too.
            rest = b""
        assert rest == b"", f"data after the close frame: {rest[:64]!r}"
        return code

    def close(self) -> None:
        self.writer.close()


async def rejected(relay, *frames: tuple[int, bytes, dict[str, object]]) -> int:  # type: ignore[no-untyped-def]
    client = await RawClient.connect(relay)
    try:
        for opcode, payload, kwargs in frames:
            client.send(opcode, payload, **kwargs)  # type: ignore[arg-type]
        return await client.expect_close()
    finally:
        client.close()


def frame(opcode: int, payload: bytes = b"", **kwargs: object) -> tuple[int, bytes, dict[str, object]]:
    return opcode, payload, kwargs


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


# -- protocol errors: 1002 --------------------------------------------------------------------

@pytest.mark.parametrize("rsv", [4, 2, 1, 7])
async def test_reserved_bits_fail_the_connection(relay, rsv):
    assert await rejected(relay, frame(TEXT, b'{"type":"pong"}', rsv=rsv)) == 1002


async def test_reserved_bits_on_a_ping_fail_the_connection(relay):
    assert await rejected(relay, frame(PING, b"p", rsv=4)) == 1002


@pytest.mark.parametrize("fin", [True, False])
async def test_continuation_with_nothing_to_continue(relay, fin):
    assert await rejected(relay, frame(CONT, b"orphan", fin=fin), frame(TEXT, b"hello")) == 1002


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_new_message_inside_a_fragmented_one(relay, opcode):
    assert await rejected(relay, frame(TEXT, b"frag", fin=False), frame(opcode, b"new")) == 1002


@pytest.mark.parametrize("opcode", [3, 7, 0xB, 0xF])
async def test_reserved_opcodes(relay, opcode):
    assert await rejected(relay, frame(opcode, b"x")) == 1002


async def test_fragmented_ping(relay):
    assert await rejected(relay, frame(PING, b"p", fin=False)) == 1002


async def test_ping_over_125_bytes(relay):
    assert await rejected(relay, frame(PING, b"x" * 126)) == 1002


# -- invalid UTF-8: 1007 --------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"\xff", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                  b'{"type":"refresh"}\xc0\xaf', b"\xce\xba\xe1"])
async def test_invalid_utf8_text(relay, data):
    assert await rejected(relay, frame(TEXT, data)) == 1007


async def test_invalid_utf8_fails_fast_in_a_fragmented_message(relay):
    # The message is unfinished: the relay must not wait for its end.
    assert await rejected(relay, frame(TEXT, "κόσμε".encode(), fin=False),
                          frame(CONT, b"\xf4\x90\x80\x80", fin=False)) == 1007


async def test_unfinished_code_point_at_the_end_of_a_message(relay):
    assert await rejected(relay, frame(TEXT, b"ok\xce", fin=False), frame(CONT, b"")) == 1007


async def test_invalid_utf8_in_a_long_fragmented_message(relay):
    assert await rejected(relay, frame(TEXT, b"x" * 5000, fin=False),
                          frame(CONT, b"y" * 5000, fin=False), frame(CONT, b"\xff")) == 1007


async def test_invalid_utf8_close_reason(relay):
    assert await rejected(relay, frame(CLOSE, close_payload(1000, b"\xed\xa0\x80"))) == 1007


# -- the closing handshake --------------------------------------------------------------------

@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
async def test_valid_close_codes_are_echoed(relay, code):
    assert await rejected(relay, frame(CLOSE, close_payload(code, "bye κ".encode()))) == code


async def test_close_without_a_code_is_answered_1000(relay):
    assert await rejected(relay, frame(CLOSE)) == 1000


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
async def test_invalid_close_codes(relay, code):
    assert await rejected(relay, frame(CLOSE, close_payload(code))) == 1002


async def test_one_byte_close_payload(relay):
    assert await rejected(relay, frame(CLOSE, b"\x03")) == 1002


async def test_close_inside_a_fragmented_message_is_answered(relay):
    assert await rejected(relay, frame(TEXT, b"half", fin=False),
                          frame(CLOSE, close_payload(1001))) == 1001


# -- valid input is acted on --------------------------------------------------------------

async def test_fragmented_refresh_gets_a_second_initial(relay):
    client = await RawClient.connect(relay)
    try:
        client.send(TEXT, b'{"type":', fin=False)
        client.send(PING, b"between")
        client.send(CONT, b'"refr', fin=False)
        client.send(CONT, b'esh"}')
        assert await client.recv_data() == (PONG, b"between")
        opcode, payload = await client.recv_data()
        assert opcode == TEXT and orjson.loads(payload)["type"] == "initial"
    finally:
        client.close()


async def test_ping_gets_a_pong_with_the_same_payload(relay):
    client = await RawClient.connect(relay)
    try:
        for payload in (b"", b"abc", bytes(range(125))):
            client.send(PING, payload)
            assert await client.recv_data() == (PONG, payload)
    finally:
        client.close()


async def test_valid_input_keeps_the_connection(relay):
    """Binary, pongs, long and split text: none is a reason to close; events still flow."""
    client = await RawClient.connect(relay)
    try:
        client.send(BINARY, b"\xff\x00")
        client.send(BINARY, b"\xff", fin=False)
        client.send(CONT, b"\xfe")
        client.send(PONG, b"unasked")
        client.send(TEXT, "κόσμε".encode()[:3], fin=False)
        client.send(CONT, "κόσμε".encode()[3:])
        client.send(TEXT, b"x" * 60_000, fin=False)  # frames stay under --max-client-frame
        client.send(CONT, b"x" * 60_000)
        client.send(TEXT, b"")
        client.send(PING, b"sync")
        assert await client.recv_data() == (PONG, b"sync")
        relay.emit("state_change", "r1", state="up")
        opcode, payload = await client.recv_data()
        assert opcode == TEXT and orjson.loads(payload)["machine_id"] == "r1"
    finally:
        client.close()


async def test_a_failed_client_does_not_disturb_others(relay):
    polite = await RawClient.connect(relay)
    try:
        assert await rejected(relay, frame(TEXT, b"\xff")) == 1007
        relay.emit("state_change", "p1", state="fine")
        opcode, payload = await polite.recv_data()
        assert opcode == TEXT and orjson.loads(payload)["state"] == "fine"
    finally:
        polite.close()
    assert relay.proc.poll() is None
