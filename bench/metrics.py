"""What the metrics cost: the task benchmark's throughput with `/metrics` not scraped, scraped
every second (as a Prometheus server would) and every 100 ms, in one run.

Each round runs every mode in a fresh process, each round starting with another mode (so a
slow spell of the machine, or going first, falls on all of them): N no-op tasks submitted a
batch of 1,000 at a time to an in-process stack, until all are complete. The counters and
histograms are always on; what a scrape adds is reading the queue depth and the services and
encoding the text.

Usage: python bench/metrics.py [--tasks 200000] [--rounds 5] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from report import in_fresh_process, write_section

from dspy_agent_infra import AgentInfra, Task

BATCH = 1000
MODES = {"none": None, "1s": 1.0, "100ms": 0.1}


async def throughput(n: int, scrape_every: float | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        config = {
            "tasks": {"store": str(Path(workdir) / "tasks.db"), "concurrency": 256},
            "orchestrator_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
        }
        async with AgentInfra.start(services=[], config=config, state_dir=workdir) as infra:

            @infra.task_handler("noop")
            async def noop(task: Task) -> None:
                return None

            stop = threading.Event()
            scrapes = 0

            def scrape() -> None:
                nonlocal scrapes
                request = urllib.request.Request(
                    f"http://{infra.http_addr}/metrics",
                    headers={"Authorization": f"Bearer {infra.token}"},
                )
                while scrape_every is not None and not stop.wait(scrape_every):
                    with urllib.request.urlopen(request, timeout=10) as r:
                        r.read()
                    scrapes += 1

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
            client = infra.orchestrator_client
            began = time.perf_counter()
            for start in range(0, n, BATCH):
                await asyncio.gather(
                    *(
                        infra.submit_task(f"t{i}", "noop", b"")
                        for i in range(start, min(n, start + BATCH))
                    )
                )
            while (m := await client.metrics())["completed"] < n:
                if m["failed"]:
                    raise RuntimeError(f"no-op tasks failed: {m}")
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - began
            stop.set()
            scraper.join()
    return {"throughput": n / elapsed, "scrapes": scrapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough tasks for a run of several seconds, so that a scrape every second happens.
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--only", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(asyncio.run(throughput(args.tasks, MODES[args.only]))))
        return
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    scraped: dict[str, list[int]] = {mode: [] for mode in MODES}
    modes = list(MODES)
    for r in range(args.rounds):
        # Each round starts with another mode, so none always runs first.
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            done = runs[mode]
            result = in_fresh_process(__file__, "--only", mode, "--tasks", str(args.tasks))
            print(mode, result, file=sys.stderr)
            done.append(result["throughput"])
            scraped[mode].append(result["scrapes"])
    base = statistics.median(runs["none"])
    rows = []
    for mode, rates in runs.items():
        median = statistics.median(rates)
        label = "not scraped" if mode == "none" else f"scraped every {mode}"
        rows.append(
            f"| {label} | {median:,.0f} | {median / base:.3f} | "
            f"{min(rates):,.0f} to {max(rates):,.0f} | {statistics.median(scraped[mode]):.0f} |"
        )
    report = "\n".join(
        [
            "## Metrics",
            "",
            f"`python bench/metrics.py --tasks {args.tasks} --rounds {args.rounds}`: "
            f"{args.tasks:,} no-op tasks through an in-process stack, median of "
            f"{args.rounds} rounds, each mode in a fresh process, each round starting with "
            "another mode.",
            "",
            "| `/metrics` | tasks/s | vs not scraped | range | scrapes per run |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(report)
    if args.write:
        write_section(args.write, "metrics", report)


if __name__ == "__main__":
    main()
