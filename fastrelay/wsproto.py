"""What a client may send us under RFC 6455, checked frame by frame (sans I/O).

picows parses frames and hands each one over as it is: it rejects unknown
opcodes, fragmented or oversized control frames and most bad close frames,
but not reserved bits, continuation frames out of place, invalid UTF-8 in
text messages, or close codes 0, 1006 and 3000 upwards past 4999. A
:class:`FrameChecker` per connection sees every frame before the relay acts
on it and says what to do with it.

    checker = FrameChecker()
    verdict = checker.feed(opcode, fin, rsv, payload)
    if verdict is TEXT: ...            # checker.payload is the whole message
    elif verdict is PING: ...          # answer with a PONG carrying checker.payload
    elif verdict is CLOSE: ...         # answer the closing handshake with checker.code
    elif verdict is FAIL: ...          # close with checker.code and checker.reason

The verdict is a constant and its data sits on the checker, so a frame costs
no allocation beyond its payload (a flood of pings or pongs stays cheap).
"""

from __future__ import annotations

import codecs
import enum

__all__ = [
    "CLOSE",
    "FAIL",
    "IGNORE",
    "MAX_MESSAGE",
    "PING",
    "TEXT",
    "TOO_LONG",
    "FrameChecker",
    "Verdict",
    "valid_close_code",
]

#: Longest text message kept for the relay: it only acts on small control
#: messages (``pong``, ``refresh``), so anything longer is checked and dropped.
MAX_MESSAGE = 4096

# Opcodes (RFC 6455 §5.2).
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Close codes (RFC 6455 §7.4.1).
_NORMAL, _PROTOCOL_ERROR, _INVALID_DATA = 1000, 1002, 1007


class Verdict(enum.IntEnum):
    """What to do with a frame."""

    #: Nothing: a pong, a binary message, part of a message, anything after a close.
    IGNORE = 0
    #: A complete, valid text message of at most ``max_message`` bytes: ``checker.payload``.
    TEXT = 1
    #: A complete, valid text message longer than ``max_message``: ignore it.
    TOO_LONG = 2
    #: A PING: answer with a PONG carrying ``checker.payload``.
    PING = 3
    #: The client started the closing handshake: answer with ``checker.code`` and close.
    CLOSE = 4
    #: The client broke the protocol: close with ``checker.code`` (1002 or 1007)
    #: and ``checker.reason``. Every later frame is IGNORE.
    FAIL = 5


