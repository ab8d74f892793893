"""Large payloads: concurrent submit-and-wait of tasks with a payload of each size through an
in-process stack, on each store, against the floor of a plain loop of inserts of the same size
into the same kind of store, in one run: SQLite (Python's sqlite3, WAL, synchronous=NORMAL as
the store uses, one commit per insert) and PostgreSQL (psycopg, one autocommitted insert each,
on the server of DSPY_AGENT_TEST_POSTGRES; skipped without it).

Usage: python bench/payloads.py [--tasks 3000] [--rounds 3] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from report import postgres_schema, write_section

from dspy_agent_infra import AgentInfra, Task

SIZES = (1_000, 10_000, 100_000)
CONCURRENCY = 64


def plain(path: Path, tasks: int, payload: bytes) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    began = time.perf_counter()
    for _ in range(tasks):
        db.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
    elapsed = time.perf_counter() - began
    db.close()
    return tasks / elapsed


def plain_postgres(tasks: int, payload: bytes) -> float:
    import psycopg

    with postgres_schema("p") as (_, url), psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE t (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)")
        began = time.perf_counter()
        for _ in range(tasks):
            db.execute("INSERT INTO t (payload) VALUES (%s)", (payload,))
        return tasks / (time.perf_counter() - began)


async def ours(state: Path, tasks: int, payload: bytes, store: str | None = None) -> float:
    config: dict[str, object] = {
        "orchestrator_addr": "127.0.0.1:0",
        "env_manager_addr": "127.0.0.1:0",
    }
    if store:
        config["tasks"] = {"store": store}
    async with AgentInfra.start(services=[], state_dir=state, config=config) as infra:

        @infra.task_handler("noop")
        async def noop(task: Task) -> None:
            return None

        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with slots:
                await infra.submit_task(f"t{i}", "noop", payload)
                await infra.wait_for_task(f"t{i}", timeout=120)

        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        return tasks / (time.perf_counter() - began)


def measure(name: str, folder: Path, tasks: int, payload: bytes) -> float:
    if name == "plain":
        return plain(folder / "plain.db", tasks, payload)
    if name == "plain-pg":
        return plain_postgres(tasks, payload)
    if name == "ours-pg":
        with postgres_schema("p") as (_, url):
            return asyncio.run(ours(folder / "state-pg", tasks, payload, url))
    return asyncio.run(ours(folder / "state", tasks, payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    pairs = [("plain", "ours")]
    if os.environ.get("DSPY_AGENT_TEST_POSTGRES"):
        pairs.append(("plain-pg", "ours-pg"))
    for r in range(args.rounds):
        for size in SIZES:
            payload = os.urandom(size)
            with tempfile.TemporaryDirectory() as tmp:
                # Each round starts with the other contender.
                order = [name for pair in pairs for name in (pair if r % 2 == 0 else pair[::-1])]
                for name in order:
                    rate = measure(name, Path(tmp), args.tasks, payload)
                    results.setdefault((name, size), []).append(rate)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for (floor_name, ours_name), store in zip(pairs, ("SQLite", "PostgreSQL")):
        for size in SIZES:
            floor = statistics.median(results[(floor_name, size)])
            ours_rate = statistics.median(results[(ours_name, size)])
            rows.append(
                f"| {store} | {size // 1000} kB | {ours_rate:,.0f} | {floor:,.0f} "
                f"| {ours_rate / floor:.2f} |"
            )
    report = (
        textwrap.dedent(
            f"""\
            ## Large payloads

            `python bench/payloads.py --tasks {args.tasks} --rounds {args.rounds}` on this
            machine: {args.tasks:,} tasks of each payload size submitted and waited for,
            {CONCURRENCY} at once, through an in-process stack with a no-op handler, on each
            store, against the floor of a plain loop of inserts of the same size into the same
            kind of store: SQLite (WAL, synchronous=NORMAL as the store uses, a commit each) and
            PostgreSQL (psycopg, an autocommitted insert each, the same server and settings as
            the store); median of {args.rounds} rounds, each pair alternating which goes first.

            | store | payload | ours, tasks/s | plain inserts/s | ratio |
            | --- | ---: | ---: | ---: | ---: |
            """
        )
        + "\n".join(rows)
        + "\n"
    )
    print(report)
    if args.write:
        write_section(args.write, "payloads", report)


if __name__ == "__main__":
    main()
