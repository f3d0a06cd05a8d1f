#!/usr/bin/env bash
# The system programs the tests need, beyond Python: redis-server (shared limits), PostgreSQL's
# initdb/postgres and chromium. As root, installs whatever is missing with apt-get; otherwise
# prints the exact command to run as root and exits non-zero.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

have_postgres() {
    if have initdb && have postgres; then
        return 0
    fi
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        if [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ]; then
            return 0
        fi
    done
    return 1
}

missing() {
    have redis-server || echo redis-server
    have_postgres || echo postgresql
    have chromium || have chromium-browser || echo chromium
}

packages=$(missing | tr '\n' ' ' | sed 's/ *$//')
if [ -z "$packages" ]; then
    exit 0
fi
command="apt-get update -qq && apt-get install -y --no-install-recommends $packages"
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing system packages: $packages" >&2
    echo "system-deps: run as root: $command" >&2
    exit 1
fi
echo "system-deps: installing $packages" >&2
# shellcheck disable=SC2086  # one word per package
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages
still=$(missing | tr '\n' ' ' | sed 's/ *$//')
if [ -n "$still" ]; then
    echo "system-deps: still missing after the install: $still" >&2
    exit 1
fi
