#!/usr/bin/env python3
"""Run Autobahn|Testsuite's fuzzing client against fastrelay and judge it as a relay.

    python3 scripts/autobahn.py                      # both backends, sections 1-7 and 10
    python3 scripts/autobahn.py --backend python --cases '5.*' -v

Autobahn's own verdicts assume an echo server: every case waits for its
messages to come back, and a relay that sends one ``initial`` frame on connect
and echoes nothing "fails" nearly all of them. This script keeps what matters
for fastrelay and judges each case again (see ``judge``):

- input that breaks RFC 6455 must make the relay fail the connection itself,
  at once, with the close code the case expects (1002, or 1007 for bad UTF-8);
- valid input must never make it close; when the client closes, the relay
  answers with a valid code (the client's, or 1000) and closes the TCP
  connection;
- no close code that RFC 6455 §7.4 forbids on the wire (0, 1005, 1006, 5000...);
- pings are answered, with the relay's own ``initial``/``ping`` messages and
  the missing echoes taken out of what Autobahn expected and received.

Autobahn|Testsuite runs only on Python 2.7. The first run builds a virtualenv
for it (about half a minute, from PyPI) under ``$FASTRELAY_AUTOBAHN_HOME`` or
``~/.cache/fastrelay-autobahn`` and reuses it afterwards. Reports go to
``build/autobahn/`` (ignored by git). Exit status: 0 when no case has a defect.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FASTRELAY_AUTOBAHN_HOME",
                            Path.home() / ".cache" / "fastrelay-autobahn"))
DEFAULT_OUT = ROOT / "build" / "autobahn"
SECTIONS = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"]

# The newest autobahntestsuite still needs Python 2.7 and Twisted; these are
# the last releases of each that import there (its own pins, plus what they
# pull in), frozen so that a new release on PyPI cannot break the run.
VIRTUALENV = "virtualenv==16.7.12"  # the last one that runs on 2.7 without extras
PINS = """
autobahntestsuite==25.10.1
autobahn==0.10.9
txaio==2.1.0
Twisted==19.10.0
zope.interface==4.6.0
incremental==16.10.1
constantly==15.1.0
Automat==22.10.0
attrs==21.4.0
hyperlink==21.0.0
idna==2.10
PyHamcrest==1.10.1
pyOpenSSL==19.1.0
cryptography==3.3.2
cffi==1.15.1
pycparser==2.21
enum34==1.1.10
ipaddress==1.0.23
service-identity==18.1.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
Jinja2==2.11.3
MarkupSafe==1.1.1
Werkzeug==1.0.1
klein==17.10.0
unittest2==1.1.0
traceback2==1.4.0
linecache2==1.0.0
typing==3.10.0.0
six==1.16.0
""".split()

# Close codes an endpoint may put on the wire (RFC 6455 §7.4.1, IANA registry):
# 1004-1006 and 1015 are reserved, below 1000 and from 5000 up are undefined.
VALID_CODES = frozenset([*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)])
# The relay's own messages, which Autobahn's expectations know nothing about.
# Reports cut messages to 64 characters, so match on the start only.
_RELAY_MESSAGE = re.compile(r'^\{"type":"(initial|ping)"')
_STARTED = re.compile(r"relaying \S+ -> (ws://\S+) \(backend (\w+)")


# -- the Python 2.7 environment ----------------------------------------------------

def find_python2(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [
        shutil.which("python2.7"), shutil.which("python2"),
        *sorted(glob.glob(str(Path.home() / ".pyenv/versions/2.7*/bin/python")), reverse=True),
    ]
    for candidate in candidates:
        # A pyenv shim exists even where 2.7 is not selected, and then fails: try each.
        if candidate and subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (2, 7)"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return candidate
    sys.exit("autobahn: no Python 2.7 found (Autobahn|Testsuite needs it); "
             "pass --python2 PATH, e.g. one built by pyenv")


def ensure_wstest(python2: str) -> Path:
    """The wstest of a cached virtualenv with exactly PINS, built when missing or stale."""
    venv = CACHE / "venv"
    wstest = venv / "bin" / "wstest"
    stamp = CACHE / "pins.sha256"
    digest = hashlib.sha256("\n".join([VIRTUALENV, *PINS]).encode()).hexdigest()
    if wstest.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return wstest
    print(f"autobahn: building the Python 2.7 environment in {CACHE} ...", flush=True)
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    quiet = ["--disable-pip-version-check", "-q"]
    # virtualenv goes into a private folder: the Python 2.7 install stays untouched.
    tool = CACHE / "virtualenv"
    _run([python2, "-m", "pip", "install", *quiet, "--target", str(tool), VIRTUALENV])
    _run([python2, "-m", "virtualenv", "-q", str(venv)], env={**os.environ, "PYTHONPATH": str(tool)})
    _run([str(venv / "bin" / "pip"), "install", *quiet, "--no-deps", *PINS])
    _run([str(venv / "bin" / "python"), "-c", "import autobahntestsuite.wstest"])
    stamp.write_text(digest + "\n")
    return wstest


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if result.returncode:
        sys.exit(f"autobahn: {' '.join(cmd[:4])} ... failed:\n{result.stdout[-4000:]}")


# -- relays ---------------------------------------------------------------------------

class RelayProcess:
    """One `fastrelay serve` on a free loopback port."""

    def __init__(self, backend: str, out: Path) -> None:
        self.backend = backend
        self.socket_path = f"/tmp/fastrelay-autobahn-{os.getpid()}-{backend}.sock"
        self.output: list[str] = []
        # A long ping interval: the relay's JSON pings would only add noise to
        # cases that last a few seconds (they are filtered out anyway).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrelay", "serve", "--host", "127.0.0.1", "--port", "0",
             "--socket", self.socket_path, "--log-dir", str(out / f"logs-{backend}"),
             "--backend", backend, "--ping-interval", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            self.output.append(line)
            match = _STARTED.search(line)
            if match:
                self.url, started = match.group(1), match.group(2)
                if started != backend:
                    self.stop()
                    sys.exit(f"autobahn: asked for backend {backend}, the relay runs {started}")
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        sys.exit(f"autobahn: the {backend} relay did not start:\n{''.join(self.output)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- judging --------------------------------------------------------------------------

def _strip(events: list[list[Any]], *, messages: bool) -> list[tuple[Any, ...]]:
    """Events without the relay's own messages (``messages=False``: without any message)."""
    kept = []
    for event in events:
        if event[0] == "message" and (not messages or _RELAY_MESSAGE.match(str(event[1]))):
            continue
        kept.append(tuple(event))
    return kept


