"""The `fastrelay` command: serve, emit, tail."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._version import __version__
from .config import ServeConfig, default_socket_path, parse_mode, parse_size

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _terms(text: str) -> list[str]:
    """A comma-separated filter list; the relay judges the terms themselves."""
    return text.split(",")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _size(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _positive(kind: type[Any]) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        # nan is not <= 0, and inf is no interval: both would reach the loop's timers.
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not between 0 and 65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeConfig()
    parser = _Parser(prog="fastrelay", description="Relay live events from local processes to "
                     "WebSocket clients.")
    parser.add_argument("--version", action="version", version=f"fastrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    serve.add_argument("--port", type=_port, default=defaults.port,
                       help="TCP port (default %(default)s; 0 picks a free one)")
    serve.add_argument("--socket", dest="socket_path", default=None,
                       help=f"datagram socket path (default $FASTRELAY_SOCKET or {default_socket_path()})")
    serve.add_argument("--socket-mode", type=_mode, default=defaults.socket_mode,
                       help="socket file mode, octal (default 0o660)")
    serve.add_argument("--path", dest="ws_path", default=defaults.ws_path,
                       help="WebSocket path (default %(default)s)")
    serve.add_argument("--ping-interval", type=_positive(float), default=defaults.ping_interval,
                       help="seconds between JSON pings; silent clients are closed after 3 "
                            "(default %(default)s)")
    serve.add_argument("--send-timeout", type=_positive(float), default=defaults.send_timeout,
                       help="seconds a pending send may wait before the client is closed "
                            "(default %(default)s)")
    serve.add_argument("--max-client-buffer", type=_size, default=defaults.max_client_buffer,
                       help="bytes queued per client before it is closed with 1013 (default 4MiB)")
    serve.add_argument("--max-http-buffer", type=_size, default=defaults.max_http_buffer,
                       help="bytes of large HTTP responses (GET /api/machines) held for clients "
                            "that have not read them; past it, 503 (default 64MiB)")
    serve.add_argument("--max-datagram", type=_size, default=defaults.max_datagram,
                       help="largest accepted datagram (default 64KiB)")
    serve.add_argument("--max-machines", type=_positive(int), default=defaults.max_machines,
                       help="registry size; the least recently active machine is forgotten "
                            "beyond it (default %(default)s)")
    serve.add_argument("--max-depth", type=_positive(int), default=defaults.max_depth,
                       help="deepest nesting of arrays and objects accepted in a datagram "
                            "(default %(default)s, at most 250)")
    serve.add_argument("--max-snapshots", type=_positive(int), default=defaults.max_snapshots,
                       help="snapshots on their way to clients before a refresh waits for one "
                            "to finish (default %(default)s)")
    serve.add_argument("--batch-cap", type=_positive(int), default=defaults.batch_cap,
                       help="datagrams drained per loop iteration (default %(default)s)")
    serve.add_argument("--write-delay", type=float, default=defaults.write_delay,
                       help="seconds within which events share one write to the clients; an event "
                            "after a quiet spell goes out at once; 0 writes each drained batch at "
                            "once (default %(default)s)")
    serve.add_argument("--history", type=_count, default=defaults.history,
                       help="events kept for clients that resume with ?epoch=E&since=S; 0 turns "
                            "resume off (default %(default)s)")
    serve.add_argument("--history-bytes", type=_size_or_zero, default=defaults.history_bytes,
                       help="at most this many bytes of history (default 16MiB; 0: no resume)")
    serve.add_argument("--state-dir", default=None, metavar="DIR",
                       help="keep the registry, epoch, seq and history here across restarts "
                            "(default: none)")
    serve.add_argument("--state-interval", type=_positive(float), default=defaults.state_interval,
                       help="seconds between registry saves to --state-dir (default %(default)s)")
    serve.add_argument("--max-filter-terms", type=_positive(int), default=defaults.max_filter_terms,
                       help="machine globs plus event types one client's filter may hold "
                            "(default %(default)s)")
    serve.add_argument("--max-filter-bytes", type=_size, default=defaults.max_filter_bytes,
                       help="bytes of one client's machines and types values together "
                            "(default %(default)s)")
    serve.add_argument("--max-filters", type=_positive(int), default=defaults.max_filters,
                       help="distinct filters served at once; a client asking for one more is "
                            "closed with 1013 (default %(default)s)")
    serve.add_argument("--broker", default=None, metavar="URL",
                       help="share one stream with every relay on this Redis "
                            "(redis://HOST:PORT/DB, rediss:// for TLS; needs fastrelay[redis])")
    serve.add_argument("--broker-stream", default=defaults.broker_stream, metavar="NAME",
                       help="the stream's name, the prefix of its Redis keys (default %(default)s)")
    serve.add_argument("--broker-outbox", type=_positive(int), default=defaults.broker_outbox,
                       help="events kept while Redis is unreachable; past it they are dropped "
                            "(default %(default)s)")
    serve.add_argument("--broker-outbox-bytes", type=_size, default=defaults.broker_outbox_bytes,
                       help="and at most this many bytes of them (default 64MiB)")
    serve.add_argument("--hang-threshold", type=_positive(float), default=defaults.hang_threshold,
                       help="seconds of loop stall before the watchdog dumps stacks "
                            "(default %(default)s)")
    serve.add_argument("--heartbeat-interval", type=_positive(float),
                       default=defaults.heartbeat_interval,
                       help="seconds between heartbeat log lines (default %(default)s)")
    serve.add_argument("--log-dir", default=defaults.log_dir, help="log directory (default %(default)s)")
    serve.add_argument("--allow-origin", dest="allow_origins", action="append", default=[],
                       metavar="ORIGIN", help="browser origin allowed besides this host and "
                       "localhost; repeatable; '*' allows all")
    serve.add_argument("--allow-host", dest="allow_hosts", action="append", default=[],
                       metavar="NAME", help="host name clients may reach the relay by, besides "
                       "loopback names, the --host name and IP addresses; repeatable; "
                       "'*.example.com' allows subdomains, '*' any name")
    serve.add_argument("--token", default=None,
                       help="shared secret required on every request but /healthz "
                            "(default $FASTRELAY_TOKEN)")
    serve.add_argument("--backend", choices=("auto", "cython", "python"), default="auto",
                       help="hub implementation (default auto: cython when built)")

    emit = commands.add_parser("emit", help="send one event to the relay")
    emit.add_argument("type", help="event type, e.g. state_change")
    emit.add_argument("machine_id")
    emit.add_argument("--state", default=None)
    emit.add_argument("--data", default=None, help="JSON value for the event's data field")
    emit.add_argument("--socket", dest="socket_path", default=None,
                      help="datagram socket path (default $FASTRELAY_SOCKET or the default path)")

    tail = commands.add_parser("tail", help="print events as they arrive")
    tail.add_argument("--url", default="ws://127.0.0.1:3002/ws/events")
    tail.add_argument("--token", default=None, help="token, when the relay requires one")
    tail.add_argument("--machines", type=_terms, default=None, metavar="GLOB[,GLOB...]",
                      help="only these machines (globs with * and ?)")
    tail.add_argument("--types", type=_terms, default=None, metavar="TYPE[,TYPE...]",
                      help="only these event types")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "emit":
        return _emit(args)
    from .tail import tail

    return tail(args.url, token=args.token or os.environ.get("FASTRELAY_TOKEN"),
                machines=args.machines, types=args.types)


def _serve(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k != "command"}
    if fields["socket_path"] is None:
        fields["socket_path"] = default_socket_path()
    if fields["token"] is None:
        fields["token"] = os.environ.get("FASTRELAY_TOKEN") or None
    config = ServeConfig(**fields)
    try:
        config.validate()
    except ValueError as exc:
        print(f"fastrelay serve: error: {exc}", file=sys.stderr)
        return 2

    from .logs import LogDirUnavailable, configure_logging

    try:
        configure_logging(config.log_dir)
    except LogDirUnavailable as exc:
        print(f"fastrelay serve: error: {exc}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run_server(config, "asyncio"))
    return uvloop.run(_run_server(config, "uvloop"))


def _raise_fd_limit() -> None:
    """Each client costs a descriptor: lift the soft limit to the hard one, as servers do."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return
        logging.getLogger("fastrelay").info("raised the open-file limit from %d to %d", soft, target)


