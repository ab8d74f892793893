#!/usr/bin/env bash
# Readies this machine for stacks and tests: a Docker Engine that answers, and the local
# stand-in images built from host binaries (nothing is pulled; see tests/images/build.sh).
# Safe to run again: it only installs or starts what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
static_busybox=0
for candidate in /bin/busybox /usr/bin/busybox; do
    if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then static_busybox=1; fi
done
[ "$static_busybox" = 1 ] || packages+=(busybox-static)
if [ ${#packages[@]} -gt 0 ]; then
    echo "provision: installing ${packages[*]}"
    as_root apt-get update -q
    # policy-rc.d-less machines would start Debian's own redis on 6379: keep it from starting.
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

if ! docker info >/dev/null 2>&1; then
    echo "provision: starting dockerd"
    # The pid file tells the tests that this Engine is theirs to restart.
    as_root sh -c 'nohup dockerd >/var/log/dspy-agent-dockerd.log 2>&1 & echo $! >/run/dspy-agent-dockerd.pid'
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        echo "provision: dockerd did not come up; its log:" >&2
        tail -n 30 /var/log/dspy-agent-dockerd.log >&2 || true
        exit 1
    fi
fi

bash tests/images/build.sh --tag-catalog
