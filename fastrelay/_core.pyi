"""Typed surface of the compiled hub (fastrelay/_core.pyx); same API as fastrelay._core_py."""

import asyncio
import socket
from collections import OrderedDict
from typing import Any

from .clients import Client, Clients
from .listener import Listener
from .registry import Registry

__all__ = ["Client", "Hub", "frame_text"]

def frame_text(payload: bytes) -> bytes: ...

class Hub:
    backend: str
    max_datagram: int
    max_depth: int
    batch_cap: int
    registry: Registry
    peers: Clients
    clients: set[Client]
    stalled: set[Client]
    accepted: int
    relayed: int
    frames_sent: int
    bytes_sent: int
    batches: int
    rejects: dict[str, int]
    batch_histogram: list[int]
    write_delay: float
    def __init__(
        self,
        *,
        max_datagram: int = ...,
        max_client_buffer: int = ...,
        max_machines: int = ...,
        max_depth: int = ...,
        max_snapshots: int = ...,
        batch_cap: int = ...,
        write_delay: float = ...,
    ) -> None: ...
    @property
    def machines(self) -> OrderedDict[str, dict[str, Any]]: ...
    @property
    def evicted(self) -> int: ...
    @property
    def closed(self) -> dict[str, int]: ...
    def attach(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None: ...
    def detach(self) -> None: ...
    def drain(self) -> int: ...
    def flush(self) -> None: ...
    def broadcast(self, payload: bytes) -> None: ...
    def make_listener(self) -> Listener: ...
    def close_client(self, client: Client, code: int, reason: bytes, why: str) -> None: ...
    def abort_client(self, client: Client, why: str) -> None: ...
    def snapshot_payload(self) -> bytes: ...
    def machines_payload(self) -> bytes: ...
    def stats(self) -> dict[str, Any]: ...
