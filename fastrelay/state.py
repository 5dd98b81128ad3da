"""--state-dir: the registry, the stream's position and its history across restarts.

Two files, each written atomically (temporary file, fsync, rename, fsync of
the directory), so a crash at any moment leaves either the old file or the
new one, never half of one:

- ``state.json``: ``{"version", "epoch", "seq", "clean", "machines"}``, written
  every ``--state-interval`` seconds while the registry changes, with
  ``clean`` false, and once more on clean shutdown with ``clean`` true;
- ``history.bin``: on clean shutdown only, a header line
  ``{"version", "epoch", "last_seq", "count"}`` then the history's frames
  exactly as they were sent.

At start a clean record continues its epoch and seq, so clients resume across
the restart; then ``clean`` is set false at once, so that a crash later is
never mistaken for a clean stop. Without a clean record the registry is
restored and a new epoch starts: a resume must never skip events.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Saved", "StateDir"]

log = logging.getLogger("fastrelay")

_VERSION = 1
_STATE = "state.json"
_HISTORY = "history.bin"


@dataclass
class Saved:
    """What a state directory gave back at start."""

    machines: list[dict[str, Any]] = field(default_factory=list)
    #: The epoch to continue, or None: a new one starts.
    epoch: str | None = None
    seq: int = 0
    #: The frames of events ``seq - len(frames) + 1`` .. ``seq``.
    frames: list[bytes] = field(default_factory=list)
    #: Why nothing (or only the registry) was taken up, for the start-up log line.
    note: str = ""


class StateDir:
    """Reads and writes one relay's state files in ``path`` (created when missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.saves = 0
        self.failures = 0

    def prepare(self) -> None:
        """Create the directory, and check that it can be written (raises OSError)."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-")
        probe.close()

    # -- loading --------------------------------------------------------------------

    def load(self) -> Saved:
        """What the files hold; damaged or missing files give a fresh start, never an error."""
        try:
            with open(os.path.join(self.path, _STATE), "rb") as f:
                state = orjson.loads(f.read())
        except FileNotFoundError:
            return Saved(note="no saved state")
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("--state-dir %s: %s unreadable (%s); starting fresh", self.path, _STATE, exc)
            return Saved(note="saved state unreadable")
        if type(state) is not dict or state.get("version") != _VERSION:
            log.warning("--state-dir %s: %s is not a state this version wrote; starting fresh",
                        self.path, _STATE)
            return Saved(note="saved state of another version")
        machines = state.get("machines")
        saved = Saved(machines=machines if type(machines) is list else [])
        epoch, seq = state.get("epoch"), state.get("seq")
        if state.get("clean") is not True or type(epoch) is not str or type(seq) is not int:
            saved.note = "the last stop was not clean: registry restored, new epoch"
            return saved
        saved.epoch, saved.seq = epoch, seq
        saved.frames = self._load_history(epoch, seq)
        saved.note = f"clean restart: epoch {epoch} continues after seq {seq}"
        return saved

    def _load_history(self, epoch: str, seq: int) -> list[bytes]:
        try:
            with open(os.path.join(self.path, _HISTORY), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("--state-dir %s: %s unreadable (%s); history starts empty",
                        self.path, _HISTORY, exc)
            return []
        head_end = data.find(b"\n")
        try:
            head = orjson.loads(data[:head_end]) if head_end > 0 else None
        except orjson.JSONDecodeError:
            head = None
        if (type(head) is not dict or head.get("version") != _VERSION or head.get("epoch") != epoch
                or head.get("last_seq") != seq or type(head.get("count")) is not int):
            log.warning("--state-dir %s: %s does not match the saved position; history starts "
                        "empty", self.path, _HISTORY)
            return []
        frames = _split_frames(memoryview(data)[head_end + 1:])
        if frames is None or len(frames) != head["count"]:
            log.warning("--state-dir %s: %s is damaged; history starts empty", self.path, _HISTORY)
            return []
        return frames

    # -- saving ---------------------------------------------------------------------

    def encode_state(self, machines: list[dict[str, Any]], epoch: str, seq: int,
                     clean: bool) -> bytes:
        """``state.json``'s bytes (built on the loop, written anywhere)."""
        return orjson.dumps({"version": _VERSION, "epoch": epoch, "seq": seq, "clean": clean,
                             "machines": machines})

    def write_state(self, data: bytes) -> bool:
        """Write ``state.json`` atomically; False (logged, counted) when it could not be."""
        return self._write(_STATE, [data])

    def write_history(self, epoch: str, last_seq: int, frames: list[bytes]) -> bool:
        """Write ``history.bin`` atomically; False (logged, counted) when it could not be."""
        head = orjson.dumps({"version": _VERSION, "epoch": epoch, "last_seq": last_seq,
                             "count": len(frames)}) + b"\n"
        return self._write(_HISTORY, [head, *frames])

    def _write(self, name: str, parts: list[bytes]) -> bool:
        target = os.path.join(self.path, name)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as f:
                f.writelines(parts)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.failures += 1
            log.error("--state-dir %s: could not save %s: %s", self.path, name, exc)
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self.saves += 1
        return True


def _split_frames(data: memoryview) -> list[bytes] | None:
    """The unmasked text frames laid end to end in ``data``; None if it is not that."""
    frames: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 2 or data[pos] != 0x81:
            return None
        n = data[pos + 1]
        head = 2
        if n == 126:
            head = 4
            n = int.from_bytes(data[pos + 2:pos + 4], "big")
        elif n == 127:
            head = 10
            n = int.from_bytes(data[pos + 2:pos + 10], "big")
        if pos + head + n > end:
            return None
        frames.append(bytes(data[pos:pos + head + n]))
        pos += head + n
    return frames
