"""Nothing leaks after a hard kill: the watchdog removes a dead owner's containers, and the next
start removes what a dead owner left anyway; stacks kept running are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

from dspy_agent_infra import AgentInfra
from helpers import BUSYBOX, containers, docker, http_service

# Starts a stack of one HTTP service, says "ready", and waits to be killed.
OWNER = textwrap.dedent(
    """
    import asyncio, json, sys
    from dspy_agent_infra import AgentInfra

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
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    # Give a watchdog the time it would need, then check it left the stack alone.
    time.sleep(2)
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
