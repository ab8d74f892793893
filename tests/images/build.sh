#!/usr/bin/env bash
# Builds the small local images the tests use, from binaries of this host: nothing is pulled.
#   dspy-agent-test/busybox  busybox + serve.sh: an HTTP service with /health (see serve.sh)
#   dspy-agent-test/redis    the host's redis-server and redis-cli (with their libraries) + busybox
# With --tag-catalog, makes sure of the built-in catalog's images: a real image is kept, a missing
# one is pulled, and only when the pull fails (no registry) is a stand-in tagged under its name,
# with a warning, so the zero-config stack runs on a machine without registry access.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

is_static() { [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1; }
busybox=""
for candidate in "$(command -v busybox || true)" /bin/busybox /usr/bin/busybox; do
    if [ -n "$candidate" ] && is_static "$candidate"; then busybox=$candidate; break; fi
done
[ -n "$busybox" ] || { echo "build.sh: a static busybox is needed (apt-get install busybox-static)" >&2; exit 1; }
redis=$(command -v redis-server || true)
[ -n "$redis" ] && command -v redis-cli >/dev/null || { echo "build.sh: redis-server and redis-cli are needed (apt-get install redis-server)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

add_busybox() {
    local root=$1
    mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/www/api"
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
    echo "ok" > "$root/www/health"
    echo "ok" > "$root/www/index.html"
    echo '{"models":[]}' > "$root/www/api/tags"
    # POST /cgi-bin/echo answers with the request body (for the http task handler's tests).
    mkdir -p "$root/www/cgi-bin"
    printf '#!/bin/sh\nprintf "Content-Type: application/json\\r\\n\\r\\n"\nhead -c "${CONTENT_LENGTH:-0}"\n' > "$root/www/cgi-bin/echo"
    chmod +x "$root/www/cgi-bin/echo"
    chmod 1777 "$root/tmp"
}

import() {
    local root=$1 tag=$2 cmd=$3
    tar -C "$root" -c . | docker import --change "CMD $cmd" --change "ENV PATH=/bin:/usr/bin" \
        --change "LABEL dspy-agent.stand-in=true" - "$tag" >/dev/null
    echo "built $tag"
}

root="$work/busybox"
add_busybox "$root"
cp "$here/serve.sh" "$root/serve" && chmod +x "$root/serve"
import "$root" dspy-agent-test/busybox:latest '["/serve"]'

root="$work/redis"
add_busybox "$root"
mkdir -p "$root/usr/bin"
for binary in "$redis" "$(command -v redis-cli)"; do
    real=$(readlink -f "$binary")
    cp "$real" "$root/usr/bin/$(basename "$binary")"
    for lib in $(ldd "$real" | grep -o '/[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
import "$root" dspy-agent-test/redis:latest '["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp"]'

if [ "${1:-}" = "--tag-catalog" ]; then
    # The catalog's images, each with the stand-in that can take its name.
    catalog=${DSPY_AGENT_CATALOG_IMAGES:-"redis:7-alpine=dspy-agent-test/redis:latest
dspy-agent/reddb:latest=dspy-agent-test/busybox:latest
dspy-agent/infermesh:latest=dspy-agent-test/busybox:latest
dspy-agent/model-server:latest=dspy-agent-test/busybox:latest
ollama/ollama:latest=dspy-agent-test/busybox:latest"}
    # How an image is pulled (a test replaces it to play a machine with or without a registry).
    pull=${DSPY_AGENT_PULL:-"docker pull -q"}
    stand_ins=()
    while IFS='=' read -r image stand_in; do
        [ -n "$image" ] || continue
        label=$(docker image inspect -f '{{index .Config.Labels "dspy-agent.stand-in"}}' "$image" 2>/dev/null || true)
        if docker image inspect "$image" >/dev/null 2>&1 && [ "$label" != "true" ]; then
            echo "kept $image (the real image)"
        elif timeout 120 $pull "$image" >/dev/null 2>&1; then
            echo "pulled $image"
        else
            # Only a machine that cannot pull gets a stand-in under the real name.
            docker tag "$stand_in" "$image"
            stand_ins+=("$image")
        fi
    done <<< "$catalog"
    if [ ${#stand_ins[@]} -gt 0 ]; then
        {
            echo "WARNING: no registry gave ${stand_ins[*]}."
            echo "WARNING: tagged local stand-ins (labelled dspy-agent.stand-in=true) under those names, so the"
            echo "WARNING: zero-config stack runs offline: a busybox HTTP server and the host's redis-server, not"
            echo "WARNING: the real services. \`dspy-agent status\` and ServiceInfo.stand_in say so; once a registry"
            echo "WARNING: is reachable, \`docker pull\` each of them (or rerun this script) to get the real images."
        } >&2
    fi
fi
