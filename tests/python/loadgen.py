"""The load scenario shared by the test (scaled down) and `bench/load.py` (full size): concurrent
gRPC clients submitting tasks to a `dspy-agent` daemon while one of its services restarts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dspy_agent_infra import OrchestratorClient, TaskStatus

DSPY_AGENT = str(Path(sys.executable).parent / "dspy-agent")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Round:
    submitted: int
    failed_calls: list[str]
    seconds: float
    rss_after: int
    #: Submits answered while the service restart was in progress.
    during_restart: int


async def one_round(
    port: int, daemon_pid: int, clients: int, per_client: int, tag: str, restart: str | None
) -> Round:
    failed: list[str] = []
    answered: list[float] = []
    restart_window = [float("inf"), float("-inf")]

    async def client(c: int) -> None:
        async with OrchestratorClient(port=port) as oc:
            for i in range(per_client):
                try:
                    await oc.submit_task(f"{tag}-{c}-{i}", "echo", {"c": c, "i": i})
                    answered.append(time.perf_counter())
                except Exception as e:  # every failure is collected and reported
                    failed.append(f"{tag}-{c}-{i}: {e}")

    async def restarter() -> None:
        if restart is None:
            return
        await asyncio.sleep(0.2)
        restart_window[0] = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            DSPY_AGENT, "restart", restart, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = await proc.communicate()
        restart_window[1] = time.perf_counter()
        if proc.returncode != 0:
            failed.append(f"restart {restart}: {err.decode()}")

    began = time.perf_counter()
    await asyncio.gather(restarter(), *(client(c) for c in range(clients)))
    # Every task completes.
    async with OrchestratorClient(port=port) as oc:
        for c in range(clients):
            for i in range(per_client):
                info = await oc.wait_for_task(f"{tag}-{c}-{i}", timeout=120)
                if info.status != TaskStatus.COMPLETED:
                    failed.append(f"{tag}-{c}-{i} ended {info.status}: {info.error}")
                elif json.loads(info.result_payload) != {"c": c, "i": i}:
                    failed.append(f"{tag}-{c}-{i} has a wrong result")
    during = sum(restart_window[0] <= t <= restart_window[1] for t in answered)
    return Round(
        clients * per_client,
        failed,
        time.perf_counter() - began,
        rss_bytes(daemon_pid),
        during,
    )


def daemon_pid() -> int:
    out = subprocess.run(
        [DSPY_AGENT, "status", "--json"], check=True, capture_output=True, text=True
    ).stdout
    pid: int = json.loads(out)["daemon"]["pid"]
    return pid


def orchestrator_port() -> int:
    out = subprocess.run(
        [DSPY_AGENT, "status", "--json"], check=True, capture_output=True, text=True
    ).stdout
    return int(json.loads(out)["daemon"]["orchestrator_addr"].rpartition(":")[2])
