"""What a first-time user runs: every example and documented code block, many times over, the
hand-off's own code with only its import path changed, and the small things that cost trust."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from dspy_agent_infra import AgentInfra, OrchestratorClient, OrchestratorUnavailableError, Task
from helpers import ROOT, containers, credentials, docker, free_port, http_service

RUNS = 30


def python_blocks(doc: Path) -> list[str]:
    return [
        textwrap.dedent(block)
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    ]


def runnable() -> list[tuple[str, str]]:
    """Every example script and every block of README.md and docs/ that is a whole program."""
    found = [
        (f"examples/{p.name}", p.read_text()) for p in sorted((ROOT / "examples").glob("*.py"))
    ]
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for i, block in enumerate(python_blocks(doc)):
            if "asyncio.run(" in block:
                found.append((f"{doc.name}#{i}", block))
    return found


@pytest.fixture
def as_a_user(tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of its own with no config file, the documented default ports, and this test's
    project (so that what is left behind is counted and removed)."""
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.delenv("ORCHESTRATOR_GRPC_ADDR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("name", "code"), runnable(), ids=[n for n, _ in runnable()])
def test_each_example_runs_and_exits_cleanly_every_time(
    name: str, code: str, as_a_user: Path, project: str
) -> None:
    script = as_a_user / "example.py"
    script.write_text(code)
    failures = []
    for i in range(RUNS):
        run = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
        if run.returncode != 0:
            failures.append(f"run {i}: exit {run.returncode}\n{run.stderr[-2000:]}")
    assert not failures, f"{name}: {len(failures)} of {RUNS} runs failed\n" + "\n".join(failures)
    # Only a stack kept on purpose (keep_running=True) may be left; it is removed here.
    if "keep_running=True" in code:
        assert containers(project)
        for cid in containers(project):
            docker("rm", "-f", cid)
    assert containers(project) == []


# Two code blocks of the hand-off document users migrate with (PYTHON_DEVELOPER_HANDOFF.md:
# "grpc_client.py" and "Verify gRPC Connection"), verbatim but for the import path.
HANDOFF_CLIENT = """\
from dspy_agent.infra.grpc_client import OrchestratorClient

client = OrchestratorClient(host="localhost", port=50052)

# Submit task
response = await client.submit_task(
    task_id="task-123",
    task_type="inference",
    payload={"prompt": "What is AI?"},
    metadata={"user": "alice", "priority": "high"}
)

# Get status
status = await client.get_task_status("task-123")
"""
HANDOFF_STUBS = """\
import grpc
from dspy_agent.infra.pb.orchestrator import orchestrator_pb2_grpc

channel = grpc.aio.insecure_channel("localhost:50052")
stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

try:
    # Try a simple call
    response = await stub.GetTaskStatus(
        orchestrator_pb2.GetTaskStatusRequest(task_id="test")
    )
    print("Orchestrator is reachable!")
except grpc.aio.AioRpcError as e:
    print(f"Connection failed: {e}")
"""


# The hand-off's environment block (section "Environment Variable Configuration") and its
# AgentInfra example (section "agent_infra.py"), verbatim but for the import path.
HANDOFF_ENV = """\
import os

os.environ["ORCHESTRATOR_GRPC_ADDR"] = "0.0.0.0:50052"
os.environ["ENV_MANAGER_GRPC_ADDR"] = "0.0.0.0:50051"
"""
HANDOFF_AGENT = """\
from dspy_agent.infra import AgentInfra

# Simple usage
async def main():
    async with AgentInfra.start() as infra:
        # All services (RedDB, InferMesh, etc.) are now running

        # Submit tasks to orchestrator
        result = await infra.submit_task(
            task_id="train-1",
            task_type="rl_training",
            payload={"model": "gpt2", "episodes": 100}
        )

        # Check task status
        status = await infra.get_task_status("train-1")
        print(f"Status: {status.status}")  # PENDING, RUNNING, COMPLETED, FAILED

        # Result is available when COMPLETED
        if status.status == TaskStatus.COMPLETED:
            result_data = status.result_payload.decode('utf-8')

asyncio.run(main())
"""


def handoff_block(block: str) -> str:
    return block.replace("dspy_agent.infra", "dspy_agent_infra")


def as_program(fragment: str) -> str:
    """A fragment with top-level ``await`` (as the hand-off writes them) as a program."""
    imports = [line for line in fragment.splitlines() if line.startswith(("import ", "from "))]
    body = [line for line in fragment.splitlines() if line not in imports]
    return "\n".join(
        ["import asyncio", *imports, "", "async def main():"]
        + [f"    {line}" for line in body]
        + ["", "asyncio.run(main())", ""]
    )


async def test_the_handoff_code_runs_with_only_its_import_path_changed(
    as_a_user: Path, project: str
) -> None:
    client_block = handoff_block(HANDOFF_CLIENT)
    stubs_block = handoff_block(HANDOFF_STUBS)
    # The hand-off's block uses `orchestrator_pb2` without importing it; that line is added.
    stubs_block = stubs_block.replace(
        "import orchestrator_pb2_grpc", "import orchestrator_pb2, orchestrator_pb2_grpc"
    )
    async with AgentInfra.start(services=[]) as infra:
        seen: list[Task] = []

        @infra.task_handler("inference")
        async def inference(task: Task) -> dict[str, str]:
            seen.append(task)
            return {"answer": "AI is ..."}

        # The stubs block asks for task "test", which must exist to be found.
        await infra.submit_task("test", "echo", "hello")

        # A plain gRPC client is refused until it sends the token: the one change it needs,
        # with the token handed over as a client in any language would get it.
        with_token = stubs_block.replace(
            'grpc.aio.insecure_channel("localhost:50052")',
            'grpc.aio.secure_channel("localhost:50052", grpc.composite_channel_credentials('
            "grpc.local_channel_credentials(), "
            'grpc.access_token_call_credentials(os.environ["DSPY_AGENT_TOKEN"])))',
        ).replace("import grpc", "import os\nimport grpc")
        assert infra.token
        outputs = []
        for block, env in (
            (client_block, {}),
            (stubs_block, {}),
            (with_token, {"DSPY_AGENT_TOKEN": infra.token}),
        ):
            script = as_a_user / "handoff.py"
            script.write_text(as_program(block) + "\nprint('done')\n")
            run = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **env},
            )
            assert run.returncode == 0, run.stderr
            assert run.stdout.rstrip().endswith("done"), run.stdout
            outputs.append(run.stdout)
        assert "Orchestrator is reachable!" not in outputs[1]
        assert "UNAUTHENTICATED" in outputs[1] and "dspy-agent token" in outputs[1]
        assert "Orchestrator is reachable!" in outputs[2]
        assert [t.task_id for t in seen] == ["task-123"]
        assert seen[0].metadata == {"user": "alice", "priority": "high"}
        assert (await infra.get_task_status("task-123")).status.name == "COMPLETED"
    assert containers(project) == []


