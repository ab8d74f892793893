"""Writes one benchmark's section into docs/BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HEADER = (
    "# Benchmarks\n\n"
    "Speed is measured here, never asserted in tests: every figure is a ratio against peers\n"
    "measured in the same run on the same machine. Regenerate a section with the command it\n"
    "shows.\n"
)


def write_section(path: Path, name: str, markdown: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def in_fresh_process(script: str, *args: str) -> Any:
    """Runs `script` with `args` in a new interpreter, so that no run inherits another's
    threads or memory, and returns the JSON of its last line of output."""
    run = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(
            f"{Path(script).name} {' '.join(args)} failed (exit status {run.returncode}):\n"
            + run.stderr[-4000:]
        )
    return json.loads(run.stdout.strip().splitlines()[-1])


def contest_arguments(doc: str) -> argparse.Namespace:
    """The options of a contest run by `interleaved_medians`: --tasks, --rounds, --write, and
    the hidden --only NAME with which each contender runs in its own process."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each contender (median)")
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    return parser.parse_args()


def interleaved_medians(
    script: str, names: list[str], rounds: int, *args: str
) -> dict[str, dict[str, float] | None]:
    """Runs `script --only NAME *args` for every name, each in a fresh process, `rounds` times
    with the rounds interleaved (a slow spell of the machine falls on all of them alike), and
    returns each figure's median per name; None for a contender that was skipped."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, done in runs.items():
            result = in_fresh_process(script, "--only", name, *args)
            print(name, result, file=sys.stderr)
            if result is not None:
                done.append(result)
    return {
        name: {key: statistics.median(r[key] for r in done) for key in done[0]} if done else None
        for name, done in runs.items()
    }


def installed_versions(packages: list[str], missing: str = "not installed (skipped)") -> list[str]:
    """ "package version" for each installed package, `missing` after the others."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} {missing}")
    return found


def redis_server_version() -> list[str]:
    """The local redis-server's version, if there is one."""
    redis = shutil.which("redis-server")
    if not redis:
        return []
    out = subprocess.run([redis, "--version"], capture_output=True, text=True).stdout
    return [f"redis-server {out.split('v=')[1].split()[0]}" if "v=" in out else out]


def psql(url: str, sql: str) -> str:
    """Runs `sql` on the server at `url`; its output, unaligned."""
    return subprocess.run(
        ["psql", url, "-X", "-q", "-tA", "-c", sql], check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def postgres_schema(prefix: str) -> Iterator[tuple[str, str]]:
    """A new schema on the server of DSPY_AGENT_TEST_POSTGRES: its name and a URL that uses it.
    The server first writes out what earlier runs left in its buffers (CHECKPOINT, which needs
    a superuser or pg_checkpoint, as the user of `scripts/postgres.sh` is), so that no run pays
    for another's writes; the schema is dropped afterwards, so runs never fill the server."""
    url = os.environ["DSPY_AGENT_TEST_POSTGRES"]
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    psql(url, f"CREATE SCHEMA {schema}")
    try:
        psql(url, "CHECKPOINT")
        yield schema, f"{url}?options=-csearch_path%3D{schema}"
    finally:
        psql(url, f"DROP SCHEMA {schema} CASCADE")
