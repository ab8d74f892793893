"""A child forked (multiprocessing's `fork` start method) while a stack runs in the parent gets
a runtime of its own: its own client and its own stack work, and the parent's stack is left as
it was."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from multiprocessing.queues import Queue
from pathlib import Path

from dspy_agent_infra import AgentInfra, OrchestratorClient, TaskStatus


def child(port: int, state: str, answers: Queue[tuple[bytes, bytes]]) -> None:
    async def main() -> tuple[bytes, bytes]:
        client = OrchestratorClient(host="127.0.0.1", port=port)
        await client.submit_task("from-child", "echo", "to the parent's stack")
        theirs = await client.wait_for_task("from-child", timeout=30)
        os.environ["DSPY_AGENT_STATE_DIR"] = state
        async with AgentInfra.start(
            services=[], config={"orchestrator_addr": "127.0.0.1:0"}
        ) as own:
            await own.submit_task("own", "echo", "to its own stack")
            mine = await own.wait_for_task("own", timeout=30)
        return theirs.result_payload, mine.result_payload

    answers.put(asyncio.run(main()))


async def test_a_forked_child_runs_its_own_client_and_stack(tmp_path: Path) -> None:
    async with AgentInfra.start(services=[], config={"orchestrator_addr": "127.0.0.1:0"}) as infra:
        port = int(infra.orchestrator_addr.rpartition(":")[2])
        fork = multiprocessing.get_context("fork")
        answers: Queue[tuple[bytes, bytes]] = fork.Queue()
        process = fork.Process(target=child, args=(port, str(tmp_path / "child"), answers))
        process.start()
        await asyncio.to_thread(process.join, 60)
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError("the forked child hung")
        assert process.exitcode == 0, f"the child ended with {process.exitcode}"
        assert answers.get(timeout=5) == (b"to the parent's stack", b"to its own stack")
        # The parent's stack saw the child's task and still serves its own.
        assert (await infra.get_task_status("from-child")).status == TaskStatus.COMPLETED
        await infra.submit_task("after", "echo", "still here")
        assert (await infra.wait_for_task("after", timeout=10)).result_payload == b"still here"
