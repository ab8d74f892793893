"""Task-queue benchmark: dspy_agent_infra against taskito and arq, in one run.

Every contender runs no-op tasks with a durable (or, for arq, Redis-backed) queue, its worker in
the same process as the submitter, each at its best documented settings:

  throughput  N tasks enqueued a batch of 1,000 at a time, each contender with its fastest way to
              enqueue many (ours: 1,000 concurrent submits, grouped into one commit; taskito:
              `enqueue_many`, one transaction per batch; arq: 1,000 concurrent `enqueue_job`),
              until all are complete: the enqueue rate (until the last batch is accepted), the
              processing rate (from then until the last completes) and end to end
  latency     one task at a time, submit until its result is seen: p50 and p99
  gRPC        (ours only) SubmitTask from a separate process with 128 calls in flight

Usage: python bench/tasks.py [--tasks 20000] [--write docs/BENCHMARKS.md]
The peers' versions are pinned in requirements/dev.txt (`.venv/`, which scripts/test.sh makes,
has them); needs a `redis-server` binary (for arq); a missing peer is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from report import (
    contest_arguments,
    installed_versions,
    interleaved_medians,
    redis_server_version,
    write_section,
)

from dspy_agent_infra import AgentInfra, Task

LATENCY_SAMPLES = 300
GRPC_IN_FLIGHT = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


BATCH = 1000


async def timed_batches(n: int, submit: Callable[[int], Awaitable[Any]]) -> None:
    for start in range(0, n, BATCH):
        await asyncio.gather(*(submit(i) for i in range(start, min(n, start + BATCH))))


def rates(n: int, began: float, enqueued: float, done: float) -> dict[str, float]:
    """Enqueue, processing and end-to-end rates from the three moments of a throughput run."""
    return {
        "enqueue": n / (enqueued - began),
        "processing": n / max(done - enqueued, 1e-9),
        "throughput": n / (done - began),
    }


async def noop_rates(infra: AgentInfra, n: int) -> dict[str, float]:
    """Serves "noop" with a no-op handler, submits `n` tasks of it a batch at a time and waits
    until all are complete: the enqueue, processing and end-to-end rates."""

    @infra.task_handler("noop")
    async def noop(task: Task) -> None:
        return None

    client = infra.orchestrator_client
    began = time.perf_counter()
    await timed_batches(n, lambda i: infra.submit_task(f"t{i}", "noop", b""))
    enqueued = time.perf_counter()
    while True:
        m = await client.metrics()
        if m["completed"] + m["failed"] >= n:
            break
        if time.perf_counter() - began > 600:
            raise RuntimeError(f"not all tasks finished within 600 s: {m}")
        await asyncio.sleep(0.005)
    if m["failed"]:
        raise RuntimeError(f"{m['failed']} no-op tasks failed: {m}")
    return rates(n, began, enqueued, time.perf_counter())


async def bench_ours(n: int, workdir: Path) -> dict[str, float]:
    config = {
        "tasks": {"store": str(workdir / "ours.db"), "concurrency": 256},
        "orchestrator_addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
    }
    async with AgentInfra.start(services=[], config=config) as infra:
        measured = await noop_rates(infra, n)

        latencies = []
        for i in range(LATENCY_SAMPLES):
            t0 = time.perf_counter()
            await infra.submit_task(f"l{i}", "noop", b"")
            await infra.wait_for_task(f"l{i}")
            latencies.append(time.perf_counter() - t0)

        grpc_rate = grpc_submit_rate(infra.orchestrator_addr, n)
        grpc_native = native_submit_rate(infra.orchestrator_addr, n)
    return {
        **measured,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "grpc_submit": grpc_rate,
        "grpc_native": grpc_native,
    }


GRPC_CLIENT = """
import asyncio, sys, time
from dspy_agent_infra import OrchestratorClient

async def main(port, n):
    client = OrchestratorClient(host="127.0.0.1", port=port)
    sem = asyncio.Semaphore(int(sys.argv[3]))
    async def one(i):
        async with sem:
            await client.submit_task(f"g{i}", "noop", b"")
    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    print(n / (time.perf_counter() - began))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def grpc_submit_rate(addr: str, n: int) -> float:
    port = addr.rpartition(":")[2]
    out = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, port, str(n), str(GRPC_IN_FLIGHT)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip())


ROOT = Path(__file__).resolve().parent.parent
LOAD_CLIENT = ROOT / "target" / "release" / "examples" / "grpc_load"


