#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust tests, then the Python tests against the real
# Docker Engine (which scripts/provision.sh makes sure of).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/provision.sh
# Every Python package of the tests, the lints and the benchmarks, at the exact versions of
# requirements/dev.txt, in a virtual environment of this checkout's own (.venv/): made when
# missing, made again when the pins or the interpreter changed, reused otherwise. Nothing is
# installed into the interpreter on PATH, so a run depends only on the clone and this script.
venv=.venv
wanted_stamp="$(python3 -c 'import sys; print(sys.version)') $(sha256sum requirements/dev.txt)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.dspy-agent-stamp" 2>/dev/null)" != "$wanted_stamp" ]; then
    echo "test: making $venv from requirements/dev.txt"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements/dev.txt
    echo "$wanted_stamp" >"$venv/.dspy-agent-stamp"
else
    echo "test: reusing $venv (requirements/dev.txt unchanged)"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# The security tests call the ports as a second, unprivileged local user, with Debian's own
# grpcio (this interpreter's lives in a folder that user cannot enter); the Podman tests run a
# Podman API service of their own; the metrics tests run Debian's promtool and Prometheus,
# unpacked (no service installed); the dashboard's test runs Debian's headless Chromium. The
# swarm tests start a three-node swarm of their own (scripts/swarm_lab.sh: three more Engines in
# network namespaces) and remove it afterwards.
prometheus=/opt/dspy-agent-prometheus
if [ "$(id -u)" = 0 ]; then
    wanted=()
    /usr/bin/python3 -c "import grpc" >/dev/null 2>&1 || wanted+=(python3-grpcio)
    command -v podman >/dev/null 2>&1 || wanted+=(podman)
    # The dashboard's test drives Debian's headless Chromium through its chromedriver.
    command -v chromium >/dev/null 2>&1 || wanted+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || wanted+=(chromium-driver)
    if [ ${#wanted[@]} -gt 0 ] || [ ! -x "$prometheus/usr/bin/promtool" ]; then
        apt-get update -q
    fi
    if [ ${#wanted[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${wanted[@]}"
    fi
    if [ ! -x "$prometheus/usr/bin/promtool" ]; then
        download=$(mktemp -d)
        (cd "$download" && apt-get download -q prometheus && dpkg -x prometheus_*.deb "$prometheus")
        rm -rf "$download"
    fi
    id dspy-intruder >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin dspy-intruder
fi
# The PostgreSQL task store's tests run against a server of their own, on loopback with a
# password (scripts/postgres.sh), stopped and removed at the end; they read its URL from
# DSPY_AGENT_TEST_POSTGRES (and its folder, to restart it under load, from
# DSPY_AGENT_TEST_POSTGRES_DIR).
if [ -z "${DSPY_AGENT_TEST_POSTGRES:-}" ]; then
    pg_dir=$(mktemp -d /tmp/dspy-agent-pg.XXXXXX)
    trap 'bash scripts/postgres.sh stop "$pg_dir" || true; rm -rf "$pg_dir"' EXIT
    DSPY_AGENT_TEST_POSTGRES=$(bash scripts/postgres.sh start "$pg_dir")
    DSPY_AGENT_TEST_POSTGRES_DIR=$pg_dir
    export DSPY_AGENT_TEST_POSTGRES DSPY_AGENT_TEST_POSTGRES_DIR
fi
# A debug build is enough for tests and builds in a fraction of the release time.
# maturin comes from the pins too, not from whatever a build-isolation download finds newest.
MATURIN_PEP517_ARGS="--profile=dev" python -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps -e .

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --features python -- -D warnings
cargo test
ruff check .
ruff format --check .
mypy --strict python/dspy_agent_infra tests/python examples bench scripts
python -m pytest "$@"
