"""Several orchestrators, in separate processes, on one PostgreSQL queue: a task submitted through
one runs where its type is served and is read, waited on, watched and cancelled through another;
an orchestrator SIGKILLed with a thousand tasks in flight leaves them to the others, none
completed twice; the database restarted under load loses nothing acknowledged; and a store that
cannot be used fails the start at once, saying why."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from dspy_agent_infra import AgentInfra, InfraError, Task, TaskStatus
from helpers import postgres_schema, postgres_url, psql

LEASE = "2s"

# An orchestrator in a process of its own, serving "work" (each task sleeps for its payload's
# "sleep" seconds). It prints READY once serving, SUBMITTED after submitting its share of tasks,
# and CANCELLED <id> when a handler of its own is cancelled.
ORCHESTRATOR = textwrap.dedent(
    """
    import asyncio, os, sys
    from dspy_agent_infra import AgentInfra

    async def main(url, n):
        config = {"tasks": {"store": url, "lease": sys.argv[3]},
                  "orchestrator_addr": "127.0.0.1:0"}
        async with AgentInfra.start(services=[], config=config) as infra:

            @infra.task_handler("work")
            async def work(task):
                try:
                    await asyncio.sleep(task.json().get("sleep", 0))
                except asyncio.CancelledError:
                    print(f"CANCELLED {task.task_id}", flush=True)
                    raise
                return f"{task.task_id}:{os.getpid()}"

            print("READY", flush=True)
            await asyncio.gather(*(
                infra.submit_task(f"a{i:04}", "work", {"sleep": 0.05}, max_retries=3)
                for i in range(n)
            ))
            print("SUBMITTED", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def shared(url: str) -> dict[str, Any]:
    return {"tasks": {"store": url, "lease": LEASE}, "orchestrator_addr": "127.0.0.1:0"}


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[Any]:
    """Starts orchestrators in processes of their own (each with its own state folder), and
    kills whatever is left at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(url: str, n: int = 0) -> subprocess.Popen[str]:
        env = dict(os.environ, DSPY_AGENT_STATE_DIR=str(tmp_path / f"node{len(started)}"))
        proc = subprocess.Popen(
            [sys.executable, "-c", ORCHESTRATOR, url, str(n), LEASE],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        started.append(proc)
        assert proc.stdout is not None
        expect(proc.stdout, "READY")
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def expect(stream: IO[str], word: str) -> str:
    for line in stream:
        if line.startswith(word):
            return line.strip()
    raise AssertionError(f"the orchestrator ended before it printed {word}")


def completed(url: str) -> dict[str, str]:
    """The COMPLETED tasks of the queue and their results."""
    rows = psql(
        url,
        "SELECT task_id, convert_from(result, 'UTF8') FROM dspy_agent_tasks "
        "WHERE state = 'COMPLETED'",
    )
    return {task_id: result for task_id, result in rows}


async def test_a_task_submitted_through_one_runs_on_another(orchestrator: Any) -> None:
    url = postgres_schema()
    a = orchestrator(url)
    async with AgentInfra.start(services=[], config=shared(url)) as b:
        # `b` serves no "work": it accepts the type because `a` does, and `a` runs the task.
        events: list[tuple[str, TaskStatus]] = []

        async def watch() -> None:
            async for info in b.watch_tasks():
                events.append((info.task_id, info.status))

        watching = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        await b.submit_task("t1", "work", {"sleep": 0.1})
        done = await b.wait_for_task("t1", timeout=30)
        assert done.status == TaskStatus.COMPLETED
        assert done.result_payload.decode() == f"t1:{a.pid}"
        assert (await b.get_task_status("t1")).status == TaskStatus.COMPLETED
        # Watched through `b`: every state the task went through on `a`.
        for _ in range(100):
            if ("t1", TaskStatus.COMPLETED) in events:
                break
            await asyncio.sleep(0.05)
        seen = [s for t, s in events if t == "t1"]
        assert seen[0] == TaskStatus.PENDING and seen[-1] == TaskStatus.COMPLETED, seen

        # Cancelled through `b`, the handler running on `a` is cancelled.
        await b.submit_task("long", "work", {"sleep": 600})
        for _ in range(200):
            if (await b.get_task_status("long")).status == TaskStatus.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert await b.cancel_task("long")
        assert a.stdout is not None
        assert expect(a.stdout, "CANCELLED") == "CANCELLED long"
        assert (await b.wait_for_task("long", timeout=10)).status == TaskStatus.CANCELLED
        watching.cancel()

        # A type nobody serves on this queue is still refused.
        with pytest.raises(InfraError, match='no handler serves task type "nobody"'):
            await b.submit_task("t2", "nobody", {})


async def test_an_orchestrator_killed_with_a_thousand_tasks_in_flight(orchestrator: Any) -> None:
    url = postgres_schema()
    n = 1000
    runs: list[str] = []
    async with AgentInfra.start(services=[], config=shared(url)) as b:

        @b.task_handler("work")
        async def work(task: Task) -> str:
            runs.append(task.task_id)
            await asyncio.sleep(task.json().get("sleep", 0))
            return f"{task.task_id}:{os.getpid()}"

        a = orchestrator(url, n)
        assert a.stdout is not None
        expect(a.stdout, "SUBMITTED")
        # Both run the queue; `a` is killed while it holds tasks.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            by_a = [r for r in completed(url).values() if r.endswith(f":{a.pid}")]
            if len(by_a) >= 50:
                break
            await asyncio.sleep(0.05)
        held = psql(url, "SELECT count(*) FROM dspy_agent_tasks WHERE state = 'RUNNING'")
        a.send_signal(signal.SIGKILL)
        a.wait()
        before = completed(url)
        assert len(before) < n, "every task was done before the kill: nothing was tested"
        assert int(held[0][0]) > 0
        # `b` takes over what `a` held once its leases end, and finishes every task.
        finals = [await b.wait_for_task(f"a{i:04}", timeout=120) for i in range(n)]
        assert [f.status for f in finals] == [TaskStatus.COMPLETED] * n

    after = completed(url)
    assert sorted(after) == [f"a{i:04}" for i in range(n)]
    # What completed before the kill kept its result; `b` ran each of the rest once, and none
    # of those `a` had completed.
    for task_id, result in before.items():
        assert after[task_id] == result
    assert len(runs) == len(set(runs)), "a task ran twice on the surviving orchestrator"
    assert not set(runs) & {t for t, r in before.items() if r.endswith(f":{a.pid}")}
    assert {t for t, r in after.items() if r.endswith(f":{a.pid}")} <= set(before)


async def test_the_database_restarted_under_load_loses_nothing() -> None:
    url = postgres_schema()
    folder = os.environ.get("DSPY_AGENT_TEST_POSTGRES_DIR")
    if not folder:
        raise RuntimeError(
            "DSPY_AGENT_TEST_POSTGRES_DIR names the test server's folder (scripts/test.sh sets "
            "it) so that this test can restart it"
        )
    n = 600
    runs: list[str] = []
    acknowledged: list[str] = []
    async with AgentInfra.start(services=[], config=shared(url)) as infra:

        @infra.task_handler("work")
        async def work(task: Task) -> str:
            runs.append(task.task_id)
            await asyncio.sleep(0.02)
            return task.task_id

        async def submit(i: int) -> None:
            # A submit the restart refuses is not acknowledged: the client tries again.
            for _ in range(100):
                try:
                    await infra.submit_task(f"r{i:04}", "work", {}, max_retries=3)
                    acknowledged.append(f"r{i:04}")
                    return
                except InfraError:
                    await asyncio.sleep(0.2)

        restarted_at: list[int] = []

        async def restart() -> None:
            while len(acknowledged) < n // 4:
                await asyncio.sleep(0.01)
            restarted_at.append(len(acknowledged))
            await asyncio.to_thread(
                subprocess.run,
                ["bash", "scripts/postgres.sh", "restart", folder],
                check=True,
                capture_output=True,
            )

        async def load() -> None:
            for start in range(0, n, 20):
                await asyncio.gather(*(submit(i) for i in range(start, start + 20)))
                await asyncio.sleep(0.02)

        await asyncio.gather(load(), restart())
        assert len(acknowledged) == n
        assert restarted_at[0] < n, "the load was over before the restart: nothing was tested"
        finals = [await infra.wait_for_task(t, timeout=120) for t in acknowledged]
        assert [f.status for f in finals] == [TaskStatus.COMPLETED] * n
    after = completed(url)
    assert sorted(after) == sorted(acknowledged)
    assert all(after[t] == t for t in after)


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("postgresql://dspy@127.0.0.1:1/x", "is the server running and reachable?"),
        ("postgresql://", "names no host"),
        ("postgresql://a:b@127.0.0.1:99999/x", "tasks.store"),
    ],
)
async def test_a_store_that_cannot_be_used_fails_the_start(store: str, says: str) -> None:
    started = time.monotonic()
    with pytest.raises(InfraError, match=says.replace("?", r"\?")):
        async with AgentInfra.start(services=[], config={"tasks": {"store": store}}):
            pass
    assert time.monotonic() - started < 30


async def test_wrong_credentials_and_a_newer_schema_fail_the_start() -> None:
    url = postgres_url()
    wrong = url.replace("://dspy:", "://dspy:wrong", 1)
    with pytest.raises(InfraError, match="refused the user or password") as refused:
        async with AgentInfra.start(services=[], config={"tasks": {"store": wrong}}):
            pass
    assert "wrong" not in str(refused.value), "the password was shown in the message"

    newer = postgres_schema()
    async with AgentInfra.start(services=[], config={"tasks": {"store": newer}}):
        pass
    psql(newer, "INSERT INTO dspy_agent_schema (version) VALUES (1000)")
    with pytest.raises(InfraError, match="version 1000, newer than"):
        async with AgentInfra.start(services=[], config={"tasks": {"store": newer}}):
            pass


async def test_an_orchestrator_that_stops_hands_its_tasks_over_at_once() -> None:
    url = postgres_schema()
    # A lease of an hour: only the hand-over at stop lets the other run the tasks soon.
    config = {
        "tasks": {"store": url, "lease": "1h", "concurrency": 16},
        "orchestrator_addr": "127.0.0.1:0",
    }
    ids = [f"handed-{i}" for i in range(48)]
    async with AgentInfra.start(services=[], config=config) as a:
        started = 0
        all_started = asyncio.Event()

        @a.task_handler("work")
        async def hang(task: Task) -> str:
            nonlocal started
            started += 1
            if started == 16:
                all_started.set()
            await asyncio.sleep(3600)
            return "never"

        # 16 running, 32 waiting: the handlers cancelled at stop free their slots while the
        # queue stops, and none of the waiting tasks may be taken meanwhile.
        for task_id in ids:
            await a.submit_task(task_id, "work", {})
        await asyncio.wait_for(all_started.wait(), 30)

    async with AgentInfra.start(services=[], config=config) as b:

        @b.task_handler("work")
        async def work(task: Task) -> str:
            return "done by b"

        for task_id in ids:
            done = await b.wait_for_task(task_id, timeout=30)
            assert done.status == TaskStatus.COMPLETED, task_id
            assert done.result_payload == b"done by b"
            # The stop cost no attempt.
            assert done.attempts == 1, task_id
