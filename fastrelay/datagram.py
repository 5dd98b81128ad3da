"""The relay's end of the datagram socket: bind it safely, remove it on exit."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat

__all__ = ["RCVBUF_BYTES", "SocketInUse", "SocketUnavailable", "bind_datagram_socket",
           "max_dgram_qlen", "socket_inode", "unlink_socket"]

log = logging.getLogger("fastrelay")

#: Receive buffer requested for the datagram socket. It does not lift the
#: kernel's queue-length cap (max_dgram_qlen) but lets that many large
#: datagrams wait without EAGAIN on the byte budget.
RCVBUF_BYTES = 4 * 1024 * 1024


class SocketUnavailable(RuntimeError):
    """The socket path cannot be taken; the message (one line) names the path and says why."""


class SocketInUse(SocketUnavailable):
    """The socket path cannot be taken: a live relay holds it, or it is not a socket."""


def bind_datagram_socket(path: str, mode: int) -> socket.socket:
    """Bind a non-blocking AF_UNIX SOCK_DGRAM socket at ``path`` with file mode ``mode``.

    A stale socket file (nobody listening) is replaced. A live one, or a path
    that is not a socket, raises SocketInUse and is left untouched; any other
    failure raises SocketUnavailable. Nothing is deleted unless it was stale.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SocketUnavailable(f"cannot use the socket path {path}: {_reason(exc)}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it (use --socket)")
        _replace_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        # Bind under a restrictive umask, then chmod: the file never exists
        # with wider permissions than asked for.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            os.chmod(path, mode)
        except OSError:
            os.unlink(path)  # ours, just made: a socket with the wrong mode must not stay
            raise
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SocketUnavailable(f"cannot bind the socket {path}: {_reason(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _replace_if_stale(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # The one answer that means nobody listens. Anything else (EACCES on
        # another user's 0o600 socket, say) says nothing about liveness, and
        # deleting a live relay's socket would silently cut its emitters off.
        log.info("replacing stale socket file %s", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another relay replaced it first; bind will say if it is live
        except OSError as exc:
            raise SocketUnavailable(f"cannot replace the stale socket {path}: {_reason(exc)}") from None
    except FileNotFoundError:
        pass  # removed since lstat: the path is free
    except OSError as exc:
        raise SocketUnavailable(
            f"cannot tell whether a relay listens on {path} ({_reason(exc)}); not replacing it: "
            f"remove it if it is stale, or use another --socket") from None
    else:
        raise SocketInUse(f"another relay is already listening on {path}")
    finally:
        probe.close()


def _reason(exc: OSError) -> str:
    # "AF_UNIX path too long" and the like come without strerror.
    return exc.strerror or str(exc)


def socket_inode(path: str) -> int:
    """The inode of the socket file at ``path``, to recognise our own file at shutdown."""
    return os.lstat(path).st_ino


def unlink_socket(path: str, inode: int) -> None:
    """Remove ``path`` if it is still the socket file we bound (a successor may own it now)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)


def max_dgram_qlen() -> int | None:
    """The kernel's per-socket datagram queue length, or None where it cannot be read."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
