"""The swarm backend on a real three-node swarm: three Docker Engines, each in a network namespace
of its own, joined as one manager and two workers (scripts/swarm_lab.sh). This kernel has no
IPVS, so the stacks here use DNS round-robin endpoints and host-mode publishing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_reliability import phases

from dspy_agent_infra import AgentInfra, ConfigError, InfraError, ServiceStartError
from helpers import BUSYBOX, REDIS

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "scripts" / "swarm_lab.sh"


@dataclass
class Lab:
    manager: str
    # node name (n1...) -> engine socket
    engines: dict[str, str]

    def docker(self, *args: str, node: str = "n1") -> str:
        out = subprocess.run(
            ["docker", "-H", self.engines[node], *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}"
        return out.stdout

    def services(self, project: str) -> list[str]:
        return self.docker(
            "service", "ls", "-q", "--filter", f"label=dspy-agent.project={project}"
        ).split()

    def tasks(self, service: str) -> list[dict[str, Any]]:
        """The running tasks of a Swarm service: id, node and when it was created."""
        ids = self.docker(
            "service", "ps", "-q", "--filter", "desired-state=running", service
        ).split()
        if not ids:
            return []
        found: list[dict[str, Any]] = json.loads(self.docker("inspect", *ids))
        return found

    def hostname(self, node_id: str) -> str:
        return self.docker("node", "inspect", "-f", "{{.Description.Hostname}}", node_id).strip()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    assert os.geteuid() == 0, "the swarm lab needs root (network namespaces, three dockerd)"
    up = subprocess.run(["bash", str(LAB), "up"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    env = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    engines = {}
    for entry in env["DSPY_AGENT_SWARM_NODES"].split():
        name, sock, _addr = entry.split("=")
        engines[name] = sock
    lab = Lab(manager=env["DSPY_AGENT_SWARM_MANAGER"], engines=engines)
    lab.docker("node", "update", "--label-add", "tier=storage", "lab-n2")
    lab.docker("node", "update", "--label-add", "role=client", "lab-n3")
    try:
        yield lab
    finally:
        subprocess.run(["bash", str(LAB), "down"], capture_output=True, timeout=120)


def web(**extra: Any) -> dict[str, Any]:
    """A busybox HTTP service on container port 8080, published on each replica's node."""
    spec: dict[str, Any] = {
        "image": BUSYBOX,
        "pull": "never",
        "env": {"PORTS": "8080"},
        "ports": ["0:8080"],
        "healthcheck": {"type": "http", "port": 8080, "path": "/health", "start_period": "30s"},
        "stop_timeout": "2s",
        "restart": "always",
        "swarm": {"endpoint_mode": "dnsrr", "publish_mode": "host"},
    }
    swarm = extra.pop("swarm", {})
    spec.update(extra)
    spec["swarm"] = {**spec["swarm"], **swarm}
    return spec


def start(lab: Lab, project: str, services: dict[str, Any]) -> AgentInfra:
    return AgentInfra.start(
        project=project,
        services=list(services),
        config={"services": services, "backend": "swarm"},
        docker_host=lab.manager,
    )


