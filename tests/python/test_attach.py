"""Attach mode: a stack started by `dspy-agent start` used by `AgentInfra.start()` in another
process, whose Python handlers serve tasks submitted from a third process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from test_cli import DSPY_AGENT, catalog_on_free_ports, run

from dspy_agent_infra import AgentInfra, OrchestratorClient, TaskInfo, TaskStatus
from helpers import containers, free_port

# An attached agent serving "double" (answers at once) and "hang" (never answers); it says
# "ready" once its handlers are registered, then runs until it is killed or told to leave.
WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from dspy_agent_infra import AgentInfra, Task

    async def main() -> None:
        async with AgentInfra.start() as infra:
            assert infra.attached, "expected to attach to the running stack"

            @infra.task_handler("double")
            async def double(task: Task) -> dict:
                return {"x": task.json()["x"] * 2, "by": "worker"}

            @infra.task_handler("hang")
            async def hang(task: Task) -> None:
                await asyncio.sleep(3600)

            print("ready", infra.env["REDIS_URL"], flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())
    """
)


@pytest.fixture
def daemon(tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A stack of one service started by the command line, on a known orchestrator port."""
    port = free_port()
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("ENV_MANAGER_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.setenv("DSPY_AGENT_SERVICES", "redis")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-agent.toml").write_text(catalog_on_free_ports())
    started = run("start")
    assert started.returncode == 0, started.stderr
    yield port
    subprocess.run([DSPY_AGENT, "stop", "--timeout", "1"], capture_output=True, timeout=60)


def start_worker() -> subprocess.Popen[str]:
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    line = worker.stdout.readline()
    if not line.startswith("ready redis://127.0.0.1:"):
        raise AssertionError(worker.stderr.read() if worker.stderr else line)
    return worker


async def served(client: OrchestratorClient, *task_types: str) -> None:
    """Waits until the orchestrator serves the types (a worker's hello is asynchronous)."""
    for _ in range(500):
        if set(task_types) <= set((await client.metrics())["task_types"]):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{task_types} never served")


async def wait_status(client: OrchestratorClient, task_id: str, status: TaskStatus) -> None:
    for _ in range(500):
        if (await client.get_task_status(task_id)).status == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{task_id} never became {status}")


async def test_an_attached_worker_serves_tasks_from_a_third_process(
    daemon: int, project: str
) -> None:
    before = containers(project)
    worker = start_worker()
    try:
        async with OrchestratorClient(port=daemon) as client:
            await served(client, "double", "hang")
            response = await client.submit_task("a1", "double", {"x": 21})
            assert response.success
            done = await client.wait_for_task("a1", timeout=30)
            assert done.status == TaskStatus.COMPLETED
            assert json.loads(done.result_payload) == {"x": 42, "by": "worker"}

            # The worker dies mid-task: its task goes back to the queue, unharmed.
            await client.submit_task("h1", "hang")
            await wait_status(client, "h1", TaskStatus.RUNNING)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
            await wait_status(client, "h1", TaskStatus.PENDING)
            back = await client.get_task_status("h1")
            assert back.attempts == 0 and "went away" in back.error

            # A new worker picks it up; cancelling it reaches that worker's handler.
            worker = start_worker()
            await served(client, "double", "hang")
            await wait_status(client, "h1", TaskStatus.RUNNING)
            assert await client.cancel_task("h1")
            await client.submit_task("a2", "double", {"x": 2})
            assert (
                json.loads((await client.wait_for_task("a2", timeout=30)).result_payload)["x"] == 4
            )
    finally:
        if worker.poll() is None:
            assert worker.stdin is not None
            worker.stdin.write("leave\n")
            worker.stdin.flush()
            worker.wait(timeout=30)
    assert worker.returncode == 0, worker.stderr.read() if worker.stderr else ""
    # Leaving an attached context leaves the stack as it was.
    assert containers(project) == before
    assert run("status").returncode == 0


async def test_attached_agent_sees_the_stack_and_leaves_it_running(
    daemon: int, project: str
) -> None:
    before = containers(project)
    async with AgentInfra.start() as infra:
        assert infra.attached
        assert infra.orchestrator_addr == f"127.0.0.1:{daemon}"
        assert set(infra.services) == {"redis"}
        assert infra.service("redis").container_id in before
        assert infra.env["REDIS_URL"].startswith("redis://127.0.0.1:")
        assert "Ready to accept connections" in await infra.logs("redis", 50)
        assert (await infra.status())["redis"].status == "healthy"
        restarted = await infra.restart("redis")
        assert restarted.status == "healthy"
        response = await infra.submit_task("p1", "ping")
        assert response.success
        info = await infra.wait_for_task("p1", timeout=10)
        assert info.result_payload == b"pong"
        statuses = [i.status async for i in _first_final(infra, "p1")]
        assert statuses[-1] == TaskStatus.COMPLETED
    assert containers(project) == before


async def test_an_attached_agent_is_told_which_services_the_stack_lacks(
    daemon: int, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dspy_agent_infra")
    async with AgentInfra.start(services=["redis", "infermesh"]) as infra:
        assert infra.attached and set(infra.services) == {"redis"}
        warned = [
            r.getMessage() for r in caplog.records if "has no such services" in r.getMessage()
        ]
        assert len(warned) == 1 and "infermesh" in warned[0], caplog.text
    caplog.clear()
    async with AgentInfra.start(services=["redis"]) as infra:
        assert not [r for r in caplog.records if "has no such services" in r.getMessage()]


async def _first_final(infra: AgentInfra, task_id: str) -> AsyncIterator[TaskInfo]:
    async for info in infra.watch_tasks([task_id]):
        yield info
        if info.status.is_final:
            return


async def test_an_orchestrator_of_another_project_is_refused(daemon: int) -> None:
    from dspy_agent_infra import PortInUseError

    with pytest.raises(PortInUseError) as refused:
        async with AgentInfra.start(project="someone-else"):
            pass
    assert "someone-else" in str(refused.value)
    assert f"127.0.0.1:{daemon}" in str(refused.value)