def native_submit_rate(addr: str, n: int) -> float:
    """SubmitTask from `bench/grpc_load.rs`, a client with no interpreter: what the server takes."""
    out = subprocess.run(
        [str(LOAD_CLIENT), addr, str(n), str(GRPC_IN_FLIGHT), "2"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip())


def bench_taskito(n: int, workdir: Path) -> dict[str, float] | None:
    try:
        from taskito import Queue
    except ImportError:
        return None
    logging.disable(logging.INFO)  # taskito logs every task at INFO
    # Its fastest settings here: a 1 ms scheduler poll and batches of 256.
    queue = Queue(
        db_path=str(workdir / "taskito.db"),
        workers=2,
        scheduler_poll_interval_ms=1,
        scheduler_batch_size=256,
    )

    @queue.task()  # type: ignore[untyped-decorator, unused-ignore]
    def noop(i: int) -> None:
        return None

    threading.Thread(target=queue.run_worker, daemon=True).start()
    began = time.perf_counter()
    # Its batch API: one transaction per batch.
    for start in range(0, n, BATCH):
        queue.enqueue_many(noop.name, [(i,) for i in range(start, min(n, start + BATCH))])
    enqueued = time.perf_counter()
    while queue.stats().get("completed", 0) < n:
        time.sleep(0.005)
    measured = rates(n, began, enqueued, time.perf_counter())
    latencies = []
    for i in range(LATENCY_SAMPLES):
        t0 = time.perf_counter()
        noop.delay(i).result(timeout=30, poll_interval=0.0005, max_poll_interval=0.001)
        latencies.append(time.perf_counter() - t0)
    logging.disable(logging.NOTSET)
    return {
        **measured,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
    }


async def bench_arq(n: int) -> dict[str, float] | None:
    try:
        from arq import create_pool
        from arq.connections import RedisSettings
        from arq.worker import Worker, func
    except ImportError:
        return None
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        return None
    port = free_port()
    redis = subprocess.Popen(
        [redis_server, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        settings = RedisSettings(port=port)
        for _ in range(100):
            try:
                pool = await create_pool(settings)
                break
            except OSError:
                await asyncio.sleep(0.05)

        async def noop(ctx: dict[str, Any], i: int) -> None:
            return None

        worker = Worker(
            functions=[func(noop, name="noop")],
            redis_settings=settings,
            max_jobs=256,
            poll_delay=0.001,
            handle_signals=False,
        )
        running = asyncio.ensure_future(worker.async_run())
        began = time.perf_counter()
        await timed_batches(n, lambda i: pool.enqueue_job("noop", i))
        enqueued = time.perf_counter()
        while worker.jobs_complete < n:
            await asyncio.sleep(0.005)
        measured = rates(n, began, enqueued, time.perf_counter())
        latencies = []
        for i in range(LATENCY_SAMPLES):
            t0 = time.perf_counter()
            job = await pool.enqueue_job("noop", i)
            assert job is not None
            await job.result(poll_delay=0.0005)
            latencies.append(time.perf_counter() - t0)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await pool.aclose()
        return {
            **measured,
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
        }
    finally:
        redis.terminate()
        redis.wait()


def peer_versions() -> str:
    """The installed versions of the peers, as measured."""
    return ", ".join(installed_versions(["taskito", "arq"]) + redis_server_version())


def run_one(name: str, n: int) -> dict[str, float] | None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if name == "ours":
            return asyncio.run(bench_ours(n, workdir))
        if name == "taskito":
            return bench_taskito(n, workdir)
        return asyncio.run(bench_arq(n))


def main() -> None:
    args = contest_arguments(__doc__)
    n = args.tasks
    if args.only == "ours" or not args.only:
        # The load client is built before anything is timed.
        subprocess.run(
            ["cargo", "build", "--release", "--quiet", "--example", "grpc_load"],
            cwd=ROOT,
            check=True,
        )
    if args.only:
        print(json.dumps(run_one(args.only, n)))
        return

    # Each contender in a fresh process, so none inherits another's threads or memory.
    results = interleaved_medians(
        __file__, ["ours", "taskito", "arq"], args.rounds, "--tasks", str(n)
    )
    ours = results["ours"]
    assert ours is not None
    taskito, arq = results["taskito"], results["arq"]

    rows = [("dspy_agent_infra (SQLite, Python async handler)", ours)]
    if taskito:
        rows.append(("taskito (SQLite, Python handler)", taskito))
    if arq:
        rows.append(("arq (Redis, Python async handler)", arq))
    table = [
        "| contender | enqueue/s | processed/s | end to end/s | ours is N times faster "
        "(end to end) | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        table.append(
            f"| {name} | {r['enqueue']:.0f} | {r['processing']:.0f} | {r['throughput']:.0f} "
            f"| {ours['throughput'] / r['throughput']:.2f} "
            f"| {r['p50'] * 1000:.2f} | {r['p99'] * 1000:.2f} |"
        )
    report = (
        textwrap.dedent(
            f"""\
            ## Task queue: no-op tasks through a durable queue

            `python bench/tasks.py --tasks {n} --rounds {args.rounds}` on {platform.machine()},
            {os.cpu_count()} CPUs, Python {platform.python_version()}, each contender in a fresh
            process, rounds interleaved, each figure the median of the rounds. Peers:
            {peer_versions()}. Throughput: {n} tasks enqueued a batch of {BATCH} at a time
            with each contender's fastest way to enqueue many (ours: concurrent submits grouped
            into one commit; taskito: `enqueue_many`, one transaction per batch; arq:
            concurrent `enqueue_job`), until every one is complete; enqueue/s counts until the
            last batch is accepted, processed/s from then to the last completion. Latency: one
            task at a time, submit until its result is seen ({LATENCY_SAMPLES} samples). Each
            worker runs in the submitting process. On this virtual machine single runs of one
            build vary by a quarter or more with the host's load, for every contender alike;
            hence medians of interleaved rounds, and ratios taken within one run.

            """
        )
        + "\n".join(table)
        + textwrap.dedent(
            f"""

            gRPC `SubmitTask` from a separate process, {GRPC_IN_FLIGHT} calls in flight, {n}
            tasks, while the stack runs them:

            | client | submits/s |
            | --- | ---: |
            | `OrchestratorClient` (Python, this package) | {ours["grpc_submit"]:.0f} |
            | `bench/grpc_load.rs` (Rust, tonic, 2 connections) | {ours["grpc_native"]:.0f} |

            The Rust client shows what the server takes with no interpreter on the client side.

            Settings: dspy_agent_infra with its defaults (`durability = "process"`: a commit
            survives the process being killed) and 256 handlers at once; taskito with a 1 ms
            scheduler poll and batches of 256 (its defaults poll every 50 ms); arq with a 1 ms
            poll and 256 jobs at once, against a local Redis without persistence.
            """
        )
    )
    print(report)
    if args.write:
        write_section(args.write, "tasks", report)


if __name__ == "__main__":
    main()
