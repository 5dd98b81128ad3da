#!/usr/bin/env bash
# Build a previous fastrelay release in its own venv, for side-by-side runs:
#
#   PREV=$(bash bench/previous.sh)            # commit ee3ff6f (default)
#   PREV=$(bash bench/previous.sh 0b6c27e)    # any commit of this repository
#   python -m bench.harness --preset issue10 --previous "$PREV"
#
# Clones this repository at COMMIT into $FASTRELAY_PREV_CACHE/<sha>/src, makes a
# venv beside it and installs the package there NON-editable with the Cython
# core compiled (FASTRELAY_BUILD_EXTENSION=yes), so the relay it runs imports
# site-packages, never a source tree. Cached: a second call with the same commit
# only checks the install and prints the path. The venv's python path is the
# only thing written to stdout; progress goes to stderr.
#
# Environment: FASTRELAY_PREV_CACHE (default ~/.cache/fastrelay-prev),
# FASTRELAY_PREV_REPO (default: the repository this script is in),
# PYTHON (the interpreter for the venv, default python3).
set -euo pipefail

COMMIT=${1:-ee3ff6f}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${FASTRELAY_PREV_REPO:-$(git -C "$HERE" rev-parse --show-toplevel)}
CACHE=${FASTRELAY_PREV_CACHE:-$HOME/.cache/fastrelay-prev}
PYTHON=${PYTHON:-python3}

say() { echo "previous.sh: $*" >&2; }

SHA=$(git -C "$REPO" rev-parse --verify "$COMMIT^{commit}")
DIR=$CACHE/${SHA:0:12}
SRC=$DIR/src
VENV=$DIR/venv
STAMP=$DIR/installed
VPY=$VENV/bin/python

# What a good install looks like: fastrelay and its compiled core imported from
# the venv's site-packages (run from / so no source tree is on the path).
check() {
    [ -x "$VPY" ] || return 1
    (cd / && "$VPY" - "$VENV" <<'EOF'
import os, sys
import fastrelay, fastrelay._core as core
venv = os.path.realpath(sys.argv[1])
for m in (fastrelay, core):
    path = os.path.realpath(m.__file__)
    if not path.startswith(venv + os.sep) or "site-packages" not in path:
        sys.exit(f"{m.__name__} is imported from {path}, not from {venv}'s site-packages")
if not core.__file__.endswith(".so"):
    sys.exit(f"fastrelay._core is {core.__file__}, not a compiled module")
EOF
    ) >&2
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SHA" ] && check; then
    say "cached: $SHA in $VENV"
    echo "$VPY"
    exit 0
fi

say "building $SHA from $REPO into $DIR"
mkdir -p "$DIR"
rm -f "$STAMP"
if [ ! -d "$SRC/.git" ]; then
    rm -rf "$SRC"
    git clone --quiet --no-checkout "$REPO" "$SRC" >&2
fi
git -C "$SRC" fetch --quiet "$REPO" "$SHA" >&2 2>/dev/null || true
git -C "$SRC" checkout --quiet --force --detach "$SHA" >&2
git -C "$SRC" clean -qfdx >&2
if [ ! -x "$VPY" ]; then
    "$PYTHON" -m venv "$VENV" >&2
fi
FASTRELAY_BUILD_EXTENSION=yes "$VPY" -m pip install --quiet --force-reinstall --no-cache-dir "$SRC" >&2
check
echo "$SHA" > "$STAMP"
say "installed $SHA in $VENV"
echo "$VPY"
