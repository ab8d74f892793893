#!/usr/bin/env bash
# Builds the small local images the tests use, from binaries of this host: nothing is pulled.
#   dspy-agent-test/busybox  busybox + serve.sh: an HTTP service with /health (see serve.sh)
#   dspy-agent-test/redis    the host's redis-server (with its libraries) + busybox
# With --tag-catalog, also tags them with the built-in catalog's image names that are not
# present yet (a real image of that name is never replaced), so the zero-config stack runs on a machine without registry access.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

is_static() { [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1; }
busybox=""
for candidate in "$(command -v busybox || true)" /bin/busybox /usr/bin/busybox; do
    if [ -n "$candidate" ] && is_static "$candidate"; then busybox=$candidate; break; fi
done
[ -n "$busybox" ] || { echo "build.sh: a static busybox is needed (apt-get install busybox-static)" >&2; exit 1; }
redis=$(command -v redis-server || true)
[ -n "$redis" ] || { echo "build.sh: redis-server is needed (apt-get install redis-server)" >&2; exit 1; }

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
real=$(readlink -f "$redis")
mkdir -p "$root/usr/bin"
cp "$real" "$root/usr/bin/redis-server"
for lib in $(ldd "$real" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
import "$root" dspy-agent-test/redis:latest '["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp"]'

if [ "${1:-}" = "--tag-catalog" ]; then
    tag_if_absent() {
        local stand_in
        stand_in=$(docker image inspect -f '{{index .Config.Labels "dspy-agent.stand-in"}}' "$2" 2>/dev/null || true)
        if docker image inspect "$2" >/dev/null 2>&1 && [ "$stand_in" != "true" ]; then
            echo "kept existing $2 (not a stand-in)"
        else
            docker tag "$1" "$2" && echo "tagged $2 (local stand-in)"
        fi
    }
    tag_if_absent dspy-agent-test/redis:latest redis:7-alpine
    for image in dspy-agent/reddb:latest dspy-agent/infermesh:latest dspy-agent/model-server:latest ollama/ollama:latest; do
        tag_if_absent dspy-agent-test/busybox:latest "$image"
    done
fi
