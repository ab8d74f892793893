"""Retention soak: a million no-op tasks through the durable queue, with finished tasks kept for
a short retention and, as the baseline in the same run, kept forever.

After every round of tasks it records the round's rate and the store's size on disk (the SQLite
file with its WAL) and rows. With a retention the store should stop growing once the retention
window is full, and the rate should hold round after round.

Usage: python bench/retention.py [--tasks 1000000] [--rounds 10] [--retention 10s]
                                 [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import textwrap
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from report import write_section

from dspy_agent_infra import AgentInfra, Task
from tasks import timed_batches


def store_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.exists())


async def soak(n: int, rounds: int, retention: str, db: Path) -> list[dict[str, float]]:
    config: dict[str, Any] = {
        "tasks": {"store": str(db), "concurrency": 256, "retention": retention},
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
                    "mb": store_bytes(db) / 1e6,
                    "rows": stored,
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--retention", default="10s")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        kept = asyncio.run(soak(args.tasks, args.rounds, args.retention, Path(tmp) / "kept.db"))
        forever = asyncio.run(soak(args.tasks, args.rounds, "forever", Path(tmp) / "all.db"))
    rows = [
        f"| {k['tasks']:,} | {k['rate']:.0f} | {k['mb']:.1f} | {k['rows']:,} | "
        f"{f['rate']:.0f} | {f['mb']:.1f} | {f['rows']:,} |"
        for k, f in zip(kept, forever)
    ]
    report = textwrap.dedent(
        f"""
        ## Retention: a soak of {args.tasks:,} no-op tasks

        `python bench/retention.py --tasks {args.tasks} --rounds {args.rounds} --retention
        {args.retention}` on {platform.machine()}: the tasks go through an in-process stack in
        {args.rounds} rounds, submitted 1,000 at a time; after each round, the round's rate
        (submit to all completed), the store's size on disk (the SQLite file and its WAL) and
        the tasks it holds. Left: finished tasks kept for {args.retention} (deleted in batches
        of 500 every quarter of that); right, in the same run: kept forever.

        | tasks so far | tasks/s | store MB | stored | tasks/s, kept forever | store MB | stored |
        | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
        """
    ) + "\n".join(rows)
    print(report)
    if args.write:
        write_section(args.write, "retention", report)


if __name__ == "__main__":
    main()
