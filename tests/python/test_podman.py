"""Podman: the same stacks run on Podman's Docker-compatible API (`podman system service`),
with `docker_host` pointing at its socket. A Podman service of the test's own runs beside the
Docker Engine; the test images are copied into it."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reliability import phases

from dspy_agent_infra import AgentInfra, DockerUnavailableError
from helpers import BUSYBOX, REDIS, containers, http_service, redis_service

# What Podman reads beside its defaults. This machine lets no process raise its resource limits
# (Podman's default ulimits fail every start) and runs no journald (Podman's default events log).
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
events_logger = "file"
"""


def podman(*args: str, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CONTAINERS_CONF": str(conf)},
    )


@pytest.fixture(scope="module")
def podman_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The socket of a Podman API service this module starts, with the test images loaded."""
    assert shutil.which("podman"), "podman is needed (scripts/test.sh installs it)"
    folder = tmp_path_factory.mktemp("podman")
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    sock = folder / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env={**os.environ, "CONTAINERS_CONF": str(conf)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                break
            except OSError:
                assert time.monotonic() < deadline, "podman system service did not listen"
                time.sleep(0.05)
        saved = subprocess.run(
            ["docker", "save", BUSYBOX, REDIS], capture_output=True, check=True, timeout=120
        )
        loaded = subprocess.run(
            ["podman", "load"],
            input=saved.stdout,
            capture_output=True,
            timeout=120,
            env={**os.environ, "CONTAINERS_CONF": str(conf)},
        )
        assert loaded.returncode == 0, loaded.stderr.decode()
        # An image with a HEALTHCHECK of its own, which Podman never runs without systemd.
        (folder / "Containerfile").write_text(
            f"FROM {BUSYBOX}\nENV PORTS=8000\n"
            "HEALTHCHECK --interval=1s CMD wget -q -O /dev/null http://127.0.0.1:8000/health\n"
        )
        built = podman(
            "build", "-q", "--format", "docker", "-t", HEALTHCHECKED, str(folder), conf=conf
        )
        assert built.returncode == 0, built.stderr
        yield f"unix://{sock}"
    finally:
        service.terminate()
        service.wait(timeout=30)


HEALTHCHECKED = "dspy-agent-test/healthchecked:latest"


def podman_containers(project: str, host: str) -> list[str]:
    out = subprocess.run(
        [
            "podman", "--url", host, "ps", "-a", "-q",
            "--filter", f"label=dspy-agent.project={project}",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.split()


async def test_a_stack_runs_heals_and_stops_on_podman(podman_host: str, project: str) -> None:
    services = {
        "cache": redis_service(),
        "web": http_service(
            depends_on={"cache": "healthy"},
            healthcheck={
                "type": "exec",
                "command": ["wget", "-q", "-O", "-", "http://127.0.0.1:8000/health"],
            },
            volumes=["data:/data"],
            restart="always",
        ),
    }
    async with AgentInfra.start(
        project=project,
        services=list(services),
        config={"services": services},
        docker_host=podman_host,
    ) as infra:
        assert {n: s.status for n, s in infra.services.items()} == {
            "cache": "healthy",
            "web": "healthy",
        }
        # On Podman, not on the Docker Engine.
        assert len(podman_containers(project, podman_host)) == 2
        assert containers(project) == []
        cache = infra.service("cache")
        reader, writer = await asyncio.open_connection(cache.host, cache.ports[6379])
        writer.write(b"PING\r\n")
        assert await reader.readline() == b"+PONG\r\n"
        writer.close()
        await infra.submit_task(
            "run", "exec", {"service": "web", "command": ["sh", "-c", "echo hi > /data/x"]}
        )
        done = await infra.wait_for_task("run", timeout=30)
        assert done.status.name == "COMPLETED", done.error
        restarted = await infra.restart("web")
        assert restarted.status == "healthy"
        # A container killed behind its back is seen through Podman's events and comes back.
        web = infra.service("web").container_id or ""
        killed = subprocess.run(
            ["podman", "--url", podman_host, "kill", web], capture_output=True, text=True
        )
        assert killed.returncode == 0, killed.stderr
        seen = await phases(infra, "web", "healthy again")
        assert any(status == "failed" and "137" in message for status, message in seen), seen
    assert podman_containers(project, podman_host) == []
    # Its named volume outlives the stack, as on Docker.
    kept = subprocess.run(
        ["podman", "--url", podman_host, "volume", "rm", f"{project}_data"],
        capture_output=True,
        text=True,
    )
    assert kept.returncode == 0, kept.stderr


async def test_the_images_own_healthcheck_is_run_on_podman(podman_host: str, project: str) -> None:
    # Podman leaves HEALTHCHECKs to systemd timers: the core runs the image's check itself.
    services = {
        "web": {
            "image": HEALTHCHECKED,
            "pull": "never",
            "ports": ["0:8000"],
            "healthcheck": {"type": "docker", "start_period": "20s"},
            "stop_timeout": "2s",
        }
    }
    async with AgentInfra.start(
        project=project, services=["web"], config={"services": services}, docker_host=podman_host
    ) as infra:
        web = infra.service("web")
        assert web.status == "healthy" and "docker probe passed" in web.message, web.message
    assert podman_containers(project, podman_host) == []


async def test_a_podman_socket_that_is_not_there_is_named(tmp_path: Path, project: str) -> None:
    missing = f"unix://{tmp_path}/podman.sock"
    began = time.monotonic()
    with pytest.raises(DockerUnavailableError) as failed:
        async with AgentInfra.start(
            project=project,
            services=["web"],
            config={"services": {"web": http_service()}},
            docker_host=missing,
        ):
            pass
    assert time.monotonic() - began < 15
    assert missing in str(failed.value) and "podman system service" in str(failed.value)
