#!/usr/bin/env bash
# Make sure Debian's chromium is at /usr/bin/chromium for the browser tests.
# Idempotent: does nothing when it is already there. Never downloads a
# browser build of its own (no `playwright install`): the distribution
# package is the one source of the browser.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core

if [ ! -x /usr/bin/chromium ]; then
    echo "ensure-chromium: apt-get finished but /usr/bin/chromium is still missing" >&2
    exit 1
fi