def test_the_handoffs_agent_runs_as_written_on_every_interface_with_a_declared_type(
    as_a_user: Path, project: str
) -> None:
    # The type is declared: its task waits for a worker instead of being refused.
    (as_a_user / "dspy-agent.toml").write_text("[tasks.types.rl_training]\n")
    # The hand-off's block uses asyncio and TaskStatus without importing them; those are added.
    program = "\n".join(
        [
            "import asyncio",
            "from dspy_agent_infra import TaskStatus",
            handoff_block(HANDOFF_ENV),
            handoff_block(HANDOFF_AGENT),
        ]
    )
    (as_a_user / "agent.py").write_text(program)
    run = subprocess.run([sys.executable, "agent.py"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "Status: TaskStatus.PENDING", run.stdout
    assert containers(project) == []


async def test_the_stubs_serve_a_grpc_aio_client_of_both_ports() -> None:
    import grpc
    from dspy_agent_infra.pb.env_manager import env_manager_pb2, env_manager_pb2_grpc
    from dspy_agent_infra.pb.orchestrator import orchestrator_pb2, orchestrator_pb2_grpc

    async with AgentInfra.start(services=[]) as infra:
        async with grpc.aio.secure_channel(
            infra.orchestrator_addr, credentials(infra.token)
        ) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            await stub.SubmitTask(
                orchestrator_pb2.SubmitTaskRequest(task_id="s", task_type="echo", payload=b"hi")
            )
            info = await infra.wait_for_task("s", timeout=10)
            assert info.result_payload == b"hi"
            got = await stub.GetTaskStatus(orchestrator_pb2.GetTaskStatusRequest(task_id="s"))
            assert got.status == orchestrator_pb2.COMPLETED
            assert orchestrator_pb2.TaskState.Name(got.status) == "COMPLETED"
        async with grpc.aio.secure_channel(
            infra.env_manager_addr, credentials(infra.token)
        ) as channel:
            env = env_manager_pb2_grpc.EnvManagerServiceStub(channel)
            status = await env.GetServicesStatus(env_manager_pb2.GetServicesStatusRequest())
            assert status.services == []


def test_the_stubs_say_what_to_install_when_grpcio_is_missing(tmp_path: Path) -> None:
    # A `grpc` that cannot be imported, as on a machine without the extra.
    (tmp_path / "grpc.py").write_text("raise ImportError('no grpc here')\n")
    run = subprocess.run(
        [sys.executable, "-c", "import dspy_agent_infra.pb.orchestrator.orchestrator_pb2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert run.returncode != 0
    assert "pip install grpcio protobuf" in run.stderr


async def test_a_plain_with_or_await_says_use_async_with() -> None:
    with pytest.raises(TypeError, match=r"async with AgentInfra\.start"):
        with AgentInfra.start(services=[]):
            pass
    with pytest.raises(TypeError, match=r"async with AgentInfra\.start"):
        await AgentInfra.start(services=[])


async def test_a_client_of_nothing_names_the_address_and_the_fix() -> None:
    port = free_port()
    client = OrchestratorClient(host="127.0.0.1", port=port)
    assert await client.health() is False
    with pytest.raises(OrchestratorUnavailableError) as e:
        await client.get_task_status("x")
    assert f"127.0.0.1:{port}" in str(e.value)
    assert "dspy-agent start" in str(e.value)
    await client.close()


def test_errors_the_caller_catches_print_nothing(tmp_path: Path, project: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from dspy_agent_infra import AgentInfra, ServiceStartError

        async def main() -> None:
            config = {{"services": {{"web": {{"image": "dspy-agent-test/none:{uuid.uuid4().hex}",
                                             "pull": "never"}}}}}}
            try:
                async with AgentInfra.start(project={project!r}, services=["web"], config=config):
                    pass
            except ServiceStartError as e:
                # A missing image names the setting that chooses it.
                print("caught", e.service, "`services.web.image`" in e.reason)

        asyncio.run(main())
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["caught", "web", "True"]
    assert run.stderr == ""
    # With logging configured, the same records are there for whoever asked for them.
    shown = subprocess.run(
        [sys.executable, "-c", "import logging; logging.basicConfig()\n" + script],
        capture_output=True,
        text=True,
    )
    assert "web" in shown.stderr and "WARNING" in shown.stderr


def provision_tags(images: str, pull: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "tests/images/build.sh"), "--tag-catalog"],
        capture_output=True,
        text=True,
        env={**os.environ, "DSPY_AGENT_CATALOG_IMAGES": images, "DSPY_AGENT_PULL": pull},
        timeout=300,
    )


def test_stand_ins_take_real_names_only_where_nothing_can_be_pulled() -> None:
    name = f"dspy-agent-test/catalog-{uuid.uuid4().hex[:8]}:latest"
    images = f"{name}=dspy-agent-test/busybox:latest"
    try:
        # A machine that can pull: the pull is what provides the name; no stand-in is tagged.
        can_pull = provision_tags(images, "true")
        assert can_pull.returncode == 0, can_pull.stderr
        assert f"pulled {name}" in can_pull.stdout
        assert docker("images", "-q", name).strip() == ""
        assert "WARNING" not in can_pull.stderr
        # A machine that cannot: the stand-in takes the name, labelled, and it says so loudly.
        offline = provision_tags(images, "false")
        assert offline.returncode == 0, offline.stderr
        assert docker("images", "-q", name).strip() != ""
        label = docker(
            "image", "inspect", "-f", '{{index .Config.Labels "dspy-agent.stand-in"}}', name
        )
        assert label.strip() == "true"
        assert f"WARNING: no registry gave {name}" in offline.stderr
    finally:
        subprocess.run(["docker", "rmi", name], capture_output=True)


async def test_services_on_stand_in_images_say_so(project: str) -> None:
    async with AgentInfra.start(
        project=project, services=["web"], config={"services": {"web": http_service()}}
    ) as infra:
        assert infra.service("web").stand_in
