"""One owner per stack: a second agent or a daemon of the same project never removes the
containers of a live owner; it attaches to it, or is refused with a way out. A container removed
under its owner is created again, and stacks kept running are visible to the command line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import SERVICE_KEYS, STATUS_KEYS, run, workdir  # noqa: F401  (fixture)

import grpc
from dspy_agent_infra import AgentInfra, StackInUseError
from helpers import containers, credentials, docker, redis_service


def start(project: str, **kw: Any) -> AgentInfra:
    return AgentInfra.start(
        project=project, services=["cache"], config={"services": {"cache": redis_service()}}, **kw
    )


def running(project: str) -> list[str]:
    out = docker("ps", "-q", "--no-trunc", "--filter", f"label=dspy-agent.project={project}")
    return sorted(out.split())


@pytest.fixture(autouse=True)
def any_orchestrator_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each stack on a port of its own: a second start finds the first through its owner marks,
    # never by a shared default address.
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")


async def test_a_second_agent_of_the_project_attaches_and_leaves_the_stack_running(
    project: str,
) -> None:
    async with start(project) as first:
        ids = running(project)
        assert len(ids) == 1
        async with start(project) as second:
            assert second.attached
            assert second.orchestrator_addr == first.orchestrator_addr
            assert second.service("cache").container_id == first.service("cache").container_id
        assert running(project) == ids
        assert (await first.status())["cache"].status == "healthy"
    assert containers(project) == []


async def test_a_second_agent_that_cannot_attach_is_refused_and_touches_nothing(
    project: str,
) -> None:
    def with_token(token: str) -> AgentInfra:
        return AgentInfra.start(
            project=project,
            services=["cache"],
            config={"services": {"cache": redis_service()}, "token": token},
        )

    async with with_token("a" * 24) as first:
        ids = running(project)
        # Another token: the owner refuses this process, so it cannot attach.
        second = with_token("b" * 24)
        with pytest.raises(StackInUseError) as refused:
            async with second:
                pass
        assert refused.value.pid == os.getpid()
        assert refused.value.address == first.orchestrator_addr
        message = str(refused.value)
        assert f"ORCHESTRATOR_GRPC_ADDR={first.orchestrator_addr}" in message
        assert "another project" in message
        assert running(project) == ids
        assert (await first.status())["cache"].status == "healthy"
    assert containers(project) == []


async def test_an_agent_with_another_state_folder_finds_the_owner_by_its_labels(
    project: str, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from dspy_agent_infra import AgentInfra
        from helpers import redis_service

        async def main() -> None:
            infra = AgentInfra.start(
                project={project!r}, services=["cache"],
                config={{"services": {{"cache": redis_service()}}}},
            )
            async with infra:
                print("attached", infra.attached, infra.service("cache").container_id)

        asyncio.run(main())
        """
    )
    async with start(project) as first:
        env = {
            **os.environ,
            "DSPY_AGENT_STATE_DIR": str(tmp_path / "elsewhere"),
            "PYTHONPATH": str(Path(__file__).parent),
        }
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["attached", "True", first.service("cache").container_id]
        assert (await first.status())["cache"].status == "healthy"
    assert containers(project) == []


async def test_a_container_removed_under_its_owner_is_created_again(project: str) -> None:
    async with start(project) as infra:
        old = infra.service("cache").container_id
        assert old
        docker("rm", "-f", old)
        deadline = time.monotonic() + 60
        while True:
            cache = (await infra.status())["cache"]
            if cache.status == "healthy" and cache.container_id not in (None, old):
                break
            assert time.monotonic() < deadline, f"not created again: {cache.status} {cache.message}"
            await asyncio.sleep(0.2)
        assert running(project) == [cache.container_id]
        # It serves again through its published port.
        reader, writer = await asyncio.open_connection("127.0.0.1", cache.ports[6379])
        writer.write(b"PING\r\n")
        assert await reader.readline() == b"+PONG\r\n"
        writer.close()
    assert containers(project) == []


async def test_restart_brings_up_a_service_without_a_container(project: str) -> None:
    from dspy_agent_infra.pb.env_manager import env_manager_pb2, env_manager_pb2_grpc

    async with start(project) as infra:
        async with grpc.aio.secure_channel(
            infra.env_manager_addr, credentials(infra.token)
        ) as channel:
            env = env_manager_pb2_grpc.EnvManagerServiceStub(channel)
            await env.StopServices(env_manager_pb2.StopServicesRequest(services=["cache"]))
        assert running(project) == []
        # Not a dead end ("start it instead"): a restart brings it up.
        restarted = await infra.restart("cache")
        assert restarted.status == "healthy"
        assert running(project) == [restarted.container_id]
    assert containers(project) == []


def test_a_daemon_and_an_agent_of_one_project(workdir: Path, project: str) -> None:  # noqa: F811
    started = run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    before = running(project)
    assert len(before) == 3
    agent = subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert agent.returncode == 0, agent.stderr
    assert "healthy" in agent.stdout
    status = run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert running(project) == before
    assert run("stop").returncode == 0
    assert containers(project) == []


async def test_a_kept_stack_is_seen_by_status_and_removed_by_stop(
    workdir: Path,  # noqa: F811
    project: str,
) -> None:
    async with start(project, keep_running=True) as infra:
        kept = infra.service("cache").container_id
        # While its agent runs, `stop` is not allowed to remove it.
        refused = await asyncio.to_thread(run, "stop")
        assert refused.returncode == 1
        assert f"process {os.getpid()}" in refused.stderr + refused.stdout
    assert running(project) == [kept]

    status = await asyncio.to_thread(run, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "kept running" in status.stdout and "cache" in status.stdout
    assert (kept or "")[:12] in status.stdout
    # The same JSON shape as a running stack's.
    report = json.loads((await asyncio.to_thread(run, "status", "--json")).stdout)
    assert set(report) == STATUS_KEYS and report["owner"] is None
    assert "kept running" in report["message"]
    assert [set(s) for s in report["services"]] == [SERVICE_KEYS]
    assert report["services"][0]["kept"] and report["services"][0]["container_id"] == kept

    stopped = await asyncio.to_thread(run, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert containers(project) == []
    assert (await asyncio.to_thread(run, "stop")).returncode == 3
    assert (await asyncio.to_thread(run, "status")).returncode == 3
