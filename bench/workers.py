"""Remote-worker benchmark: tasks spread over worker processes, against Celery and arq.

Ours: a `dspy-agent` daemon (the orchestrator, SQLite store), 1 and 2 worker processes that
attach to it with `AgentInfra.start()` and serve a no-op handler over the `Work` stream, and a
third process submitting N tasks over gRPC (`OrchestratorClient`, 256 calls in flight). Celery:
a Redis broker and result backend, 1 and 2 worker processes (`--pool=solo`: each worker one
process, prefetching 256), a third process publishing the tasks as groups of 1,000 and joining
them. arq: a Redis server, 1 and 2 worker processes (`max_jobs=256`), a third process enqueuing
with 256 calls in flight. Each figure is tasks per second from the first submit until the last
task is complete.

Usage: python bench/workers.py [--tasks 20000] [--rounds 3] [--write docs/BENCHMARKS.md]
The peers' versions are pinned in requirements/dev.txt (`.venv/`, which scripts/test.sh makes, has
them); needs a `redis-server` binary; a missing peer is skipped.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from report import (
    contest_arguments,
    installed_versions,
    interleaved_medians,
    redis_server_version,
    write_section,
)

DSPY_AGENT = str(Path(sys.executable).parent / "dspy-agent")
IN_FLIGHT = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# An attached worker: serves "noop" for the daemon, says "ready", runs until stdin closes.
OUR_WORKER = """
import asyncio, sys
from dspy_agent_infra import AgentInfra

async def main():
    async with AgentInfra.start() as infra:
        assert infra.attached, "the worker did not attach to the daemon"

        @infra.task_handler("noop")
        async def noop(task):
            return None

        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""

