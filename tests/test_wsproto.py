"""The client-frame checker on its own: RFC 6455 rules, no sockets."""

from __future__ import annotations

import pytest

from fastrelay.wsproto import (
    CLOSE,
    FAIL,
    IGNORE,
    MAX_MESSAGE,
    PING,
    TEXT,
    TOO_LONG,
    FrameChecker,
    valid_close_code,
)

CONT, TEXT_OP, BINARY, CLOSE_OP, PING_OP, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def failed(checker: FrameChecker, code: int) -> bool:
    return checker.code == code and bool(checker.reason)


# -- data frames -------------------------------------------------------------------------

def test_whole_text_message() -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, True, False, b'{"type":"refresh"}') is TEXT
    assert checker.payload == b'{"type":"refresh"}'
    assert checker.feed(TEXT_OP, True, False, "κόσμε".encode()) is TEXT
    assert checker.payload == "κόσμε".encode()


def test_fragmented_text_is_assembled_with_control_frames_between() -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, b'{"type"') is IGNORE
    assert checker.feed(PING_OP, True, False, b"hi") is PING
    assert checker.payload == b"hi"
    assert checker.feed(CONT, False, False, b':"ref') is IGNORE
    assert checker.feed(PONG, True, False, b"") is IGNORE
    assert checker.feed(CONT, True, False, b'resh"}') is TEXT
    assert checker.payload == b'{"type":"refresh"}'
    # and the next message starts afresh
    assert checker.feed(TEXT_OP, False, False, b"a") is IGNORE
    assert checker.feed(CONT, True, False, b"b") is TEXT
    assert checker.payload == b"ab"


def test_code_point_split_across_frames_is_valid() -> None:
    data = "κόσμε".encode()
    checker = FrameChecker()
    for i in range(len(data) - 1):
        assert checker.feed(TEXT_OP if i == 0 else CONT, False, False, data[i:i + 1]) is IGNORE
    assert checker.feed(CONT, True, False, data[-1:]) is TEXT
    assert checker.payload == data


def test_empty_text_message() -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, True, False, b"") is TEXT
    assert checker.payload == b""
    assert checker.feed(TEXT_OP, False, False, b"") is IGNORE
    assert checker.feed(CONT, True, False, b"") is TEXT
    assert checker.payload == b""


def test_long_text_is_checked_but_not_kept() -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, True, False, b"x" * MAX_MESSAGE) is TEXT
    assert checker.feed(TEXT_OP, True, False, b"x" * (MAX_MESSAGE + 1)) is TOO_LONG
    checker.payload = b""
    assert checker.feed(TEXT_OP, False, False, b"x" * MAX_MESSAGE) is IGNORE
    assert checker.feed(CONT, False, False, b"x" * MAX_MESSAGE) is IGNORE
    assert checker._parts is None  # nothing more is held for this message
    assert checker.feed(CONT, True, False, b"x") is TOO_LONG
    assert checker.payload == b""
    # still validated to the end after it stopped being kept
    assert checker.feed(TEXT_OP, False, False, b"x" * (MAX_MESSAGE + 1)) is IGNORE
    assert checker.feed(CONT, True, False, b"\xff") is FAIL
    assert failed(checker, 1007)


def test_max_message_is_a_parameter() -> None:
    checker = FrameChecker(max_message=3)
    assert checker.feed(TEXT_OP, True, False, b"abc") is TEXT
    assert checker.feed(TEXT_OP, True, False, b"abcd") is TOO_LONG
    assert checker.feed(TEXT_OP, False, False, b"ab") is IGNORE
    assert checker.feed(CONT, True, False, b"cd") is TOO_LONG


def test_binary_is_framed_then_ignored() -> None:
    checker = FrameChecker()
    assert checker.feed(BINARY, True, False, b"\xff\x00") is IGNORE
    assert checker.feed(BINARY, False, False, b"\xff") is IGNORE
    assert checker.feed(CONT, True, False, b"\xfe") is IGNORE
    assert checker.feed(TEXT_OP, True, False, b"after") is TEXT
    assert checker.feed(BINARY, False, False, b"\xff") is IGNORE
    assert checker.feed(TEXT_OP, True, False, b"inside") is FAIL
    assert failed(checker, 1002)


# -- protocol errors: 1002 ----------------------------------------------------------------

@pytest.mark.parametrize("opcode", [TEXT_OP, BINARY, CONT, CLOSE_OP, PING_OP, PONG])
def test_reserved_bits_fail(opcode: int) -> None:
    checker = FrameChecker()
    if opcode == CONT:
        checker.feed(TEXT_OP, False, False, b"a")
    assert checker.feed(opcode, True, True, b"") is FAIL
    assert failed(checker, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_fail(opcode: int) -> None:
    checker = FrameChecker()
    assert checker.feed(opcode, True, False, b"") is FAIL
    assert failed(checker, 1002)


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_with_nothing_to_continue_fails(fin: bool) -> None:
    checker = FrameChecker()
    assert checker.feed(CONT, fin, False, b"x") is FAIL
    assert failed(checker, 1002)
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, True, False, b"done") is TEXT
    assert checker.feed(CONT, fin, False, b"x") is FAIL


