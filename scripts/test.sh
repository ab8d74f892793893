#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust tests, then the Python tests against the real
# Docker Engine (which scripts/provision.sh makes sure of).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/provision.sh
python3 -m pip install -q --upgrade "pytest>=8" "pytest-asyncio>=0.23" "mypy>=1.10" "ruff>=0.5" \
    "grpcio>=1.60" "grpcio-tools>=1.60" "grpcio-reflection>=1.60"
# A debug build is enough for tests and builds in a fraction of the release time.
MATURIN_PEP517_ARGS="--profile=dev" python3 -m pip install -q -e .

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --features python -- -D warnings
cargo test
ruff check .
ruff format --check .
mypy --strict python/dspy_agent_infra tests/python examples bench scripts
python3 -m pytest
