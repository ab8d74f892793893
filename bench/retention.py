"""Retention soak: a million no-op tasks through the durable queue, with finished tasks kept for
a short retention and, as the baseline in the same run, kept forever.

After every round of tasks it records the round's rate and the store's size on disk (the SQLite
file with its WAL; on PostgreSQL the table with its indexes and TOAST) and rows. With a retention
the store should stop growing once the retention window is full, and the rate should hold round
after round.

Usage: python bench/retention.py [--tasks 1000000] [--rounds 10] [--retention 10s]
                                 [--store sqlite|postgresql] [--write docs/BENCHMARKS.md]
PostgreSQL: a schema of its own on the server of DSPY_AGENT_TEST_POSTGRES.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from report import postgres_schema, psql, write_section

from dspy_agent_infra import AgentInfra, Task
from tasks import timed_batches


def sqlite_store(db: Path) -> tuple[str, Callable[[], int]]:
    """The store's setting, and how to read its size on disk (the file and its WAL)."""

    def size() -> int:
        return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.exists())

    return str(db), size


def postgres_store(schema: str, url: str) -> tuple[str, Callable[[], int]]:
    """The store at `url`, and how to read the size of its tasks table (with indexes, TOAST)."""
    server = os.environ["DSPY_AGENT_TEST_POSTGRES"]

    def size() -> int:
        return int(psql(server, f"SELECT pg_total_relation_size('{schema}.dspy_agent_tasks')"))

    return url, size


async def soak(
    n: int, rounds: int, retention: str, store: tuple[str, Callable[[], int]]
) -> list[dict[str, float]]:
    location, store_bytes = store
    config: dict[str, Any] = {
        "tasks": {"store": location, "concurrency": 256, "retention": retention},
        "orchestrator_addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
    }
    per_round = n // rounds
    results = []
    async with AgentInfra.start(services=[], config=config) as infra:

        @infra.task_handler("noop")
        async def noop(task: Task) -> None:
            return None

        client = infra.orchestrator_client
        done_before = 0
        for r in range(rounds):
            began = time.perf_counter()

            def submit(i: int, r: int = r) -> Awaitable[Any]:
                return infra.submit_task(f"r{r}-{i}", "noop", b"")

            await timed_batches(per_round, submit)
            while True:
                m = await client.metrics()
                if m["completed"] + m["failed"] >= done_before + per_round:
                    break
                await asyncio.sleep(0.01)
            done_before += per_round
            elapsed = time.perf_counter() - began
            stored = sum(m["by_status"].values())
            results.append(
                {
                    "tasks": done_before,
                    "rate": per_round / elapsed,
                    "mb": store_bytes() / 1e6,
                    "rows": stored,
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--retention", default="10s")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.store == "sqlite":
            kept = asyncio.run(
                soak(args.tasks, args.rounds, args.retention, sqlite_store(Path(tmp) / "kept.db"))
            )
            forever = asyncio.run(
                soak(args.tasks, args.rounds, "forever", sqlite_store(Path(tmp) / "all.db"))
            )
        else:
            with postgres_schema("r") as schema:
                kept = asyncio.run(
                    soak(args.tasks, args.rounds, args.retention, postgres_store(*schema))
                )
            with postgres_schema("r") as schema:
                forever = asyncio.run(
                    soak(args.tasks, args.rounds, "forever", postgres_store(*schema))
                )
    store = "SQLite" if args.store == "sqlite" else "PostgreSQL"
    size = (
        "the SQLite file and its WAL"
        if args.store == "sqlite"
        else "the tasks table with its indexes and TOAST, `pg_total_relation_size`, on the "
        "server as `scripts/postgres.sh` starts it: `autovacuum_naptime` 5 s"
    )
    rows = [
        f"| {k['tasks']:,} | {k['rate']:.0f} | {k['mb']:.1f} | {k['rows']:,} | "
        f"{f['rate']:.0f} | {f['mb']:.1f} | {f['rows']:,} |"
        for k, f in zip(kept, forever)
    ]
    report = textwrap.dedent(
        f"""
        ## Retention on {store}: a soak of {args.tasks:,} no-op tasks

        `python bench/retention.py --tasks {args.tasks} --rounds {args.rounds} --retention
        {args.retention} --store {args.store}` on {platform.machine()}: the tasks go through an
        in-process stack in {args.rounds} rounds, submitted 1,000 at a time; after each round,
        the round's rate (submit to all completed), the store's size on disk ({size}) and the
        tasks it holds. Left: finished tasks kept for {args.retention} (deleted in batches of
        500, every quarter of that); right, in the same run: kept forever.

        | tasks so far | tasks/s | store MB | stored | tasks/s, kept forever | store MB | stored |
        | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
        """
    ) + "\n".join(rows)
    print(report)
    if args.write:
        section = "retention" if args.store == "sqlite" else "retention-postgres"
        write_section(args.write, section, report)


if __name__ == "__main__":
    main()
