"""PostgreSQL task-queue benchmark: dspy_agent_infra's PostgreSQL store against pgqueuer and
procrastinate on the same server, and against its own SQLite store; then one, two and three
orchestrators (separate processes) sharing one database.

  single      N no-op tasks enqueued a batch of 1,000 at a time, each contender with its
              fastest way to enqueue many (ours: 1,000 concurrent submits; pgqueuer: `enqueue`
              with lists, one statement per batch; procrastinate: `batch_defer_async`), its
              worker in the same process, until all are complete; each contender in a database
              of its own on one server
  shared      N tasks over 1, 2 and 3 orchestrator processes on one database, each submitting
              its share and running whatever it claims: total tasks/s until the last completes

Usage: python bench/postgres.py [--tasks 20000] [--rounds 3] [--write docs/BENCHMARKS.md]
Needs DSPY_AGENT_TEST_POSTGRES (a server: `bash scripts/postgres.sh start DIR` prints it); the
peers' versions are pinned in requirements/dev.txt (`.venv/`, which scripts/test.sh makes, has
them); a missing peer is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from report import contest_arguments, installed_versions, interleaved_medians, write_section

from dspy_agent_infra import AgentInfra
from tasks import noop_rates, rates

BATCH = 1000
ROOT = Path(__file__).resolve().parent.parent


def server() -> str:
    url = os.environ.get("DSPY_AGENT_TEST_POSTGRES")
    if not url:
        sys.exit("set DSPY_AGENT_TEST_POSTGRES: `bash scripts/postgres.sh start /tmp/dspy-pg`")
    return url


def fresh_database() -> str:
    """A new, empty database on the server: its URL."""
    url = server()
    name = f"bench_{uuid.uuid4().hex[:10]}"
    subprocess.run(["psql", url, "-X", "-q", "-c", f"CREATE DATABASE {name}"], check=True)
    return url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    subprocess.run(
        ["psql", server(), "-X", "-q", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
        check=True,
    )


async def bench_ours(n: int, store: str) -> dict[str, float]:
    config = {
        "tasks": {"store": store, "concurrency": 256},
        "orchestrator_addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
    }
    async with AgentInfra.start(services=[], config=config) as infra:
        return await noop_rates(infra, n)


async def bench_pgqueuer(n: int, url: str) -> dict[str, float] | None:
    try:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
    except ImportError:
        return None
    setup = await asyncpg.connect(url)
    await Queries(AsyncpgDriver(setup)).install()
    worker_conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(worker_conn)))
    count = 0
    done = asyncio.Event()

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    # Its documented knob for throughput: dequeue many jobs per query.
    running = asyncio.create_task(qm.run(batch_size=100))
    queries = Queries(AsyncpgDriver(setup))
    began = time.perf_counter()
    for start in range(0, n, BATCH):
        k = min(n, start + BATCH) - start
        await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
    enqueued = time.perf_counter()
    await asyncio.wait_for(done.wait(), 600)
    finished = time.perf_counter()
    qm.shutdown.set()
    await asyncio.wait_for(running, 30)
    await setup.close()
    await worker_conn.close()
    return rates(n, began, enqueued, finished)


async def bench_procrastinate(n: int, url: str) -> dict[str, float] | None:
    try:
        import procrastinate
    except ImportError:
        return None
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    count = 0
    done = asyncio.Event()

    @app.task(name="noop")
    async def noop() -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        worker = asyncio.create_task(
            app.run_worker_async(concurrency=64, fetch_job_polling_interval=0.05)
        )
        began = time.perf_counter()
        for start in range(0, n, BATCH):
            await noop.batch_defer_async(*({} for _ in range(start, min(n, start + BATCH))))
        enqueued = time.perf_counter()
        await asyncio.wait_for(done.wait(), 600)
        finished = time.perf_counter()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    return rates(n, began, enqueued, finished)


# One orchestrator of the shared runs: waits for GO on stdin, submits its share, runs whatever
# it claims, prints nothing more.
ORCHESTRATOR = """
import asyncio, sys
from dspy_agent_infra import AgentInfra

