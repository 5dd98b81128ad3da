"""Start-up and signals (issue 9): one line for every problem, nothing left behind.

Bad values exit 2, problems of the environment exit 1 naming what is wrong
(the log directory, the socket path, the TCP address); neither leaves a
socket file. The socket-probe tests run a second relay as `nobody` against a
live relay of root's, so they need root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from clients import connect, recv_json

NOBODY = 65534

# The interpreter lives where `nobody` may not read (/root/.pyenv here), so the
# relay is started as root, imports everything it will need, and only then
# drops to nobody, as a service manager's User= would have it from the start.
AS_NOBODY = f"""
import os, sys
import encodings.idna, logging.handlers, resource
import uvloop
import fastrelay.cli, fastrelay.datagram, fastrelay.logs, fastrelay.server, fastrelay._core_py
try:
    import fastrelay._core
except ImportError:
    pass
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
sys.exit(fastrelay.cli.main(sys.argv[1:]))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs a relay as another user")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A short directory under /tmp that nobody can enter; its mode is the test's to set."""
    path = Path(tempfile.mkdtemp(prefix="frt-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve_as_nobody(backend: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", AS_NOBODY, "serve", "--backend", backend,
                             "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


# -- bad values: exit 2 --------------------------------------------------------------

FLOAT_OPTIONS = ["--ping-interval", "--send-timeout", "--write-delay", "--hang-threshold",
                 "--heartbeat-interval"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e300"])
@pytest.mark.parametrize("option", FLOAT_OPTIONS)
def test_bad_float_values_are_one_line_exit_2_and_leave_no_socket(relay_factory, tmp_path,
                                                                   option, value):
    # Before: nan got past every check, and the relay died with a 30-line
    # traceback once the loop's timers refused it, leaving its socket file.
    sock = relay_factory.socket_path()
    result = relay_factory.run_failing("--port", "0", "--socket", sock,
                                       "--log-dir", str(tmp_path / "logs"), option, value)
    assert result.returncode == 2, result.stderr
    assert option in one_error_line(result)
    assert not os.path.lexists(sock)


def test_socket_path_too_long_is_exit_2_naming_the_socket(relay_factory, tmp_path):
    # Before: exit 1 with "cannot listen on 127.0.0.1:0: AF_UNIX path too long".
    sock = "/tmp/" + "s" * 98 + ".sock"  # 108 bytes, one more than sun_path holds with its NUL
    assert len(sock) == 108
    result = relay_factory.run_failing("--port", "0", "--socket", sock,
                                       "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--socket" in line and "107" in line
    assert not os.path.lexists(sock)


# -- the environment: exit 1 naming the right thing ----------------------------------

def test_socket_in_a_missing_directory_names_the_path(relay_factory, tmp_path):
    # Before: "cannot listen on 127.0.0.1:0: No such file or directory".
    sock = str(tmp_path / "no-such-dir" / "relay.sock")
    result = relay_factory.run_failing("--port", "0", "--socket", sock,
                                       "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 1
    line = one_error_line(result)
    assert sock in line and "127.0.0.1" not in line


def test_log_dir_that_is_a_file_is_one_line(relay_factory, tmp_path):
    # Before: a 13-line traceback ending in FileExistsError.
    not_a_dir = tmp_path / "logs"
    not_a_dir.write_text("a file")
    sock = relay_factory.socket_path()
    for log_dir in (not_a_dir, not_a_dir / "below"):
        result = relay_factory.run_failing("--port", "0", "--socket", sock, "--log-dir", str(log_dir))
        assert result.returncode == 1
        line = one_error_line(result)
        assert str(log_dir) in line and "--log-dir" in line
        assert not os.path.lexists(sock)
    assert not_a_dir.read_text() == "a file"


def test_port_in_use_still_names_the_address(relay, relay_factory, tmp_path):
    sock = relay_factory.socket_path()
    result = relay_factory.run_failing("--port", str(relay.port), "--socket", sock,
                                       "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 1
    assert f"127.0.0.1:{relay.port}" in one_error_line(result)
    assert not os.path.lexists(sock)


@needs_root
def test_unwritable_log_dir_is_one_line(backend, shared_dir):
    # Before: a 23-line traceback ending in PermissionError.
    shared_dir.chmod(0o777)
    log_dir = shared_dir / "root-only"
    log_dir.mkdir(mode=0o755)
    sock = shared_dir / "relay.sock"
    proc = serve_as_nobody(backend, "--socket", str(sock), "--log-dir", str(log_dir))
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    line = one_error_line(subprocess.CompletedProcess([], 1, "", stderr))
    assert str(log_dir) in line and "Permission denied" in line
    assert not os.path.lexists(sock)


@needs_root
@pytest.mark.parametrize("dir_mode", [0o777, 0o1777], ids=["world-writable", "sticky"])
def test_a_live_socket_that_cannot_be_probed_is_left_alone(relay_factory, shared_dir, dir_mode):
    # Before, world-writable: the probe's EACCES was taken for a stale socket,
    # the live one unlinked and the path taken. Sticky: the unlink failed and
    # the error named the TCP port ("cannot listen on 127.0.0.1:0").
    shared_dir.chmod(dir_mode)
    sock = str(shared_dir / "live.sock")
    live = relay_factory.start("--socket-mode", "0o600", socket_path=sock)
    inode = os.lstat(sock).st_ino
    logs = shared_dir / "nobody-logs"
    proc = serve_as_nobody(live.backend, "--socket", sock, "--log-dir", str(logs))
    deadline = time.monotonic() + 20
    while proc.poll() is None:
        replaced = not os.path.lexists(sock) or os.lstat(sock).st_ino != inode
        if replaced or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("the live relay's socket was replaced" if replaced else "no exit")
        time.sleep(0.02)
    stderr = proc.stderr.read()
    assert proc.returncode == 1, stderr
    line = one_error_line(subprocess.CompletedProcess([], 1, "", stderr))
    assert sock in line and "127.0.0.1" not in line
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_ino == inode and st.st_uid == 0
    live.emit("state_change", "still", state="root's")
    live.wait_accepted(1)


# -- signals ---------------------------------------------------------------------------

async def test_sighup_stops_like_sigterm(relay):
    # Before: SIGHUP's default action killed the relay: no close frames, exit
    # -1, and the socket file left for the next start to find.
    clients = [await connect(relay.url) for _ in range(2)]
    for ws in clients:
        await recv_json(ws)
    relay.proc.send_signal(signal.SIGHUP)
    for ws in clients:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    assert await asyncio.to_thread(relay.proc.wait, 5) == 0
    assert not os.path.lexists(relay.socket_path)
