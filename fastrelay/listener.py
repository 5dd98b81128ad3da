"""The picows listener shared by both hubs: one per connection.

Every frame goes through the connection's :class:`~fastrelay.wsproto.FrameChecker`
before the hub acts on it, because picows hands frames over unchecked.
picows must run with ``enable_auto_pong=False``: PINGs reach the checker, and
the hub answers them behind what the client is already owed.
"""

from __future__ import annotations

import time

from picows import WSFrame, WSListener, WSTransport

from .clients import JOIN_ALL, Client, Clients, JoinRequest
from .wsproto import CLOSE, FAIL, PING, TEXT, FrameChecker

__all__ = ["Listener"]

_monotonic = time.monotonic


class Listener(WSListener):
    def __init__(self, peers: Clients, join: JoinRequest = JOIN_ALL) -> None:
        self.peers = peers
        self.join = join
        self.client: Client | None = None
        self.checker = FrameChecker()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.client = self.peers.add_client(transport, self.join)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        client = self.client
        if client is None:
            return
        client.last_seen = _monotonic()
        checker = self.checker
        # picows's stub calls WSMsgType an Enum; at run time it is an IntEnum.
        verdict = checker.feed(frame.msg_type, frame.fin,  # type: ignore[arg-type]
                               frame.rsv1 or frame.rsv2 or frame.rsv3, frame.get_payload_as_bytes())
        if verdict is TEXT:
            self.peers.on_client_text(client, checker.payload)
        elif verdict is PING:
            self.peers.on_client_ping(client, checker.payload)
        elif verdict is CLOSE:
            self.peers.on_client_close(client, checker.code)
        elif verdict is FAIL:
            self.peers.fail_client(client, checker.code, checker.reason)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.client is not None:
            self.peers.remove_client(self.client)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.on_paused()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.on_drained()
