"""The picows listener shared by both hubs (provisional: frame checks land with wsproto)."""

from __future__ import annotations

import time

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from .clients import Client, Clients

__all__ = ["Listener"]


class Listener(WSListener):
    def __init__(self, peers: Clients) -> None:
        self.peers = peers
        self.client: Client | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.client = self.peers.add_client(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        client = self.client
        if client is None:
            return
        client.last_seen = time.monotonic()
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            self.peers.on_client_text(client, frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.PING:
            self.peers.on_client_ping(client, frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.CLOSE:
            try:
                code = int(frame.get_close_code().value)
            except ValueError:
                code = 1000
            self.peers.on_client_close(client, 1000 if code in (1005, 1006) else code)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.client is not None:
            self.peers.remove_client(self.client)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.on_paused()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.on_drained()
