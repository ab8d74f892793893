#!/bin/sh
# Stand-in HTTP service for tests and offline stacks: answers GET /health (and Ollama's
# /api/tags) on every port listed in $PORTS.
#   START_DELAY=N  wait N seconds before listening (a slow starter)
#   EXIT_CODE=N    print a line and exit with N at once (a crashing service)
pids=""
trap 'kill $pids 2>/dev/null; exit 0' TERM INT
if [ -n "$EXIT_CODE" ]; then
    echo "serve: exiting with code $EXIT_CODE as asked" >&2
    exit "$EXIT_CODE"
fi
if [ -n "$START_DELAY" ]; then
    echo "serve: starting in $START_DELAY s"
    sleep "$START_DELAY" &
    wait $!
fi
for port in ${PORTS:-6380 8000 8001 11434}; do
    httpd -f -p "$port" -h /www &
    pids="$pids $!"
done
echo "serve: listening on ${PORTS:-6380 8000 8001 11434}"
wait