async def main(url, first, n):
    config = {"tasks": {"store": url, "concurrency": 256}, "orchestrator_addr": "127.0.0.1:0",
              "env_manager_addr": "127.0.0.1:0",
              "http_addr": "127.0.0.1:0"}
    async with AgentInfra.start(services=[], config=config) as infra:
        @infra.task_handler("noop")
        async def noop(task):
            return None
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for start in range(first, first + n, 1000):
            await asyncio.gather(*(infra.submit_task(f"t{i}", "noop", b"")
                                   for i in range(start, min(first + n, start + 1000))))
        await asyncio.to_thread(sys.stdin.readline)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def completed_count(url: str) -> int:
    out = subprocess.run(
        [
            "psql",
            url,
            "-X",
            "-tAc",
            "SELECT count(*) FROM dspy_agent_tasks WHERE state = 'COMPLETED'",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip())


def bench_shared(n: int, orchestrators: int) -> dict[str, float]:
    url = fresh_database()
    share = n // orchestrators
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(orchestrators):
                env = dict(os.environ, DSPY_AGENT_STATE_DIR=f"{tmp}/node{k}")
                proc = subprocess.Popen(
                    [sys.executable, "-c", ORCHESTRATOR, url, str(k * share), str(share)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                procs.append(proc)
            for proc in procs:
                assert proc.stdout is not None
                assert proc.stdout.readline().startswith("READY")
            began = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("GO\n")
                proc.stdin.flush()
            total = share * orchestrators
            while completed_count(url) < total:
                if time.perf_counter() - began > 600:
                    raise RuntimeError("the shared run did not finish within 600 s")
                time.sleep(0.02)
            elapsed = time.perf_counter() - began
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("STOP\n")
                proc.stdin.flush()
                proc.wait(60)
        return {"throughput": total / elapsed}
    finally:
        for proc in procs:
            proc.kill()
        drop_database(url)


def run_one(name: str, n: int) -> dict[str, float] | None:
    if name.startswith("shared"):
        return bench_shared(n, int(name[len("shared") :]))
    if name == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            return asyncio.run(bench_ours(n, f"{tmp}/tasks.db"))
    url = fresh_database()
    try:
        if name == "ours":
            return asyncio.run(bench_ours(n, url))
        if name == "pgqueuer":
            return asyncio.run(bench_pgqueuer(n, url))
        return asyncio.run(bench_procrastinate(n, url))
    finally:
        drop_database(url)


def versions() -> str:
    out = subprocess.run(
        ["psql", server(), "-X", "-tAc", "SHOW server_version"], capture_output=True, text=True
    ).stdout.strip()
    packages = ["pgqueuer", "procrastinate", "asyncpg", "psycopg"]
    return ", ".join([*installed_versions(packages, "not installed"), f"PostgreSQL {out}"])


def main() -> None:
    args = contest_arguments(__doc__)
    n = args.tasks
    if args.only:
        print(json.dumps(run_one(args.only, n)))
        return

    names = ["ours", "sqlite", "pgqueuer", "procrastinate", "shared1", "shared2", "shared3"]
    results = interleaved_medians(__file__, names, args.rounds, "--tasks", str(n))
    ours = results["ours"]
    assert ours is not None
    labels = {
        "ours": "dspy_agent_infra, PostgreSQL store",
        "sqlite": "dspy_agent_infra, SQLite store (the embedded default)",
        "pgqueuer": "pgqueuer (asyncpg, `batch_size=100`)",
        "procrastinate": "procrastinate (psycopg, `concurrency=64`)",
    }
    table = [
        "| contender | enqueue/s | processed/s | end to end/s | PostgreSQL store is N times "
        "faster (end to end) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in labels.items():
        r = results[name]
        if r is None:
            table.append(f"| {label} | not installed | | | |")
            continue
        table.append(
            f"| {label} | {r['enqueue']:.0f} | {r['processing']:.0f} | {r['throughput']:.0f} "
            f"| {ours['throughput'] / r['throughput']:.2f} |"
        )
    one = results["shared1"]
    assert one is not None
    shared = ["| orchestrators | tasks/s (all together) | against one |", "| ---: | ---: | ---: |"]
    for k in (1, 2, 3):
        r = results[f"shared{k}"]
        assert r is not None
        ratio = r["throughput"] / one["throughput"]
        shared.append(f"| {k} | {r['throughput']:.0f} | {ratio:.2f} |")
    report = (
        textwrap.dedent(
            f"""\
            ## Task queue on PostgreSQL: against pgqueuer and procrastinate, and shared

            `python bench/postgres.py --tasks {n} --rounds {args.rounds}` on
            {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()};
            {versions()}, the server as `scripts/postgres.sh` starts it (`fsync` and
            `synchronous_commit` on, as Debian ships them; autovacuum every 5 s). Each
            contender in a fresh process and a fresh database of the one server, rounds
            interleaved, each figure the median of the rounds. {n} no-op tasks enqueued a
            batch of {BATCH} at a time with each contender's fastest way to enqueue many
            (ours: concurrent submits, gathered into one statement and commit; pgqueuer:
            `enqueue` with lists; procrastinate: `batch_defer_async`), the worker in the
            submitting process, until every one is complete. We keep each finished task with
            its result; procrastinate keeps finished jobs (its default
            `delete_jobs="never"`); pgqueuer moves each to its log table.

            """
        )
        + "\n".join(table)
        + textwrap.dedent(
            f"""

            Several orchestrators on one database: {n} tasks split over 1, 2 and 3
            orchestrator processes, each submitting its share and running whatever it claims
            (`FOR UPDATE SKIP LOCKED`), from the first submit until the database counts every
            task completed. All of them share this machine's {os.cpu_count()} CPUs with the
            server.

            """
        )
        + "\n".join(shared)
        + "\n"
    )
    print(report)
    if args.write:
        write_section(args.write, "postgres", report)


if __name__ == "__main__":
    main()
