"""RelayServer: the datagram socket, the picows endpoint and the policies around the hub."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from picows import ws_create_server

from ._backend import Hub, load_hub
from .config import ServeConfig
from .datagram import bind_datagram_socket, max_dgram_qlen, socket_inode, unlink_socket
from .heartbeat import Heartbeat
from .keepalive import Keepalive
from .logs import ensure_log_dir
from .routes import Routes
from .state import StateDir
from .watchdog import LoopMonitor, Watchdog

if TYPE_CHECKING:
    from .broker import RedisBroker

__all__ = ["BrokerUnavailable", "RelayServer", "StateDirUnavailable"]

log = logging.getLogger("fastrelay")
#: Below this, tell the operator the kernel will make emitters queue (DESIGN §4).
_LOW_QLEN = 64
#: Initial per-connection read buffer: clients send only pongs and refreshes,
#: so a small one keeps idle clients cheap (picows grows it when needed).
_READ_BUFFER = 2048


class StateDirUnavailable(OSError):
    """--state-dir cannot be created or written."""


class BrokerUnavailable(RuntimeError):
    """--broker was given but the Redis client is not installed."""


class RelayServer:
    """What ``fastrelay serve`` runs: ``await start()`` / ``await stop()``, or ``async with``.

    Keyword arguments override fields of ``config`` (see :class:`ServeConfig`).
    """

    def __init__(self, config: ServeConfig | None = None, **overrides: Any) -> None:
        config = replace(config or ServeConfig(), **overrides)
        config.validate()
        self.config = config
        self.hub: Hub = load_hub(config.backend)(
            max_datagram=config.max_datagram,
            max_client_buffer=config.max_client_buffer,
            max_machines=config.max_machines,
            max_depth=config.max_depth,
            max_snapshots=config.max_snapshots,
            batch_cap=config.batch_cap,
            write_delay=config.write_delay,
            history=config.history,
            history_bytes=config.history_bytes,
            max_feeds=config.max_filters,
        )
        self.backend: str = self.hub.backend
        self.monitor = LoopMonitor()
        self.keepalive = Keepalive(
            self.hub,
            ping_interval=config.ping_interval,
            pong_misses=config.pong_misses,
            send_timeout=config.send_timeout,
        )
        self.heartbeat = Heartbeat(self.hub, self.monitor, config.heartbeat_interval)
        self.broker = self._make_broker(config) if config.broker else None
        self.routes = Routes(self.hub, config, self.monitor, lambda: self.uptime,
                             self.broker.stats if self.broker is not None else None)
        self._watchdog: Watchdog | None = None
        self._ws_server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._sock_inode = 0
        self._started_at = time.monotonic()
        self.state = StateDir(config.state_dir) if config.state_dir else None
        self._saver: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[bool] | None = None

    def _make_broker(self, config: ServeConfig) -> RedisBroker:
        assert config.broker is not None
        try:
            # Only here: without --broker, nothing of Redis is imported.
            from .broker import RedisBroker
        except ImportError as exc:
            raise BrokerUnavailable(
                f"--broker needs the Redis client ({exc}): pip install 'fastrelay[redis]'") from None
        return RedisBroker(self.hub, config.broker, stream=config.broker_stream,
                           outbox_events=config.broker_outbox,
                           outbox_bytes=config.broker_outbox_bytes,
                           max_machines=config.max_machines, write_delay=config.write_delay)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and the port and start relaying.

        Raises LogDirUnavailable (--log-dir), SocketUnavailable or its subclass
        SocketInUse (--socket), each with a one-line message naming what failed,
        or OSError when the TCP address cannot be listened on. On failure no
        socket file is left behind.
        """
        config = self.config
        loop = asyncio.get_running_loop()
        ensure_log_dir(config.log_dir)  # the watchdog writes its stack dumps there
        if self.state is not None:
            self._take_up_state(self.state)
        if self.broker is not None:
            # Before the first client: its snapshot is the stream's (when Redis answers).
            await self.broker.start()
        self._sock = bind_datagram_socket(config.socket_path, config.socket_mode)
        self._sock_inode = socket_inode(config.socket_path)
        try:
            self._ws_server = await ws_create_server(
                self.routes.route,
                config.host,
                config.port,
                websocket_handshake_timeout=min(config.send_timeout * 2.5, 5.0),
                max_frame_size=config.max_client_frame,
                enable_auto_ping=False,
                # Pongs are owed bytes like any other: the hub answers PINGs
                # itself so that a flood of them cannot queue without bound.
                enable_auto_pong=False,
                read_buffer_init_size=_READ_BUFFER,
                # An adapter, not a Logger: picows then skips creating a child
                # Logger per connection (~1 KB each with 10,000 idle clients).
                logger_name=logging.LoggerAdapter(logging.getLogger("picows.server"), {}),
                backlog=1024,
                # The loop's own transports (uvloop's, in C) cost ~8 KiB per idle
                # client against ~13.5 KiB for aiofastnet's; fan-out speed is alike
                # because the hub writes to the socket itself.
                use_aiofastnet=False,
            )
            _set_user_timeout(self._ws_server, _user_timeout(config.send_timeout))
        except BaseException:
            if self._ws_server is not None:
                self._ws_server.close()
                self._ws_server = None
            self._close_socket()
            if self.broker is not None:
                await self.broker.stop(0)
            raise
        self._started_at = time.monotonic()
        self.hub.attach(self._sock, loop)
        self.monitor.start(loop)
        self.keepalive.start(loop)
        self.heartbeat.start(loop)
        self._watchdog = Watchdog(self.monitor, config.hang_threshold, config.log_dir)
        self._watchdog.start()
        if self.state is not None:
            self._saver = loop.create_task(self._save_periodically(self.state))
        qlen = max_dgram_qlen()
        if qlen is not None and qlen < _LOW_QLEN:
            log.warning(
                "net.unix.max_dgram_qlen is %d: at most %d datagrams wait for the relay, so bursts "
                "queue in the emitters' backlogs; raise it with "
                "`sysctl -w net.unix.max_dgram_qlen=512` (persist in /etc/sysctl.d/)", qlen, qlen,
            )

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, close every client with 1001, remove the socket file.

        Clients get ``grace`` seconds to read what they were sent; then they are aborted.
        """
        if self._ws_server is None:
            return
        self._ws_server.close()
        if self._sock is not None:
            # Emitters now get EPIPE and keep their events for the next relay,
            # while the hub takes everything queued before this moment.
            try:
                self._sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        shutdown = self.hub.shutdown(grace)
        self._close_socket()
        if self.broker is not None:
            # What the socket accepted last still goes to the stream (clients
            # are closing, so other relays' clients are the ones who get it).
            await self.broker.stop(grace)
        await shutdown
        if self.state is not None:
            await self._save_clean(self.state)
        self.keepalive.stop()
        self.heartbeat.stop()
        self.monitor.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        self._ws_server = None

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- --state-dir ---------------------------------------------------------------

    def _take_up_state(self, state: StateDir) -> None:
        try:
            state.prepare()
        except OSError as exc:
            raise StateDirUnavailable(
                f"--state-dir {state.path}: cannot be written: {exc.strerror or exc}") from None
        saved = state.load()
        self.hub.restore(saved.machines, saved.epoch, saved.seq, saved.frames)
        log.info("--state-dir %s: %s; %d machine(s), %d event(s) of history",
                 state.path, saved.note, len(saved.machines), len(saved.frames))
        # At once not clean: a crash from now on must start a new epoch.
        state.write_state(self._state_record(state, clean=False))

    def _state_record(self, state: StateDir, *, clean: bool) -> bytes:
        """state.json as the hub stands now (serialised on the loop: one consistent registry)."""
        hub = self.hub
        return state.encode_state(hub.registry.entries(), hub.history.epoch, hub.seq, clean=clean)

    async def _save_periodically(self, state: StateDir) -> None:
        hub = self.hub
        saved_at = hub.accepted
        while True:
            await asyncio.sleep(self.config.state_interval)
            if hub.accepted == saved_at:
                continue  # only accepted events change the registry
            saved_at = hub.accepted
            # Written from a thread, so a slow disk never stalls the loop.
            data = self._state_record(state, clean=False)
            self._writing = asyncio.ensure_future(asyncio.to_thread(state.write_state, data))
            await asyncio.shield(self._writing)

    async def _save_clean(self, state: StateDir) -> None:
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.cancel()
        if self._writing is not None:
            # A write already in its thread finishes first, or it could land
            # after the clean record and hide it.
            await asyncio.wait([self._writing])
        history = self.hub.history
        # The history first: a stop between the two files leaves a record that
        # is not clean, and then a new epoch, never a resume over a gap.
        frames = history.frames(history.first_seq, history.last_seq)
        if state.write_history(history.epoch, history.last_seq, frames):
            state.write_state(self._state_record(state, clean=True))

    def _close_socket(self) -> None:
        if self._sock is not None:
            unlink_socket(self.config.socket_path, self._sock_inode)
            self._sock.close()
            self._sock = None

    # -- facts -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        assert self._ws_server is not None and self._ws_server.sockets
        return int(self._ws_server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{self.port}{self.config.ws_path}"

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    @property
    def hangs(self) -> int:
        return self._watchdog.hangs if self._watchdog is not None else 0


def _user_timeout(send_timeout: float) -> float:
    """How long the kernel lets a peer acknowledge nothing before it drops the connection."""
    # Later than --send-timeout, so that the relay's own check closes WebSocket
    # clients first and counts why; this one catches what the relay cannot
    # see, such as an HTTP response to a client that never reads it.
    return 2 * send_timeout + 1


def _set_user_timeout(server: asyncio.Server, seconds: float) -> None:
    # TCP_USER_TIMEOUT (Linux) set on a listening socket is inherited by every
    # accepted one, and it also ends a connection whose peer keeps its window
    # shut, which is what a client that never reads does.
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, option, max(int(seconds * 1000), 1))
