"""A process running the queue is killed with SIGKILL mid-run; a new process on the same SQLite
file finds every acknowledged task, none lost and none completed twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dspy_agent_infra import AgentInfra, Task, TaskStatus

N = 40

WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    from dspy_agent_infra import AgentInfra

    async def main(store):
        config = {"tasks": {"store": store, "limits": {"work": 4}},
                  "orchestrator_addr": "127.0.0.1:0"}
        async with AgentInfra.start(services=[], config=config) as infra:

            @infra.task_handler("work")
            async def work(task):
                await asyncio.sleep(0.2)
                return f"{task.task_id}:{os.getpid()}"

            for i in range(__N__):
                await infra.submit_task(f"w{i:02}", "work", {"i": i}, max_retries=3)
                print(f"ACK w{i:02}", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1]))
    """
).replace("__N__", str(N))


READER = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
rows = conn.execute("SELECT task_id, result FROM tasks WHERE state = 'COMPLETED'")
print(json.dumps({task_id: result.decode() for task_id, result in rows}))
"""


def completed(db: Path) -> dict[str, str]:
    """The COMPLETED tasks and their results, read from the file by another process: two copies
    of SQLite in one process (Python's and the core's) must not share a database file."""
    out = subprocess.run(
        [sys.executable, "-c", READER, str(db)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, str] = json.loads(out)
    return result


async def test_sigkill_loses_no_acknowledged_task(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(line.split()[1])
        if len(acknowledged) == N:
            break
    # Kill while some tasks are done, some running and the rest waiting.
    deadline = time.monotonic() + 30
    while len(completed(db)) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = completed(db)
    assert 6 <= len(before) < N

    runs: list[str] = []
    async with AgentInfra.start(
        services=[], config={"tasks": {"store": str(db)}, "orchestrator_addr": "127.0.0.1:0"}
    ) as infra:

        @infra.task_handler("work")
        async def work(task: Task) -> str:
            runs.append(task.task_id)
            return f"{task.task_id}:{os.getpid()}"

        finals = [await infra.wait_for_task(task_id, timeout=30) for task_id in acknowledged]

    assert [f.status for f in finals] == [TaskStatus.COMPLETED] * N
    after = completed(db)
    assert sorted(after) == sorted(acknowledged)
    # What completed before the kill kept its result (from the killed process) ...
    for task_id, result in before.items():
        assert after[task_id] == result and str(proc.pid) in result
    # ... and only the rest ran again, each once.
    assert sorted(runs) == sorted(set(acknowledged) - set(before))
