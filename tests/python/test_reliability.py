"""Nothing leaks after a hard kill: the watchdog removes a dead owner's containers, and the next
start removes what a dead owner left anyway; stacks kept running are left alone."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import grpc
from dspy_agent_infra import AgentInfra, Task
from dspy_agent_infra.pb.env_manager import env_manager_pb2, env_manager_pb2_grpc
from helpers import BUSYBOX, ROOT, EngineProxy, containers, credentials, docker, http_service

# Starts a stack of one HTTP service, says "ready", and waits to be killed.
OWNER = textwrap.dedent(
    """
    import asyncio, json, sys
    from dspy_agent_infra import AgentInfra, Task

    async def main() -> None:
        project, services, keep = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "keep"
        async with AgentInfra.start(
            project=project, services=list(services), config={"services": services},
            keep_running=keep,
        ):
            print("ready", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def start_owner(project: str, services: dict[str, Any], keep: bool) -> subprocess.Popen[str]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, project, json.dumps(services), "keep" if keep else "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    if owner.stdout.readline().strip() != "ready":
        raise AssertionError(owner.stderr.read() if owner.stderr else "owner did not start")
    return owner


def watchdogs(project: str) -> list[int]:
    """Pids of the watchdog processes of `project`, found by their command line."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"watchdog" in argv and project.encode() in argv and pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(check: Any, limit: float = 15) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_owners_containers_are_removed_by_its_watchdog(project: str) -> None:
    owner = start_owner(project, {"web": http_service(), "api": http_service()}, keep=False)
    assert len(containers(project)) == 2
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert wait_for(lambda: containers(project) == []), "the watchdog left containers behind"
    networks = docker("network", "ls", "-q", "--filter", f"name={project}_default").split()
    assert networks == []


async def test_a_kept_stack_survives_its_owner_and_is_reused(project: str) -> None:
    services = {"web": http_service()}
    owner = start_owner(project, services, keep=True)
    [kept] = containers(project)
    [watchdog] = watchdogs(project)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    # The watchdog has done all it will do once it exits: it left the stack alone.
    assert wait_for(lambda: not pid_alive(watchdog)), "the watchdog did not exit"
    assert containers(project) == [kept]
    async with AgentInfra.start(
        project=project, services=list(services), config={"services": services}
    ) as infra:
        web = infra.service("web")
        assert web.reused and web.container_id == kept
    assert containers(project) == []


async def test_the_next_start_removes_what_a_dead_owner_left(project: str) -> None:
    # A container as a process that died (and whose watchdog died too) would leave it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = docker(
        "run", "-d",
        "--label", f"dspy-agent.project={project}",
        "--label", "dspy-agent.service=web",
        "--label", "dspy-agent.session=gone",
        "--label", f"dspy-agent.owner-pid={dead.pid}",
        "--label", "dspy-agent.keep-running=false",
        "--label", "dspy-agent.config-hash=whatever",
        BUSYBOX,
    ).strip()  # fmt: skip
    services = {"web": http_service()}
    async with AgentInfra.start(
        project=project, services=list(services), config={"services": services}
    ) as infra:
        assert infra.service("web").container_id != left
        assert left not in containers(project)
    assert containers(project) == []


async def phases(
    infra: AgentInfra, name: str, until: str, limit: float = 30
) -> list[tuple[str, str]]:
    """The (status, message) pairs a service goes through, until one's message contains
    `until`."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        s = infra.services[name]
        if not seen or seen[-1] != (s.status, s.message):
            seen.append((s.status, s.message))
            if until in s.message:
                return seen
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never said {until!r}: {seen}")


async def restart_counts(infra: AgentInfra) -> dict[str, int]:
    async with grpc.aio.secure_channel(infra.env_manager_addr, credentials(infra.token)) as channel:
        stub = env_manager_pb2_grpc.EnvManagerServiceStub(channel)
        status = await stub.GetServicesStatus(env_manager_pb2.GetServicesStatusRequest())
    return {s.name: s.restart_count for s in status.services}


async def test_a_killed_service_is_seen_and_comes_back_healthy(project: str) -> None:
    services = {"web": http_service(restart="always"), "app": http_service(depends_on=["web"])}
    async with AgentInfra.start(
        project=project, services=list(services), config={"services": services}
    ) as infra:
        web = infra.service("web").container_id
        assert web
        assert (await restart_counts(infra))["web"] == 0
        async with grpc.aio.secure_channel(
            infra.env_manager_addr, credentials(infra.token)
        ) as channel:
            stub = env_manager_pb2_grpc.EnvManagerServiceStub(channel)
            updates = stub.StreamHealth(env_manager_pb2.StreamHealthRequest(services=["app"]))
            await updates.wait_for_connection()
            docker("kill", web)
            seen = await phases(infra, "web", "healthy again")
            # Its dependent is told.

            async def told() -> None:
                async for update in updates:
                    if update.message == "its dependency web went down":
                        return
                raise AssertionError("the health stream ended before app was told")

            await asyncio.wait_for(told(), 30)
            updates.cancel()
        assert (
            "failed",
            "container exited with code 137; its restart policy brings it back",
        ) in seen
        assert seen[-1][0] == "healthy"
        assert infra.service("web").container_id == web  # the Engine restarted the same one
        assert infra.service("app").status == "healthy"
        assert (await restart_counts(infra))["web"] == 1

        # Without a restart policy, a death is reported and stays so.
        app = infra.service("app").container_id
        assert app
        docker("kill", app)
        seen = await phases(infra, "app", "exited with code 137")
        assert seen[-1] == ("failed", "container exited with code 137")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[EngineProxy]:
    """A relay to the Docker Engine that the test can cut, restore, or hold events back on."""
    proxy = EngineProxy(tmp_path / "engine.sock")
    proxy.up()
    yield proxy
    proxy.events_flowing.set()
    proxy.down()


def through(relay: EngineProxy, project: str, services: dict[str, Any]) -> AgentInfra:
    """A stack of `services` that reaches the Engine through `relay`."""
    return AgentInfra.start(
        project=project,
        services=list(services),
        config={"services": services},
        docker_host=f"unix://{relay.path}",
    )


async def test_a_death_a_status_check_sees_first_still_heals(
    project: str, relay: EngineProxy
) -> None:
    async with through(relay, project, {"web": http_service(restart="always")}) as infra:
        web = infra.service("web").container_id
        assert web
        # The death reaches a status check before the Engine's `die` event does.
        relay.events_flowing.clear()
        docker("kill", web)
        assert (await infra.status())["web"].status == "failed"
        relay.events_flowing.set()
        deadline = time.monotonic() + 30
        while "healthy again" not in infra.service("web").message:
            assert time.monotonic() < deadline, infra.service("web")
            await asyncio.sleep(0.01)
        assert (await infra.status())["web"].status == "healthy"


ENGINE_PID = Path("/run/dspy-agent-dockerd.pid")


def provisioned_engine() -> int | None:
    """The pid of the Docker Engine `scripts/provision.sh` started, if that is the one running:
    only such an Engine is the tests' to restart."""
    try:
        pid = int(ENGINE_PID.read_text())
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if name == "dockerd" else None


@pytest.mark.skipif(
    provisioned_engine() is None,
    reason="the running Docker Engine was not started by scripts/provision.sh",
)
async def test_the_engine_restarting_under_a_running_stack(project: str) -> None:
    services = {"web": http_service(restart="always"), "app": http_service()}
    async with AgentInfra.start(
        project=project, services=list(services), config={"services": services}
    ) as infra:
        web = infra.service("web").container_id

        @infra.task_handler("work")
        async def work(task: Task) -> str:
            return task.task_id

        pid = provisioned_engine()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.1)
        # The queue does not need the Engine.
        assert (await infra.submit_task("during", "work")).success
        assert (await infra.wait_for_task("during", timeout=10)).result_payload == b"during"
        subprocess.run(["bash", str(ROOT / "scripts" / "provision.sh")], check=True)

        # Back with the Engine: the service with a restart policy runs again in its own
        # container; the one without is reported down, and says why.
        deadline = time.monotonic() + 60
        while infra.service("web").status != "healthy" or infra.service("app").status != "failed":
            assert time.monotonic() < deadline, (infra.service("web"), infra.service("app"))
            await asyncio.sleep(0.05)
        assert infra.service("web").container_id == web
        assert "exited" in infra.service("app").message
        status = await infra.status()
        assert status["web"].status == "healthy"
    assert containers(project) == []