async def _run_server(config: ServeConfig, loop_name: str) -> int:
    from ._backend import BackendUnavailable
    from .datagram import SocketUnavailable
    from .logs import LogDirUnavailable
    from .server import BrokerUnavailable, RelayServer, StateDirUnavailable

    # Handlers go in before start(): a signal during start-up then stops the
    # relay cleanly instead of killing it with its socket file left behind.
    # SIGHUP (a closed terminal, an ssh session gone) is a stop like the others.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stopping.set)
    try:
        server = RelayServer(config)
        await server.start()
    except (BackendUnavailable, BrokerUnavailable, SocketUnavailable, LogDirUnavailable,
            StateDirUnavailable) as exc:
        print(f"fastrelay serve: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # What is left: the TCP side (address in use, no such address, a bad --host).
        print(f"fastrelay serve: error: cannot listen on {config.host}:{config.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"fastrelay {__version__} relaying {config.socket_path} -> {server.url} "
          f"(backend {server.backend}, loop {loop_name}, pid {os.getpid()})", flush=True)
    await stopping.wait()
    await server.stop()
    return 0


def _emit(args: argparse.Namespace) -> int:
    import orjson

    from .emit import Emitter

    fields: dict[str, Any] = {}
    if args.state is not None:
        fields["state"] = args.state
    if args.data is not None:
        try:
            fields["data"] = orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            print(f"fastrelay emit: error: --data is not valid JSON: {exc}", file=sys.stderr)
            return 2
    # hold=0: a command line says at once that no relay listens, rather than
    # waiting for one to come back.
    emitter = Emitter(args.socket_path, hold=0)
    if emitter.emit(args.type, args.machine_id, **fields) and emitter.flush(2.0):
        return 0
    reasons = ", ".join(k for k, v in emitter.dropped.items() if v) or "not delivered"
    print(f"fastrelay emit: event dropped ({reasons}); is `fastrelay serve` running on "
          f"{emitter.socket_path}?", file=sys.stderr)
    return 1
