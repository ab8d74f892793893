"""A process running the queue is killed with SIGKILL mid-run (40 tasks, and a thousand in flight
at a random moment); a new process on the same SQLite file finds every acknowledged task, none
lost, none completed twice, no result overwritten by a stale attempt."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dspy_agent_infra import AgentInfra, Task, TaskStatus

WORKER = textwrap.dedent(
    """
    import asyncio, os, random, sys
    from dspy_agent_infra import AgentInfra

    async def main(store, n, limit):
        config = {"tasks": {"store": store, "limits": {"work": limit}},
                  "orchestrator_addr": "127.0.0.1:0"}
        async with AgentInfra.start(services=[], config=config) as infra:

            @infra.task_handler("work")
            async def work(task):
                await asyncio.sleep(random.uniform(0.01, 0.2))
                return f"{task.task_id}:{os.getpid()}"

            async def submit(i):
                await infra.submit_task(f"w{i:04}", "work", {"i": i}, max_retries=3)
                print(f"ACK w{i:04}", flush=True)

            # Every task is submitted at once: all of them are in flight together.
            await asyncio.gather(*(submit(i) for i in range(n)))
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


READER = """
import json, sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(sys.argv[2])
print(json.dumps({key: value.decode() for key, value in rows}))
"""


def read_pairs(db: Path, query: str) -> dict[str, str]:
    """(text, blob) rows of `query` on the file, read by another process: two copies of SQLite
    in one process (Python's and the core's) must not share a database file."""
    out = subprocess.run(
        [sys.executable, "-c", READER, str(db), query], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, str] = json.loads(out)
    return result


def completed(db: Path) -> dict[str, str]:
    """The COMPLETED tasks and their results."""
    return read_pairs(db, "SELECT task_id, result FROM tasks WHERE state = 'COMPLETED'")


async def killed_mid_run(db: Path, n: int, limit: int, kill_after: int) -> None:
    """Runs `n` tasks in a subprocess, SIGKILLs it once `kill_after` have completed, and checks
    that a new process on the same file finishes the rest: none lost, none completed twice, no
    result overwritten."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(db), str(n), str(limit)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(line.split()[1])
        if len(acknowledged) == n:
            break
    # Kill while some tasks are done, some running and the rest waiting.
    deadline = time.monotonic() + 60
    while len(completed(db)) < kill_after and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = completed(db)
    assert kill_after <= len(before) < n

    runs: list[str] = []
    async with AgentInfra.start(
        services=[], config={"tasks": {"store": str(db)}, "orchestrator_addr": "127.0.0.1:0"}
    ) as infra:

        @infra.task_handler("work")
        async def work(task: Task) -> str:
            runs.append(task.task_id)
            return f"{task.task_id}:{os.getpid()}"

        finals = [await infra.wait_for_task(task_id, timeout=60) for task_id in acknowledged]

    assert [f.status for f in finals] == [TaskStatus.COMPLETED] * n
    after = completed(db)
    assert sorted(after) == sorted(acknowledged)
    # What completed before the kill kept its result (from the killed process) ...
    for task_id, result in before.items():
        assert after[task_id] == result and str(proc.pid) in result
    # ... and only the rest ran again, each once.
    assert sorted(runs) == sorted(set(acknowledged) - set(before))


async def test_sigkill_loses_no_acknowledged_task(tmp_path: Path) -> None:
    await killed_mid_run(tmp_path / "tasks.db", n=40, limit=4, kill_after=6)


async def test_sigkill_with_a_thousand_tasks_in_flight(tmp_path: Path) -> None:
    # A random moment: anywhere from early to late in the run.
    kill_after = random.randint(50, 900)
    print(f"killing after {kill_after} of 1000 tasks completed")
    await killed_mid_run(tmp_path / "tasks.db", n=1000, limit=64, kill_after=kill_after)


SUBMITTER = textwrap.dedent(
    """
    import asyncio, sys
    from dspy_agent_infra import AgentInfra

    async def main(store, n):
        config = {"tasks": {"store": store}, "orchestrator_addr": "127.0.0.1:0"}
        async with AgentInfra.start(services=[], config=config) as infra:

            @infra.task_handler("work")
            async def work(task):
                await asyncio.sleep(3600)

            async def submit(i):
                await infra.submit_task(
                    f"s{i:04}", "work", {"i": i, "pad": "x" * 512}, max_retries=3
                )
                print(f"ACK s{i:04}", flush=True)

            # Waves of submits, so that the kill lands while some are acknowledged and others
            # are still on their way to the disk.
            for start in range(0, n, 50):
                await asyncio.gather(*(submit(i) for i in range(start, min(n, start + 50))))
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_sigkill_while_submits_are_in_flight(tmp_path: Path) -> None:
    db, n = tmp_path / "tasks.db", 2000
    kill_after = random.randint(1, 1500)
    print(f"killing after {kill_after} of {n} submits were acknowledged")
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBMITTER, str(db), str(n)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(line.split()[1])
        if len(acknowledged) == kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert len(acknowledged) == kill_after

    # A payload of more than a few hundred bytes is kept beside its task, in task_payloads.
    stored = read_pairs(
        db,
        "SELECT task_id, COALESCE((SELECT p.payload FROM task_payloads p WHERE p.seq = t.seq), "
        "t.payload) FROM tasks t",
    )
    # Every acknowledged submit is on disk; nothing past the submits that were sent is.
    assert set(acknowledged) <= set(stored)
    assert set(stored) <= {f"s{i:04}" for i in range(n)}
    # Whatever is there is whole: the payload it was submitted with, not part of it.
    for task_id, payload in stored.items():
        assert json.loads(payload) == {"i": int(task_id[1:]), "pad": "x" * 512}, task_id

    # A new process runs every stored task, acknowledged or not, exactly as submitted.
    ran: list[int] = []
    async with AgentInfra.start(
        services=[], config={"tasks": {"store": str(db)}, "orchestrator_addr": "127.0.0.1:0"}
    ) as infra:

        @infra.task_handler("work")
        async def work(task: Task) -> str:
            ran.append(task.json()["i"])
            return "done"

        finals = [await infra.wait_for_task(task_id, timeout=60) for task_id in sorted(stored)]
    assert {f.status for f in finals} == {TaskStatus.COMPLETED}
    assert sorted(ran) == sorted(int(t[1:]) for t in stored)