@pytest.mark.parametrize("first", [TEXT_OP, BINARY])
@pytest.mark.parametrize("second", [TEXT_OP, BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_new_message_inside_a_fragmented_one_fails(first: int, second: int, fin: bool) -> None:
    checker = FrameChecker()
    assert checker.feed(first, False, False, b"a") is IGNORE
    assert checker.feed(second, fin, False, b"b") is FAIL
    assert failed(checker, 1002)


@pytest.mark.parametrize("opcode", [PING_OP, PONG, CLOSE_OP])
def test_bad_control_frames_fail(opcode: int) -> None:
    checker = FrameChecker()
    assert checker.feed(opcode, False, False, b"") is FAIL
    assert failed(checker, 1002)
    checker = FrameChecker()
    assert checker.feed(opcode, True, False, b"x" * 126) is FAIL
    assert failed(checker, 1002)


def test_largest_ping_is_answered() -> None:
    checker = FrameChecker()
    assert checker.feed(PING_OP, True, False, b"x" * 125) is PING
    assert checker.payload == b"x" * 125
    assert checker.feed(PING_OP, True, False, b"") is PING
    assert checker.payload == b""


# -- invalid UTF-8: 1007 -------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b"\xce\xba\xe1\xbd", b"hello\x80", "κόσμε".encode() + b"\xed\xa0\x80edited",
])
def test_invalid_utf8_text_fails(data: bytes) -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, True, False, data) is FAIL
    assert failed(checker, 1007)


def test_invalid_utf8_fails_fast_across_frames() -> None:
    # Autobahn 6.4.1: the second frame makes the message invalid, whatever follows.
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, "κόσμε".encode()) is IGNORE
    assert checker.feed(CONT, False, False, b"\xf4\x90\x80\x80") is FAIL
    assert failed(checker, 1007)
    # 6.4.2: split inside the bad sequence; the byte that cannot follow fails at once
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, "κόσμε".encode() + b"\xf4") is IGNORE
    assert checker.feed(CONT, False, False, b"\x90") is FAIL


def test_surrogate_prefix_fails_fast() -> None:
    # CPython's incremental decoder would wait for a third byte after ED A0.
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, b"a\xed") is IGNORE
    assert checker.feed(CONT, False, False, b"\xa0") is FAIL
    assert failed(checker, 1007)
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, b"a\xed") is IGNORE
    assert checker.feed(CONT, True, False, b"\x9f\xbf") is TEXT  # U+D7FF is fine


def test_unfinished_sequence_at_the_end_fails() -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, b"ok\xce") is IGNORE
    assert checker.feed(CONT, True, False, b"") is FAIL
    assert failed(checker, 1007)


def test_invalid_utf8_in_a_long_message_still_fails() -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, True, False, b"x" * 10_000 + b"\xff") is FAIL
    assert failed(checker, 1007)


# -- closing -------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_valid_close_codes_are_echoed(code: int) -> None:
    checker = FrameChecker()
    assert checker.feed(CLOSE_OP, True, False, close_payload(code, "bye κ".encode())) is CLOSE
    assert checker.code == code


def test_close_without_a_code_is_answered_1000() -> None:
    checker = FrameChecker()
    assert checker.feed(CLOSE_OP, True, False, b"") is CLOSE
    assert checker.code == 1000


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_invalid_close_codes_fail(code: int) -> None:
    checker = FrameChecker()
    assert checker.feed(CLOSE_OP, True, False, close_payload(code)) is FAIL
    assert failed(checker, 1002)
    assert not valid_close_code(code)


def test_one_byte_close_payload_fails() -> None:
    checker = FrameChecker()
    assert checker.feed(CLOSE_OP, True, False, b"\x03") is FAIL
    assert failed(checker, 1002)


def test_invalid_utf8_close_reason_fails() -> None:
    checker = FrameChecker()
    assert checker.feed(CLOSE_OP, True, False, close_payload(1000, b"\xed\xa0\x80")) is FAIL
    assert failed(checker, 1007)


@pytest.mark.parametrize("end", ["close", "fail"])
def test_nothing_counts_after_the_end(end: str) -> None:
    checker = FrameChecker()
    assert checker.feed(TEXT_OP, False, False, b"partial") is IGNORE
    if end == "close":
        assert checker.feed(CLOSE_OP, True, False, close_payload(1001)) is CLOSE
    else:
        assert checker.feed(CONT, True, True, b"x") is FAIL
    code = checker.code
    for frame in [(TEXT_OP, True, False, b"x"), (PING_OP, True, False, b"p"),
                  (CLOSE_OP, True, False, b""), (3, True, True, b"\xff")]:
        assert checker.feed(*frame) is IGNORE
    assert checker.code == code
    assert checker._parts is None


def test_ping_flood_keeps_no_state() -> None:
    checker = FrameChecker()
    payload = b"ping"
    for _ in range(1000):
        assert checker.feed(PING_OP, True, False, payload) is PING
        assert checker.payload is payload
    assert checker._parts == [] and checker._decoder is None