def _pongs_coalesced(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
    """True when ``got`` is ``want`` but with some pongs left out, never the last.

    RFC 6455 §5.5.3 lets an endpoint answer only the latest of several pings;
    the relay does that while a client is behind.
    """
    others = [e for e in want if e[0] != "pong"]
    if [e for e in got if e[0] != "pong"] != others:
        return False
    got_pongs = [e for e in got if e[0] == "pong"]
    want_pongs = [e for e in want if e[0] == "pong"]
    it = iter(want_pongs)
    return bool(got_pongs) and got_pongs[-1] == want_pongs[-1] and all(p in it for p in got_pongs)


def _client_closed_on_timer(wirelog: list[list[Any]]) -> bool:
    """True when the client's first close frame came from a kill/close timer of the case.

    Such a close is not part of the case's input: it is how the case ends when
    the echo it waits for never comes.
    """
    timer = False
    for entry in wirelog:
        if entry[0] in ("KLE", "TIE"):
            timer = True
        elif entry[0] == "TF" and entry[2] == 8:
            return timer
    return False


def judge(case: dict[str, Any]) -> list[str]:
    """The defects of one case, as short sentences; empty when the relay did the right thing."""
    if not case.get("httpResponse", "?").startswith("HTTP/1.1 101"):
        return ["the opening handshake failed"]
    expected_close = case["expectedClose"]
    must_fail = not expected_close["closedByMe"]
    codes = expected_close["closeCode"]
    sent = case["remoteCloseCode"]  # what the relay put on the wire, None for none
    client_sent = case["localCloseCode"]
    client_closed_first = case["closedByMe"]
    defects = []

    if sent is not None and sent not in VALID_CODES:
        defects.append(f"sent close code {sent}, which RFC 6455 forbids on the wire")
    if must_fail:
        if client_closed_first:
            defects.append("did not fail the connection (the client closed it after waiting"
                           f" with {client_sent}; the relay answered {sent})")
        elif sent not in codes:
            what = "no close frame" if sent is None else f"close code {sent}"
            defects.append(f"failed the connection with {what}, want {'/'.join(map(str, codes))}")
    elif not client_closed_first:
        what = "dropped the TCP connection" if sent is None else f"sent close {sent}"
        defects.append(f"{what} although the input was valid")
    else:
        if _client_closed_on_timer(case["wirelog"]):
            # The case waited for an echo; any valid answer to the client's close will do.
            allowed = {1000, client_sent} if client_sent in VALID_CODES else {1000}
        else:
            allowed = set(codes)
        if sent is None:
            defects.append(f"answered the client's close ({client_sent}) with no close frame")
        elif sent not in allowed and sent in VALID_CODES:
            defects.append(f"answered the client's close ({client_sent}) with {sent},"
                           f" want {'/'.join(map(str, sorted(allowed)))}")
        elif case["droppedByMe"] and not defects:
            defects.append("did not close the TCP connection after the closing handshake")
        elif expected_close["requireClean"] and not case["wasClean"] and not defects:
            defects.append(f"unclean close: {case['wasNotCleanReason']}")

    if case["behavior"] != "INFORMATIONAL" and not defects:
        got = _strip(case["received"], messages=True)
        wants = {name: _strip(events, messages=False) for name, events in case["expected"].items()}
        if not any(got == want for want in wants.values()) and not any(
                _pongs_coalesced(got, want) for want in wants.values()):
            defects.append(f"events {got} differ from every expectation {wants}")
    return defects


def section(case_id: str) -> str:
    return case_id.split(".")[0]


def _case_order(case_id: str) -> list[int]:
    return [int(part) for part in case_id.split(".")]


# -- running --------------------------------------------------------------------------

def run_wstest(wstest: Path, relays: list[RelayProcess], cases: list[str], reports: Path) -> None:
    shutil.rmtree(reports, ignore_errors=True)
    spec = {
        "outdir": str(reports),
        "servers": [{"agent": relay.backend, "url": relay.url} for relay in relays],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
        # Autobahn's default: a violation it sees is answered with a close frame
        # rather than a dropped socket, so the relay's replies stay visible.
        "options": {"failByDrop": False},
    }
    spec_path = reports.parent / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log = reports.parent / "wstest.log"
    with open(log, "w") as out:
        result = subprocess.run([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=reports.parent)
    if result.returncode or not (reports / "index.json").exists():
        sys.exit(f"autobahn: wstest failed (exit {result.returncode}); see {log}")


def load_results(reports: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    index = json.loads((reports / "index.json").read_text())
    for agent, cases in index.items():
        for case_id, summary in cases.items():
            yield agent, case_id, json.loads((reports / summary["reportfile"]).read_text())


def table(results: dict[str, dict[str, list[str]]], backends: list[str]) -> str:
    case_ids = sorted({c for per in results.values() for c in per}, key=_case_order)
    sections = sorted({section(c) for c in case_ids}, key=int)
    head = "| section | cases | " + " | ".join(f"defects ({b})" for b in backends) + " |"
    lines = [head, "|---:|---:|" + "---:|" * len(backends)]
    for name in [*sections, "all"]:
        ids = [c for c in case_ids if name == "all" or section(c) == name]
        counts = [sum(1 for c in ids if results[b].get(c)) for b in backends]
        label = "**all**" if name == "all" else name
        lines.append(f"| {label} | {len(ids)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=["cython", "python"],
                        help="backend to test (repeatable; default both)")
    parser.add_argument("--cases", nargs="+", default=SECTIONS,
                        help="Autobahn case patterns (default: sections 1-7 and 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where reports go")
    parser.add_argument("--python2", help="the Python 2.7 interpreter to build the venv with")
    parser.add_argument("--judge-only", action="store_true",
                        help="judge the reports of the last run again, without running")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every defect")
    args = parser.parse_args()
    backends: list[str] = args.backend or ["cython", "python"]
    out: Path = args.out.resolve()
    reports = out / "reports"

    if not args.judge_only:
        wstest = ensure_wstest(find_python2(args.python2))
        out.mkdir(parents=True, exist_ok=True)
        relays: list[RelayProcess] = []
        try:
            for backend in backends:
                relays.append(RelayProcess(backend, out))
            print(f"autobahn: running {' '.join(args.cases)} against "
                  + ", ".join(f"{r.backend} ({r.url})" for r in relays), flush=True)
            run_wstest(wstest, relays, args.cases, reports)
        finally:
            for relay in relays:
                relay.stop()

    results: dict[str, dict[str, list[str]]] = {b: {} for b in backends}
    for agent, case_id, case in load_results(reports):
        if agent in results:
            results[agent][case_id] = judge(case)
    print(table(results, backends))
    if args.verbose:
        for backend in backends:
            for case_id in sorted(results[backend], key=_case_order):
                for defect in results[backend][case_id]:
                    print(f"{backend} {case_id}: {defect}")
    (out / "judged.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    return 1 if any(d for per in results.values() for d in per.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