OUR_SUBMITTER = """
import asyncio, json, sys, time
from dspy_agent_infra import OrchestratorClient

async def main(port, n, in_flight):
    client = OrchestratorClient(host="127.0.0.1", port=port)
    await client.submit_task("warm", "noop", b"")
    await client.wait_for_task("warm", timeout=30)
    gate = asyncio.Semaphore(in_flight)

    async def one(i):
        async with gate:
            await client.submit_task(f"t{i}", "noop", b"")

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    submitted = time.perf_counter()
    while True:
        m = await client.metrics()
        if m["completed"] + m["failed"] >= n + 1:
            break
        await asyncio.sleep(0.005)
    done = time.perf_counter()
    assert m["failed"] == 0, m
    print(json.dumps({"submit": n / (submitted - began), "throughput": n / (done - began)}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


def last_json(cmd: list[str], **kwargs: Any) -> dict[str, float]:
    """Runs `cmd`; the JSON object its last line prints. A failure shows the command's stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def ours(n: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = dict(
            os.environ,
            DSPY_AGENT_PROJECT="bench-workers",
            DSPY_AGENT_STATE_DIR=f"{tmp}/state",
            ORCHESTRATOR_GRPC_ADDR=f"127.0.0.1:{port}",
            ENV_MANAGER_GRPC_ADDR="127.0.0.1:0",
            DSPY_AGENT_HTTP_ADDR="127.0.0.1:0",
            DSPY_AGENT_SERVICES="",
        )
        subprocess.run([DSPY_AGENT, "start"], env=env, cwd=tmp, check=True, capture_output=True)
        procs = []
        try:
            for _ in range(workers):
                proc = subprocess.Popen(
                    [sys.executable, "-c", OUR_WORKER],
                    env=env,
                    cwd=tmp,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(proc)
                assert proc.stdout is not None
                assert proc.stdout.readline().startswith("ready")
            return last_json(
                [sys.executable, "-c", OUR_SUBMITTER, str(port), str(n), str(IN_FLIGHT)],
                env=env,
            )
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            subprocess.run(
                [DSPY_AGENT, "stop", "--timeout", "1"], env=env, cwd=tmp, capture_output=True
            )


class Redis:
    """A throwaway redis-server without persistence."""

    def __init__(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None
        self.port = free_port()
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


CELERY_APP = """
import os
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS"], backend=os.environ["BENCH_REDIS"])
# Its documented throughput settings: a large prefetch, no per-task events.
app.conf.worker_prefetch_multiplier = 256
app.conf.task_acks_late = False
app.conf.worker_send_task_events = False
app.conf.broker_connection_retry_on_startup = True

@app.task(name="noop")
def noop():
    return None
"""

CELERY_SUBMITTER = """
import json, sys, time
from celery import group
from bench_celery import app, noop

n = int(sys.argv[1])
noop.delay().get(timeout=30)
began = time.perf_counter()
results = []
for start in range(0, n, 1000):
    results.append(group(noop.s() for _ in range(start, min(n, start + 1000))).apply_async())
submitted = time.perf_counter()
for r in results:
    r.get(timeout=600)
done = time.perf_counter()
print(json.dumps({"submit": n / (submitted - began), "throughput": n / (done - began)}))
"""


def peer_installed(module: str) -> bool:
    """Whether a Redis-based peer can run here: its package and a redis-server."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return shutil.which("redis-server") is not None


def celery(n: int, workers: int) -> dict[str, float] | None:
    if not peer_installed("celery"):
        return None
    redis = Redis()
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "bench_celery.py").write_text(CELERY_APP)
            env = dict(os.environ, BENCH_REDIS=f"redis://127.0.0.1:{redis.port}/0", PYTHONPATH=tmp)
            for k in range(workers):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "celery",
                            "-A",
                            "bench_celery",
                            "worker",
                            "--pool=solo",
                            "--loglevel=WARNING",
                            "-n",
                            f"w{k}@%h",
                        ],
                        env=env,
                        cwd=tmp,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            return last_json(
                [sys.executable, "-c", CELERY_SUBMITTER, str(n)],
                env=env,
                cwd=tmp,
            )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        redis.stop()


ARQ_WORKER = """
import asyncio, sys
from arq.connections import RedisSettings
from arq.worker import Worker, func

async def noop(ctx):
    return None

async def main():
    worker = Worker(functions=[func(noop, name="noop")],
                    redis_settings=RedisSettings(port=int(sys.argv[1])),
                    max_jobs=256, poll_delay=0.001, handle_signals=False)
    await worker.async_run()

asyncio.run(main())
"""

ARQ_SUBMITTER = """
import asyncio, json, sys, time
from arq import create_pool
from arq.connections import RedisSettings

async def main(port, n, in_flight):
    pool = await create_pool(RedisSettings(port=port))
    job = await pool.enqueue_job("noop")
    await job.result(timeout=30)
    gate = asyncio.Semaphore(in_flight)
    jobs = []

    async def one(i):
        async with gate:
            jobs.append(await pool.enqueue_job("noop"))

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    submitted = time.perf_counter()
    # Done when the queue is empty and no job is in progress.
    while await pool.zcard("arq:queue") or await pool.keys("arq:in-progress:*"):
        await asyncio.sleep(0.005)
    done = time.perf_counter()
    print(json.dumps({"submit": n / (submitted - began), "throughput": n / (done - began)}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


def arq(n: int, workers: int) -> dict[str, float] | None:
    if not peer_installed("arq"):
        return None
    redis = Redis()
    procs = []
    try:
        for _ in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-c", ARQ_WORKER, str(redis.port)]))
        return last_json(
            [sys.executable, "-c", ARQ_SUBMITTER, str(redis.port), str(n), str(IN_FLIGHT)],
        )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        redis.stop()


def run_one(name: str, n: int) -> dict[str, float] | None:
    contender, workers = name.rsplit("-", 1)
    run: Any = {"ours": ours, "celery": celery, "arq": arq}[contender]
    result: dict[str, float] | None = run(n, int(workers))
    return result


def versions() -> str:
    return ", ".join(installed_versions(["celery", "redis", "arq"]) + redis_server_version())


def main() -> None:
    args = contest_arguments(__doc__)
    n = args.tasks
    if args.only:
        print(json.dumps(run_one(args.only, n)))
        return
    names = [f"{c}-{k}" for c in ("ours", "celery", "arq") for k in (1, 2)]
    med = interleaved_medians(__file__, names, args.rounds, "--tasks", str(n))
    labels = {
        "ours": "dspy_agent_infra (daemon, attached `AgentInfra` workers, SQLite store)",
        "celery": "Celery (Redis broker and results, `--pool=solo` workers)",
        "arq": "arq (Redis, `max_jobs=256`)",
    }
    rows = [
        "| contender | 1 worker: tasks/s | 2 workers: tasks/s | 2 against 1 | ours (2 workers) "
        "is N times faster |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    best = med["ours-2"]
    assert best is not None
    for contender, label in labels.items():
        one, two = med[f"{contender}-1"], med[f"{contender}-2"]
        if one is None or two is None:
            rows.append(f"| {label} | not installed | | | |")
            continue
        rows.append(
            f"| {label} | {one['throughput']:.0f} | {two['throughput']:.0f} "
            f"| {two['throughput'] / one['throughput']:.2f} "
            f"| {best['throughput'] / two['throughput']:.2f} |"
        )
    report = (
        textwrap.dedent(
            f"""\
            ## Remote workers: tasks spread over worker processes

            `python bench/workers.py --tasks {n} --rounds {args.rounds}` on
            {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()};
            {versions()}. Every contender: the queue, 1 or 2 worker processes running a no-op
            task, and a third process submitting {n} tasks ({IN_FLIGHT} calls in flight for
            ours and arq; Celery publishes groups of 1,000, its batch API), from the first
            submit until the last task is complete. Ours: a `dspy-agent` daemon and workers
            that attach with `AgentInfra.start()` and serve the type over the `Work` stream.
            Celery: a prefetch of 256 and no task events, its documented throughput settings.
            arq: a 1 ms poll. Each contender in a fresh set of processes, rounds interleaved,
            medians. Everything shares this machine's {os.cpu_count()} CPUs.

            """
        )
        + "\n".join(rows)
        + "\n"
    )
    print(report)
    if args.write:
        write_section(args.write, "workers", report)


if __name__ == "__main__":
    main()
