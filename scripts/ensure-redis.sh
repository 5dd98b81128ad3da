#!/usr/bin/env bash
# Make sure Debian's redis-server is installed for the broker tests.
# Idempotent: does nothing when it is already on PATH. The tests start their
# own servers on free ports; the service the package starts on 6379 when it
# is installed is stopped again, so nothing is left listening.
set -euo pipefail

if command -v redis-server >/dev/null; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends redis-server

if ! command -v redis-server >/dev/null; then
    echo "ensure-redis: apt-get finished but redis-server is still missing" >&2
    exit 1
fi
# Without systemd the package's service may or may not have started.
$SUDO service redis-server stop >/dev/null 2>&1 || true
redis-cli -p 6379 shutdown nosave >/dev/null 2>&1 || true
