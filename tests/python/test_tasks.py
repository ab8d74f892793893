"""The task queue through AgentInfra and OrchestratorClient: the hand-off's examples, handlers
that fail, hang or misbehave, cancellation, retries and idempotency, on each task store."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from contextlib import suppress
from typing import Any

import pytest

from dspy_agent_infra import (
    AgentInfra,
    InfraError,
    InvalidTaskError,
    OrchestratorClient,
    OrchestratorUnavailableError,
    PortInUseError,
    Task,
    TaskConflictError,
    TaskNotFoundError,
    TaskStatus,
    UnknownTaskTypeError,
)
from helpers import BUSYBOX, containers, http_service

# The whole suite runs on both task stores: the same behaviour on SQLite and PostgreSQL.
pytestmark = pytest.mark.usefixtures("task_store")


def tasks_only(**config: Any) -> AgentInfra:
    """A stack with no containers: just the queue and the orchestrator port."""
    return AgentInfra.start(services=[], config=config or None)


async def test_handoff_submit_test_task_over_grpc() -> None:
    # The hand-off's own test, with only the import changed.
    async with tasks_only():
        client = OrchestratorClient(host="localhost", port=50052)
        response = await client.submit_task(
            task_id="test-1", task_type="test", payload={"data": "value"}
        )
        assert response.success
        status = await client.wait_for_task("test-1", timeout=10)
        assert status.status == TaskStatus.COMPLETED
        assert (await client.get_task_status("test-1")).status == TaskStatus.COMPLETED


async def test_handoff_full_startup_ping() -> None:
    async with AgentInfra.start(services=[]) as infra:
        assert infra.orchestrator_client is not None
        response = await infra.submit_task("startup-test", "ping", {})
        assert response.success
        status = await infra.wait_for_task("startup-test", timeout=10)
        assert status.result_payload == b"pong"


async def test_handoff_training_polling_loop() -> None:
    async with tasks_only() as infra:

        @infra.task_handler("rl_training")
        async def train(task: Task) -> dict[str, Any]:
            config = task.json()
            await asyncio.sleep(0.05)
            return {"trained": config["model_config"], "episodes": config["episodes"]}

        task_id = "train-42"
        await infra.submit_task(
            task_id=task_id,
            task_type="rl_training",
            payload={"model_config": "gpt2", "episodes": 1000, "checkpoint_dir": "/data"},
        )
        while True:
            status = await infra.get_task_status(task_id)
            if status.status == TaskStatus.COMPLETED:
                result = json.loads(status.result_payload.decode("utf-8"))
                break
            if status.status == TaskStatus.FAILED:
                raise RuntimeError(status.error)
            await asyncio.sleep(0.01)
        assert result == {"trained": "gpt2", "episodes": 1000}


async def test_handler_results_and_failures() -> None:
    async with tasks_only() as infra:
        seen_attempts: list[int] = []

        @infra.task_handler("raises")
        async def raises(task: Task) -> None:
            raise ValueError("bad model config")

        @infra.task_handler("unencodable")
        async def unencodable(task: Task) -> object:
            return object()

        @infra.task_handler("flaky")
        async def flaky(task: Task) -> str:
            seen_attempts.append(task.attempt)
            if task.attempt == 1:
                raise RuntimeError("first try fails")
            return "second try works"

        @infra.task_handler("threaded")
        def threaded(task: Task) -> bytes:
            return task.payload[::-1]

        await infra.submit_task("r", "raises", {})
        await infra.submit_task("u", "unencodable", {})
        await infra.submit_task("f", "flaky", {}, max_retries=2)
        await infra.submit_task("t", "threaded", b"abc")

        r = await infra.wait_for_task("r", timeout=10)
        assert r.status == TaskStatus.FAILED and r.error == "ValueError: bad model config"
        u = await infra.wait_for_task("u", timeout=10)
        assert u.status == TaskStatus.FAILED and "cannot be encoded" in u.error
        f = await infra.wait_for_task("f", timeout=10)
        assert (f.status, f.attempts, f.result_payload) == (
            TaskStatus.COMPLETED,
            2,
            b"second try works",
        )
        assert seen_attempts == [1, 2]
        t = await infra.wait_for_task("t", timeout=10)
        assert t.result_payload == b"cba"


async def test_timeout_and_cancel_reach_the_handler() -> None:
    async with tasks_only() as infra:
        cancelled: list[str] = []
        started = asyncio.Event()

        @infra.task_handler("hang")
        async def hang(task: Task) -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(task.task_id)
                raise

        await infra.submit_task("slow", "hang", {}, timeout=0.2)
        timed_out = await infra.wait_for_task("slow", timeout=10)
        assert timed_out.status == TaskStatus.FAILED and "timed out" in timed_out.error

        started.clear()
        await infra.submit_task("stuck", "hang", {})
        await asyncio.wait_for(started.wait(), 10)
        assert await infra.cancel_task("stuck")
        assert (await infra.wait_for_task("stuck", timeout=10)).status == TaskStatus.CANCELLED
        for _ in range(100):
            if "stuck" in cancelled:
                break
            await asyncio.sleep(0.01)
        assert cancelled == ["slow", "stuck"]
        assert not await infra.cancel_task("stuck")


async def test_pending_task_cancels_at_once() -> None:
    async with tasks_only(tasks={"limits": {"one": 1}}) as infra:
        release = asyncio.Event()

        @infra.task_handler("one")
        async def one(task: Task) -> str:
            await release.wait()
            return "done"

        await infra.submit_task("first", "one", {})
        await infra.submit_task("queued", "one", {})
        assert (await infra.get_task_status("queued")).status == TaskStatus.PENDING
        assert await infra.cancel_task("queued")
        assert (await infra.get_task_status("queued")).status == TaskStatus.CANCELLED
        release.set()
        assert (await infra.wait_for_task("first", timeout=10)).status == TaskStatus.COMPLETED
        assert (await infra.get_task_status("queued")).attempts == 0


async def test_submit_is_idempotent_and_refuses_bad_input() -> None:
    async with tasks_only() as infra:
        first = await infra.submit_task("same", "echo", {"a": 1})
        again = await infra.submit_task("same", "echo", {"a": 1})
        assert not first.duplicate and again.duplicate
        done = await infra.wait_for_task("same", timeout=10)
        assert done.attempts == 1 and json.loads(done.result_payload) == {"a": 1}

        with pytest.raises(TaskConflictError, match="same"):
            await infra.submit_task("same", "echo", {"a": 2})
        with pytest.raises(UnknownTaskTypeError, match="rl_training"):
            await infra.submit_task("x", "rl_training", {})
        with pytest.raises(InvalidTaskError, match="task_id"):
            await infra.submit_task("", "echo", {})
        with pytest.raises(InvalidTaskError, match="256"):
            await infra.submit_task("x" * 300, "echo", {})
        with pytest.raises(InvalidTaskError, match="payload"):
            await infra.submit_task("y", "echo", {"not": object()})
        with pytest.raises(InvalidTaskError, match="payload"):
            await infra.submit_task("y", "echo", {"nan": float("nan")})
        with pytest.raises(InvalidTaskError, match="timeout"):
            await infra.submit_task("y", "echo", {}, timeout=-1)
        with pytest.raises(InvalidTaskError, match="payload"):
            await infra.submit_task("big", "echo", b"x" * (16 * 1024 * 1024 + 1))
        with pytest.raises(TaskNotFoundError, match="nope"):
            await infra.get_task_status("nope")
        with pytest.raises(InvalidTaskError, match="task_type"):
            infra.task_handler("")(lambda task: None)


async def test_watch_tasks_streams_every_transition() -> None:
    async with tasks_only() as infra:
        gate = asyncio.Event()
        running = asyncio.Event()

        @infra.task_handler("gated")
        async def gated(task: Task) -> str:
            running.set()
            await gate.wait()
            return "through"

        seen: list[TaskStatus] = []
        subscribed = asyncio.Event()

        async def watch() -> None:
            async for info in infra.watch_tasks(include_current=False):
                if info.task_id.startswith("marker-"):
                    subscribed.set()
                elif info.task_id == "w":
                    seen.append(info.status)
                    if info.status.is_final:
                        return

        watcher = asyncio.ensure_future(watch())
        # Markers until the watch sees one: from then on it misses nothing.
        markers = 0
        while not subscribed.is_set():
            markers += 1
            await infra.submit_task(f"marker-{markers}", "ping", {})
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(subscribed.wait(), 0.05)
        await infra.submit_task("w", "gated", {})
        # The handler runs only after RUNNING went out.
        await asyncio.wait_for(running.wait(), 10)
        gate.set()
        await asyncio.wait_for(watcher, 10)
        assert seen == [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED]


async def test_a_declared_type_is_queued_until_something_serves_it() -> None:
    # The hand-off's submit of "rl_training" before any worker is up: declared, it waits.
    types = {"rl_training": {"timeout": "10m", "max_retries": 2}}
    config = {"orchestrator_addr": "127.0.0.1:0", "tasks": {"types": types}}
    async with AgentInfra.start(services=[], config=config) as infra:
        client = infra.orchestrator_client
        response = await client.submit_task("train-1", "rl_training", {"episodes": 3})
        assert response.success and not response.duplicate
        assert (await client.get_task_status("train-1")).status == TaskStatus.PENDING
        listed = await client.list_tasks(status=TaskStatus.PENDING, task_type="rl_training")
        assert [t.task_id for t in listed] == ["train-1"]
        # An undeclared type nobody serves is still refused, naming what is served and declared.
        with pytest.raises(UnknownTaskTypeError, match=r"declared: rl_training"):
            await client.submit_task("x", "nosuch", {})

        @infra.task_handler("rl_training")
        async def train(task: Task) -> dict[str, int]:
            return {"episodes": task.json()["episodes"]}

        done = await infra.wait_for_task("train-1", timeout=30)
        assert done.status == TaskStatus.COMPLETED
        assert json.loads(done.result_payload) == {"episodes": 3}


async def test_finished_tasks_are_pruned_by_hand_and_pending_ones_stay() -> None:
    config = {"orchestrator_addr": "127.0.0.1:0", "tasks": {"types": {"later": {}}}}
    async with AgentInfra.start(project="prune-test", services=[], config=config) as infra:
        for i in range(3):
            await infra.submit_task(f"done-{i}", "echo", {"i": i})
            await infra.wait_for_task(f"done-{i}", timeout=10)
        await infra.submit_task("waiting", "later", {})
        env = {**os.environ, "ORCHESTRATOR_GRPC_ADDR": infra.orchestrator_addr}
        command = [sys.executable, "-m", "dspy_agent_infra", "--project", "prune-test"]

        def prune(age: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*command, "tasks", "prune", "--older-than", age],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )

        kept = await asyncio.to_thread(prune, "1h")
        assert kept.returncode == 0 and "deleted 0 finished tasks" in kept.stdout, kept.stderr
        assert (await infra.get_task_status("done-0")).status == TaskStatus.COMPLETED
        pruned = await asyncio.to_thread(prune, "0s")
        assert pruned.returncode == 0 and "deleted 3 finished tasks" in pruned.stdout
        with pytest.raises(TaskNotFoundError):
            await infra.get_task_status("done-0")
        assert (await infra.get_task_status("waiting")).status == TaskStatus.PENDING
        bad = await asyncio.to_thread(prune, "soon")
        assert bad.returncode == 2 and "--older-than" in bad.stderr


async def test_the_retention_removes_old_finished_tasks_on_its_own() -> None:
    config = {"orchestrator_addr": "127.0.0.1:0", "tasks": {"retention": "1s"}}
    async with AgentInfra.start(project="retention-test", services=[], config=config) as infra:
        await infra.submit_task("old", "echo", {})
        await infra.wait_for_task("old", timeout=10)
        for _ in range(300):
            try:
                await infra.get_task_status("old")
            except TaskNotFoundError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("a task finished past its 1 s retention was still stored after 30 s")


async def test_orchestrator_address_and_client_errors() -> None:
    async with AgentInfra.start(services=[], config={"orchestrator_addr": "127.0.0.1:0"}) as infra:
        host, _, port = infra.orchestrator_addr.rpartition(":")
        assert host == "127.0.0.1" and int(port) != 0
        assert await infra.orchestrator_client.health()
        with pytest.raises(TaskNotFoundError):
            await infra.orchestrator_client.get_task_status("missing")
        with pytest.raises(UnknownTaskTypeError):
            await infra.orchestrator_client.submit_task("a", "nosuch", {})

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        with pytest.raises(PortInUseError) as err:
            async with AgentInfra.start(
                services=[], config={"orchestrator_addr": f"127.0.0.1:{busy}"}
            ):
                pytest.fail("the port is taken")
        assert err.value.service == "orchestrator" and err.value.port == busy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(OrchestratorUnavailableError):
        await OrchestratorClient(port=free).get_task_status("x")


async def test_a_client_follows_its_event_loop() -> None:
    async with tasks_only(orchestrator_addr="127.0.0.1:0") as infra:
        port = int(infra.orchestrator_addr.rpartition(":")[2])
        client = OrchestratorClient(host="127.0.0.1", port=port)
        assert (await client.submit_task("here", "ping")).success

        # A second loop, running at the same time in another thread, is refused plainly.
        def elsewhere() -> BaseException | None:
            try:
                asyncio.run(client.get_task_status("here"))
            except BaseException as e:
                return e
            return None

        error = await asyncio.to_thread(elsewhere)
        assert isinstance(error, InfraError) and "one client per event loop" in str(error)

        # Loops that ran one after the other hand the client over.
        roaming = OrchestratorClient(host="127.0.0.1", port=port)

        def one_loop_after_another() -> str:
            asyncio.run(roaming.submit_task("roaming", "ping"))
            return asyncio.run(roaming.wait_for_task("roaming", timeout=10)).status_name

        assert await asyncio.to_thread(one_loop_after_another) == "COMPLETED"
        assert (await roaming.get_task_status("roaming")).result_payload == b"pong"
        assert (await client.wait_for_task("here", timeout=10)).status is TaskStatus.COMPLETED


async def test_a_forked_child_cannot_use_the_parents_stack() -> None:
    async with tasks_only() as infra:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                found = f"no error: {infra.env}"
            except BaseException as e:
                found = str(e)
            os.write(write_end, found.encode())
            os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as reader:
            told = reader.read().decode()
        assert status == 0 and "forked child must start its own" in told, told
        assert (await infra.submit_task("after-fork", "ping")).success


async def test_list_tasks_pages_through_the_queue() -> None:
    async with tasks_only() as infra:
        for i in range(25):
            await infra.submit_task(f"l{i:02}", "echo", {"i": i})
        for i in range(25):
            await infra.wait_for_task(f"l{i:02}", timeout=10)
        client = infra.orchestrator_client
        listed = await client.list_tasks(task_type="echo", limit=1000)
        assert [t.task_id for t in listed] == [f"l{i:02}" for i in range(25)]
        assert len(await client.list_tasks(status=TaskStatus.COMPLETED, limit=10)) == 10
        assert await client.list_tasks(status=TaskStatus.FAILED) == []


async def test_exec_container_and_http_handlers(project: str) -> None:
    services = {"web": http_service()}
    async with AgentInfra.start(
        project=project, services=["web"], config={"services": services}
    ) as infra:
        await infra.submit_task("x", "exec", {"service": "web", "command": ["cat", "/www/health"]})
        done = await infra.wait_for_task("x", timeout=30)
        assert done.status == TaskStatus.COMPLETED, done.error
        assert json.loads(done.result_payload) == {"exit_code": 0, "stdout": "ok\n", "stderr": ""}
        # A command that fails fails the attempt, as a failed one-off container does.
        await infra.submit_task(
            "x-fail",
            "exec",
            {"service": "web", "command": ["sh", "-c", "echo did half; echo why >&2; exit 3"]},
        )
        failed = await infra.wait_for_task("x-fail", timeout=30)
        assert failed.status == TaskStatus.FAILED
        assert "exited with code 3" in failed.error and "why" in failed.error
        assert "did half" in failed.error, "stdout is shown too"
        await infra.submit_task("x-quiet", "exec", {"service": "web", "command": ["false"]})
        quiet = await infra.wait_for_task("x-quiet", timeout=30)
        assert quiet.error is not None and quiet.error.endswith("(no output)"), quiet.error

        await infra.submit_task(
            "c",
            "container",
            {
                "image": BUSYBOX,
                "command": ["sh", "-c", "echo $TASK_ID $TASK_INPUT"],
                "input": {"n": 1},
            },
        )
        done = await infra.wait_for_task("c", timeout=60)
        assert done.status == TaskStatus.COMPLETED, done.error
        assert json.loads(done.result_payload)["stdout"] == 'c {"n":1}\n'
        await infra.submit_task(
            "c-fail",
            "container",
            {"image": BUSYBOX, "command": ["sh", "-c", "echo oops >&2; exit 4"]},
        )
        failed = await infra.wait_for_task("c-fail", timeout=60)
        assert failed.status == TaskStatus.FAILED
        assert "exited with code 4" in failed.error and "oops" in failed.error

        await infra.submit_task(
            "h", "http", {"service": "web", "path": "/cgi-bin/echo", "body": {"prompt": "hello"}}
        )
        done = await infra.wait_for_task("h", timeout=30)
        assert done.status == TaskStatus.COMPLETED, done.error
        assert json.loads(done.result_payload) == {"prompt": "hello"}

        bad: list[tuple[str, str, dict[str, Any]]] = [
            ("bad-service", "exec", {"service": "nope", "command": ["true"]}),
            ("bad-payload", "http", {"url": "http://example"}),
            ("bad-path", "http", {"service": "web", "path": "/missing"}),
        ]
        for task_id, task_type, payload in bad:
            await infra.submit_task(task_id, task_type, payload)
            failed = await infra.wait_for_task(task_id, timeout=30)
            assert failed.status == TaskStatus.FAILED, task_id
        assert "no running service" in (await infra.get_task_status("bad-service")).error
        assert "payload must be JSON like" in (await infra.get_task_status("bad-payload")).error
        # busybox httpd refuses a POST outside cgi-bin with 501; the status reaches the error.
        assert "answered 501" in (await infra.get_task_status("bad-path")).error
        # One-off containers are removed once they ran: only the service's container is left.
        assert len(containers(project)) == 1
    assert containers(project) == []