async def test_a_crash_loop_is_stopped_and_stays_stopped(
    project: str, relay: EngineProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_agent_infra")
    # Healthy at once, then exits after a second, again and again.
    flaky = http_service(restart="always", command=["sh", "-c", "/serve & sleep 1; exit 3"])
    async with through(relay, project, {"flaky": flaky}) as infra:
        seen = await phases(infra, "flaky", "crash loop", limit=60)
        assert seen[-1][0] == "failed"
        # More than 5 restarts within the 60 s window.
        assert "restarted 6 times within 60s" in seen[-1][1]
        assert (await restart_counts(infra))["flaky"] == 6
        cid = infra.service("flaky").container_id
        assert cid
        assert docker("inspect", "-f", "{{.State.Running}}", cid).strip() == "false"

        # The Engine goes away and comes back: what went down meanwhile is revived, but not a
        # service stopped for crash-looping.
        relay.down()
        relay.up()
        deadline = time.monotonic() + 30
        while "following the Docker Engine again" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert docker("inspect", "-f", "{{.State.Running}}", cid).strip() == "false"
        assert "crash loop" in infra.service("flaky").message
        # By hand, it runs again.
        assert (await infra.restart("flaky")).status == "healthy"
        assert docker("inspect", "-f", "{{.State.Running}}", cid).strip() == "true"