# Module constants: cheaper to reach than class attributes on the hot path.
IGNORE, TEXT, TOO_LONG, PING, CLOSE, FAIL = (
    Verdict.IGNORE, Verdict.TEXT, Verdict.TOO_LONG, Verdict.PING, Verdict.CLOSE, Verdict.FAIL)

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def valid_close_code(code: int) -> bool:
    """True for a code a client may send in a CLOSE frame.

    The codes RFC 6455 §7.4.1 and the IANA registry define for use on the wire
    (1004-1006 and 1015 are reserved for reporting, never sent), and 3000-4999
    for libraries and applications; like the websockets library, nothing else.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _utf8(data: bytes) -> bool:
    # Python's strict codec rejects what RFC 3629 rejects: overlong forms,
    # surrogates, code points past U+10FFFF. isascii() spares the decode for
    # the JSON clients send.
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class FrameChecker:
    """The frames of one connection, in order; see the module docstring.

    ``feed`` never raises on anything a client can send.
    """

    __slots__ = ("max_message", "payload", "code", "reason",
                 "_opcode", "_parts", "_size", "_decoder", "_done")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        #: The TEXT message or the PING payload of the last verdict.
        self.payload = b""
        #: The close code of the last CLOSE or FAIL verdict.
        self.code = 0
        #: The close reason of the last FAIL verdict (short ASCII).
        self.reason = b""
        # The fragmented message in progress: its opcode (0 when none), the
        # parts kept so far (None once it is too long to keep) and their size.
        self._opcode = 0
        self._parts: list[bytes] | None = []
        self._size = 0
        # Made on the first fragmented text message: most clients never send one.
        self._decoder: codecs.IncrementalDecoder | None = None
        self._done = False

    def feed(self, opcode: int, fin: bool, rsv: bool, payload: bytes) -> Verdict:
        """Check one frame (``rsv``: any reserved bit set) and say what to do with it."""
        if self._done:
            return IGNORE
        if rsv:
            # Reserved bits mean an extension, and we negotiate none (RFC 6455 §5.2).
            return self._fail(_PROTOCOL_ERROR, b"reserved bits set")
        if opcode == _TEXT and fin and not self._opcode:  # the usual case: a whole message
            if not _utf8(payload):
                return self._fail(_INVALID_DATA, b"invalid UTF-8")
            if len(payload) > self.max_message:
                return TOO_LONG
            self.payload = payload
            return TEXT
        if opcode >= _CLOSE:
            return self._control(opcode, fin, payload)
        if opcode == _CONT:
            if not self._opcode:
                return self._fail(_PROTOCOL_ERROR, b"continuation without a message")
        elif opcode == _TEXT or opcode == _BINARY:
            if self._opcode:
                return self._fail(_PROTOCOL_ERROR, b"new message inside a fragmented one")
            self._opcode = opcode
            if opcode == _TEXT:
                if self._decoder is None:
                    self._decoder = _Utf8Decoder("strict")
                else:
                    self._decoder.reset()
        else:
            return self._fail(_PROTOCOL_ERROR, b"unknown opcode")
        return self._fragment(fin, payload)

    def _fragment(self, fin: bool, payload: bytes) -> Verdict:
        """One frame of a message that began with a non-final frame."""
        text = self._opcode == _TEXT
        if text:
            assert self._decoder is not None
            # Fail fast: the decoder raises at the first byte that cannot
            # continue a valid sequence, and, with final=True, on a sequence
            # the message leaves unfinished.
            try:
                self._decoder.decode(payload, fin)
            except UnicodeDecodeError:
                return self._fail(_INVALID_DATA, b"invalid UTF-8")
            if not fin:
                # The one prefix CPython's decoder waits on although nothing
                # can complete it: ED A0..BF, the start of a UTF-16 surrogate.
                pending = self._decoder.getstate()[0]
                if len(pending) == 2 and pending[0] == 0xED and pending[1] >= 0xA0:
                    return self._fail(_INVALID_DATA, b"invalid UTF-8")
            parts = self._parts
            if parts is not None:
                self._size += len(payload)
                if self._size > self.max_message:
                    self._parts = None  # checked to the end, never kept
                else:
                    parts.append(payload)
        if not fin:
            return IGNORE
        parts = self._parts
        self._opcode = 0
        self._parts = []
        self._size = 0
        if not text:
            return IGNORE  # binary messages are framed correctly, then dropped (contract)
        if parts is None:
            return TOO_LONG
        self.payload = b"".join(parts)
        return TEXT

    def _control(self, opcode: int, fin: bool, payload: bytes) -> Verdict:
        # Control frames may come between the frames of a message (§5.4);
        # picows already refuses the fragmented and oversized ones (§5.5),
        # checked again so that the checker stands on its own.
        if not fin or len(payload) > 125:
            return self._fail(_PROTOCOL_ERROR, b"bad control frame")
        if opcode == _PING:
            self.payload = payload
            return PING
        if opcode == _PONG:
            return IGNORE
        if opcode != _CLOSE:
            return self._fail(_PROTOCOL_ERROR, b"unknown opcode")
        n = len(payload)
        if n == 0:
            code = _NORMAL  # no code given: answer 1000, never 1005 (it is not for the wire)
        elif n == 1:
            return self._fail(_PROTOCOL_ERROR, b"close frame of one byte")
        else:
            code = int.from_bytes(payload[:2], "big")
            if not valid_close_code(code):
                return self._fail(_PROTOCOL_ERROR, b"invalid close code")
            if n > 2 and not _utf8(payload[2:]):
                return self._fail(_INVALID_DATA, b"invalid UTF-8 in close reason")
        self._finish()
        self.code = code
        return CLOSE

    def _fail(self, code: int, reason: bytes) -> Verdict:
        self._finish()
        self.code = code
        self.reason = reason
        return FAIL

    def _finish(self) -> None:
        # After a close or a failure nothing the client sends matters, and
        # what it had sent of a message can go.
        self._done = True
        self._opcode = 0
        self._parts = None
        self._decoder = None