def timestamp(text: str) -> float:
    """Seconds since the epoch of an Engine timestamp (nanoseconds cut to microseconds)."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{whole}.{(fraction + '000000')[:6]}+00:00").timestamp()


async def test_a_stack_spreads_over_the_nodes_and_its_services_reach_each_other(
    lab: Lab, project: str
) -> None:
    services = {
        # On the storage node only, its password a Swarm secret.
        "cache": {
            "image": REDIS,
            "pull": "never",
            "command": [
                "sh",
                "-c",
                'sleep 3 && exec redis-server --requirepass "$CACHE_PASSWORD"',
            ],
            "env": {"CACHE_PASSWORD": "s3cret-for-swarm-test"},
            "secret_env": ["CACHE_PASSWORD"],
            "ports": ["0:6379"],
            "healthcheck": {
                "type": "exec",
                "command": [
                    "sh",
                    "-c",
                    'redis-cli -a "$(cat "$CACHE_PASSWORD_FILE")" ping | grep -q PONG',
                ],
                "interval": "1s",
                "start_period": "30s",
            },
            "stop_timeout": "2s",
            "swarm": {
                "constraints": ["node.labels.tier == storage"],
                "endpoint_mode": "dnsrr",
                "publish_mode": "host",
            },
        },
        "web": web(
            depends_on={"cache": "healthy"},
            swarm={"replicas": 3, "max_per_node": 1, "update": {"monitor": "1s"}},
        ),
        # On the client node: healthy once it reaches web over the overlay network by name.
        "client": {
            "image": BUSYBOX,
            "pull": "never",
            "command": ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
            "depends_on": ["web"],
            "healthcheck": {
                "type": "exec",
                "command": ["wget", "-q", "-O", "-", "http://web:8080/health"],
                "interval": "1s",
                "start_period": "30s",
            },
            "stop_timeout": "2s",
            "swarm": {"constraints": ["node.labels.role == client"], "endpoint_mode": "dnsrr"},
        },
    }
    async with start(lab, project, services) as infra:
        assert {n: s.status for n, s in infra.services.items()} == dict.fromkeys(
            services, "healthy"
        )
        status = await infra.status()
        nodes = {n: sorted(r.node for r in s.replicas) for n, s in status.items()}
        assert nodes == {
            "cache": ["lab-n2"],
            "web": ["lab-n1", "lab-n2", "lab-n3"],
            "client": ["lab-n3"],
        }
        assert all(r.state == "running" for s in status.values() for r in s.replicas)
        # Each replica of web answers at its own node's address.
        for r in status["web"].replicas:
            reader, writer = await asyncio.open_connection(r.node_addr, r.ports[8080])
            writer.write(b"GET /health HTTP/1.0\r\n\r\n")
            assert b"200" in await reader.readline()
            writer.close()

        # depends_on across nodes: web's replicas were made only once cache, which takes 3 s to
        # come up in its container on its node, was healthy.
        cache_task = lab.tasks(f"{project}-cache")[0]
        cache_container = json.loads(
            lab.docker("inspect", cache_task["Status"]["ContainerStatus"]["ContainerID"], node="n2")
        )[0]
        web_made = min(timestamp(t["CreatedAt"]) for t in lab.tasks(f"{project}-web"))
        assert web_made - timestamp(cache_container["State"]["StartedAt"]) >= 3.0

        # The password is a Swarm secret, never in the service's spec; redis requires it.
        cache_spec = json.loads(lab.docker("service", "inspect", f"{project}-cache"))[0]
        container = cache_spec["Spec"]["TaskTemplate"]["ContainerSpec"]
        assert "s3cret-for-swarm-test" not in json.dumps(cache_spec)
        (secret,) = container["Secrets"]
        assert secret["SecretName"].startswith(f"{project}-cache-")
        replica = status["cache"].replicas[0]
        reader, writer = await asyncio.open_connection(replica.node_addr, replica.ports[6379])
        writer.write(b"PING\r\n")
        assert (await reader.readline()).startswith(b"-NOAUTH")
        writer.write(b"AUTH s3cret-for-swarm-test\r\nPING\r\n")
        assert await reader.readline() == b"+OK\r\n"
        assert await reader.readline() == b"+PONG\r\n"
        writer.close()

        # Logs of every replica, each line marked with its replica and node.
        logs = await infra.logs("web", tail=5)
        for node in ("lab-n1", "lab-n2", "lab-n3"):
            assert f"@{node} | serve: listening on 8080" in logs, logs

        # A restart is a rolling update of that service alone.
        before = {name: {t["ID"] for t in lab.tasks(f"{project}-{name}")} for name in services}
        restarted = await infra.restart("web")
        assert restarted.status == "healthy"
        after = {name: {t["ID"] for t in lab.tasks(f"{project}-{name}")} for name in services}
        assert len(after["web"]) == 3 and not (after["web"] & before["web"])
        assert after["cache"] == before["cache"] and after["client"] == before["client"]
    assert lab.services(project) == []
    assert project not in lab.docker("network", "ls", "--format", "{{.Name}}")
    deadline = time.monotonic() + 15
    while project in lab.docker("secret", "ls", "--format", "{{.Name}}"):
        assert time.monotonic() < deadline, "the stack's secrets were left behind"
        await asyncio.sleep(0.2)


async def test_a_lost_node_is_rescheduled_and_the_stack_is_healthy_again(
    lab: Lab, project: str
) -> None:
    services = {
        "web": web(swarm={"replicas": 2, "constraints": ["node.role == worker"]}),
        "app": web(depends_on=["web"], swarm={"constraints": ["node.role == manager"]}),
    }
    async with start(lab, project, services) as infra:
        replicas = (await infra.status())["web"].replicas
        assert sorted(r.node for r in replicas) == ["lab-n2", "lab-n3"]
        lost = time.monotonic()
        subprocess.run(["bash", str(LAB), "kill-node", "n3"], check=True, timeout=60)
        try:
            seen = await phases(infra, "web", "healthy again", limit=90)
            healed = time.monotonic() - lost
            assert any(status == "failed" for status, _ in seen), seen
            status = await infra.status()
            assert [r.node for r in status["web"].replicas] == ["lab-n2", "lab-n2"]
            assert all(r.state == "running" for r in status["web"].replicas)
            # The other service was not disturbed.
            assert status["app"].status == "healthy"
            print(f"node lost -> healthy again in {healed:.1f} s")
        finally:
            subprocess.run(["bash", str(LAB), "start-node", "n3"], check=True, timeout=120)
    assert lab.services(project) == []


def test_the_owner_killed_leaves_no_service_behind(lab: Lab, project: str, tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            from dspy_agent_infra import AgentInfra
            services = {{"web": {web()!r}}}
            async def main():
                async with AgentInfra.start(project={project!r}, services=["web"],
                        config={{"services": services, "backend": "swarm"}},
                        docker_host={lab.manager!r}):
                    print("up", flush=True)
                    await asyncio.sleep(600)
            asyncio.run(main())
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "up"
        assert len(lab.services(project)) == 1
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        deadline = time.monotonic() + 60
        while lab.services(project):
            assert time.monotonic() < deadline, "the killed owner's services were left behind"
            time.sleep(0.2)
    finally:
        owner.kill()
        owner.wait()


async def test_bad_swarm_input_is_refused_with_its_fix(lab: Lab, project: str) -> None:
    # No node satisfies the constraint: a clear error within seconds, nothing left behind.
    began = time.monotonic()
    services = {"web": web(swarm={"constraints": ["node.labels.gpu == true"]})}
    with pytest.raises(ServiceStartError) as failed:
        async with start(lab, project, services):
            pass
    assert time.monotonic() - began < 20
    message = str(failed.value)
    assert "cannot place" in message and "constraints" in message, message
    assert lab.services(project) == []
    # The main Engine of this machine is no swarm manager.
    with pytest.raises(InfraError) as refused:
        async with AgentInfra.start(
            project=project,
            services=["web"],
            config={"services": {"web": web()}, "backend": "swarm"},
        ):
            pass
    assert "docker swarm init" in str(refused.value)
    # A worker's engine is not a manager.
    with pytest.raises(InfraError) as refused:
        async with AgentInfra.start(
            project=project,
            services=["web"],
            config={"services": {"web": web()}, "backend": "swarm"},
            docker_host=lab.engines["n2"],
        ):
            pass
    assert "not a manager" in str(refused.value)
    # Swarm settings on the docker backend name the key.
    with pytest.raises(ConfigError) as wrong_backend:
        AgentInfra.start(project=project, services=["web"], config={"services": {"web": web()}})
    assert "services.web.swarm" in str(wrong_backend.value)
