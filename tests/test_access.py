"""Who may talk to the relay (issue 9): Host names, origins, tokens, and fixed error texts.

Requests are written on raw sockets so that the Host header, duplicate
headers and bytes that are not ASCII go out exactly as a browser or an
attacker would send them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket

import pytest

from fastrelay import routes
from fastrelay.access import AccessPolicy
from fastrelay.logs import LogLimiter
from fastrelay.server import RelayServer

BAD_HOST = b"unknown Host: start the relay with --allow-host NAME for the name clients use\n"
BAD_ORIGIN = b"origin not allowed: start the relay with --allow-origin ORIGIN\n"
NO_TOKEN = b"token required: pass ?token=... or Authorization: Bearer ...\n"


def request(relay, target: bytes | str, headers: list[tuple[str, bytes | str]],
            upgrade: bool = False) -> tuple[int, bytes]:
    """Send one GET exactly as given (no Host unless listed); return status and body."""
    if isinstance(target, str):
        target = target.encode()
    lines = [b"GET " + target + b" HTTP/1.1"]
    if upgrade:
        key = base64.b64encode(os.urandom(16))
        headers = [*headers, ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key)]
    for name, value in headers:
        lines.append(name.encode() + b": " + (value.encode() if isinstance(value, str) else value))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed mid-answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if status == 101:
            return status, b""
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
    return status, body


def host(relay, name: str = "127.0.0.1") -> tuple[str, str]:
    return ("Host", f"{name}:{relay.port}")


PATHS = ["/ws/events", "/api/machines", "/healthz", "/metrics", "/", "/static/app.js", "/nope"]


def test_rebinding_names_get_no_answer_on_any_path(relay):
    # Before: 101 on /ws/events and 200 on /api/machines for a page whose name
    # the attacker had pointed at the relay, with or without a matching Origin.
    for path in PATHS:
        for origin in (None, f"http://evil.example:{relay.port}", f"ftp://evil.example:{relay.port}"):
            headers = [host(relay, "evil.example")]
            if origin is not None:
                headers.append(("Origin", origin))
            status, body = request(relay, path, headers, upgrade=path == "/ws/events")
            assert (status, body) == (400, BAD_HOST), (path, origin)


def test_loopback_names_and_ip_literals_are_known(relay):
    for name in ("127.0.0.1", "localhost", "LocalHost.", "dash.localhost", "[::1]", "10.9.8.7",
                 "[2001:db8::1]"):
        assert request(relay, "/healthz", [host(relay, name)])[0] == 200, name
    assert request(relay, "/healthz", [("Host", "localhost")])[0] == 200  # a proxy on port 80
    # HTTP/1.1 needs exactly one Host (RFC 9112 §3.2); before, both got 200.
    assert request(relay, "/healthz", [])[0] == 400
    assert request(relay, "/healthz", [host(relay), host(relay)])[0] == 400
    for bad in ("localhost.evil.example", "evil.example@127.0.0.1", "127.0.0.1/x", "[::1", "\xff"):
        assert request(relay, "/healthz", [("Host", bad.encode("latin-1"))]) == (400, BAD_HOST), bad


def test_allow_host_names_and_same_origin(relay_factory):
    relay = relay_factory.start("--allow-host", "relay.example.com", "--allow-host", "*.ops.example")
    for name in ("relay.example.com", "RELAY.example.com", "a.ops.example", "b.c.ops.example"):
        assert request(relay, "/api/machines", [host(relay, name)])[0] == 200, name
    for name in ("example.com", "ops.example", "relay.example.com.evil.example"):
        assert request(relay, "/api/machines", [host(relay, name)]) == (400, BAD_HOST), name
    # Same origin: http or https, the very host and port the request went to.
    same = [f"http://relay.example.com:{relay.port}", f"https://relay.example.com:{relay.port}"]
    for origin in same:
        headers = [host(relay, "relay.example.com"), ("Origin", origin)]
        assert request(relay, "/ws/events", headers, upgrade=True)[0] == 101, origin
        assert request(relay, "/api/machines", headers)[0] == 200, origin
    other_port = relay.port + 1 if relay.port < 65535 else relay.port - 1
    cross = [f"http://relay.example.com:{other_port}", "http://relay.example.com",
             f"ws://relay.example.com:{relay.port}", f"http://a.ops.example:{relay.port}",
             f"http://relay.example.com:{relay.port}/path", "null"]
    for origin in cross:
        headers = [host(relay, "relay.example.com"), ("Origin", origin)]
        assert request(relay, "/ws/events", headers, upgrade=True) == (403, BAD_ORIGIN), origin
    # Several Origin headers are refused, whatever they say.
    headers = [host(relay, "relay.example.com"), ("Origin", same[0]), ("Origin", same[1])]
    assert request(relay, "/api/machines", headers)[0] == 403
    # The dashboard's own origin, as Playwright and a browser open it.
    headers = [host(relay), ("Origin", f"http://127.0.0.1:{relay.port}")]
    assert request(relay, "/ws/events", headers, upgrade=True)[0] == 101


def test_allow_host_star_turns_the_check_off(relay_factory):
    relay = relay_factory.start("--allow-host", "*")
    assert request(relay, "/healthz", [host(relay, "anything.example")])[0] == 200
    # Origins are still judged: a foreign page is not the relay's own.
    headers = [host(relay, "anything.example"), ("Origin", "http://elsewhere.example")]
    assert request(relay, "/healthz", headers)[0] == 403


@pytest.mark.parametrize("value", ["http://relay.example.com", "relay.example.com:3002", "a b", ""])
def test_bad_allow_host_is_one_line_and_exit_2(relay_factory, value, tmp_path):
    result = relay_factory.run_failing("--port", "0", "--allow-host", value,
                                       "--socket", relay_factory.socket_path(),
                                       "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--allow-host" in line


def test_bind_name_is_known_and_wildcard_binds_add_none():
    # The name given to --host is one clients use; 0.0.0.0 and :: name nothing.
    assert AccessPolicy(bind_host="relay.lan").host_allowed("relay.lan:3002")
    assert AccessPolicy(bind_host="relay.lan").host_allowed("RELAY.LAN")
    for wildcard in ("0.0.0.0", "::", ""):
        policy = AccessPolicy(bind_host=wildcard)
        assert not policy.host_allowed("relay.lan:3002")
        assert policy.host_allowed("192.0.2.7:3002")  # an address of this machine, by literal


def test_refused_origin_is_logged_once_per_origin(relay):
    # Before: nothing in the log, so an operator whose file:// page (Origin
    # "null") could not connect had no clue why.
    for _ in range(3):
        assert request(relay, "/ws/events", [host(relay), ("Origin", "null")], upgrade=True)[0] == 403
    assert request(relay, "/healthz", [host(relay), ("Origin", "https://other.example")])[0] == 403
    relay.wait_for(lambda: "'https://other.example'" in relay.log_text(), 10, "the second origin")
    lines = [line for line in relay.log_text().splitlines() if "refused" in line]
    null_lines = [line for line in lines if "'null'" in line]
    assert len(null_lines) == 1, lines
    assert "--allow-origin 'null'" in null_lines[0]
    # Hosts too: the line names the flag and the name to give it.
    assert request(relay, "/healthz", [host(relay, "relay.example.com")])[0] == 400
    relay.wait_for(lambda: "--allow-host 'relay.example.com'" in relay.log_text(), 10, "host line")


def test_refusal_log_is_bounded_under_a_flood_of_origins(relay):
    for i in range(300):
        origin = f"https://flood-{i}.example"
        assert request(relay, "/healthz", [host(relay), ("Origin", origin)])[0] == 403
    # Each refusal is logged before its answer is sent, so all of them are in by now.
    lines = [line for line in relay.log_text().splitlines() if "refused a request" in line]
    assert 1 <= len(lines) <= 64, len(lines)
    assert relay.health()["status"] == "ok"


def test_long_static_names_are_a_plain_404(relay):
    # Before: 500 with "[Errno 36] File name too long: '/.../fastrelay/static/aaa...'".
    for name in ("a" * 300 + ".js", "a" * 65 + ".css", "app.js" + "\xff"):
        status, body = request(relay, "/static/" + name if name.isascii() else
                               b"/static/" + name.encode("latin-1"), [host(relay)])
        assert status == 404, name
        assert b"/" not in body and b"Errno" not in body, body
    assert request(relay, "/static/app.js", [host(relay)])[0] == 200


def test_non_ascii_token_compares_as_utf8_bytes(relay_factory):
    # Before: 500 "'utf-8' codec can't encode characters ..." even with the right token.
    relay = relay_factory.start("--token", "pässwörd")
    good = "pässwörd".encode()
    for headers, target in [
        ([("Authorization", b"Bearer " + good)], "/api/machines"),
        ([], "/api/machines?token=p%C3%A4ssw%C3%B6rd"),
        ([], b"/api/machines?token=" + good),
    ]:
        assert request(relay, target, [host(relay), *headers]) == (200, b"[]"), (headers, target)
    for headers, target in [
        ([("Authorization", b"Bearer " + "pässwörd".encode("latin-1"))], "/api/machines"),
        ([("Authorization", b"Bearer \xff")], "/api/machines"),
        ([], "/api/machines?token=p%E4ssw%F6rd"),
        ([], "/api/machines?token=%FF"),
    ]:
        assert request(relay, target, [host(relay), *headers]) == (401, NO_TOKEN), (headers, target)


def test_raw_ff_in_authorization_is_a_401(relay_factory):
    # Before: 500 "'utf-8' codec can't encode character '\udcff'".
    relay = relay_factory.start("--token", "s3cret")
    for value in (b"Bearer \xff", b"\xff\xfe", b"Bearer s3cret\xff"):
        assert request(relay, "/metrics", [host(relay), ("Authorization", value)]) == (401, NO_TOKEN)
    assert request(relay, "/metrics", [host(relay), ("Authorization", "Bearer s3cret")])[0] == 200


async def test_a_failure_inside_routing_is_a_fixed_500_logged_once(backend, tmp_path, monkeypatch,
                                                                 caplog):
    # Nothing a client sends makes routing fail any more, so the failure is put
    # in: an in-process relay whose route table raises, asked over a real socket.
    # Before: 500 whose body was the exception's text.
    monkeypatch.setattr(routes, "_INTERNAL_ERRORS", LogLimiter(interval=60.0, max_keys=16))
    server = RelayServer(port=0, backend=backend, socket_path=f"/tmp/frt-500-{os.getpid()}.sock",
                         log_dir=str(tmp_path / "logs"))

    def broken_get(path: str, query: object = None) -> None:
        raise ValueError(f"no route for {path} (a bug)")

    async with server:
        server.routes.get = broken_get  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="fastrelay"):
            for _ in range(3):
                answer = await asyncio.to_thread(request, server, "/api/machines", [host(server)])
                assert answer == (500, b"internal error\n")
        # Logged before the answer went out: all three are in the log by now.
        lines = [r.getMessage() for r in caplog.records if "answered 500" in r.getMessage()]
        assert lines == ["answered 500 to an HTTP request: ValueError"], lines
        # The relay goes on: the WebSocket path does not go through the broken table.
        assert (await asyncio.to_thread(request, server, "/ws/events", [host(server)],
                                        upgrade=True))[0] == 101
