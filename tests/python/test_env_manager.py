"""The env-manager port driven by grpcio with stubs generated from proto/ at test time, against
a stack on the real Docker Engine."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

import grpc
from dspy_agent_infra import AgentInfra
from helpers import (
    BUSYBOX,
    containers,
    credentials,
    free_port,
    http_service,
    redis_service,
)

# Fails on every start after its first: the marker in its named volume outlives the container.
ONCE = [
    "sh",
    "-c",
    "[ -f /data/ran ] && echo 'second start refused' >&2 && exit 3; touch /data/ran; exec /serve",
]


@pytest.fixture
async def stack(project: str) -> AsyncIterator[tuple[AgentInfra, Any, int]]:
    web_port = free_port()
    services = {
        "cache": redis_service(),
        "web": http_service(
            depends_on=["cache"],
            ports=[f"{web_port}:8000"],
            command=["sh", "-c", "echo to-stdout; echo to-stderr >&2; exec /serve"],
        ),
        "once": http_service(command=ONCE, volumes=["once-data:/data"]),
    }
    async with AgentInfra.start(
        project=project, services=list(services), config={"services": services}
    ) as infra:
        async with grpc.aio.secure_channel(infra.env_manager_addr, credentials(infra.token)) as ch:
            yield infra, ch, web_port
    assert containers(project) == []


def names(updates: list[Any], pb2: Any) -> list[tuple[str, str]]:
    return [(u.service, pb2.ServicePhase.Name(u.phase)) for u in updates]


async def test_status_stats_and_resources(pb: dict[str, Any], stack: Any, project: str) -> None:
    infra, ch, web_port = stack
    e = pb["env_manager_v1_pb2"]
    stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(ch)

    status = await stub.GetServicesStatus(e.GetServicesStatusRequest(include_stats=True))
    assert status.engine_reachable and status.project == project
    by_name = {s.name: s for s in status.services}
    assert set(by_name) == {"cache", "web", "once"}
    web = by_name["web"]
    assert web.healthy and web.phase == e.HEALTHY and web.state == "running"
    assert web.container_id == infra.service("web").container_id
    assert [(p.container_port, p.host_port) for p in web.ports] == [(8000, web_port)]
    assert web.url == f"http://127.0.0.1:{web_port}"
    assert web.started_at_ms > 0 and web.restart_count == 0
    # Stats come from the Engine: a running redis uses memory, and some CPU time was sampled.
    assert by_name["cache"].usage.memory_bytes > 0
    assert by_name["cache"].usage.memory_limit_bytes > 0

    resources = await stub.GetResourceAvailability(e.GetResourceAvailabilityRequest())
    assert resources.cpu_cores == os.cpu_count()
    assert 0 < resources.memory_available_bytes <= resources.memory_total_bytes
    assert resources.engine_version and resources.engine_cpus > 0
    # As many GPUs as nvidia-smi lists on this machine, none without it (the parsing of its
    # output is unit-tested in Rust).
    smi = shutil.which("nvidia-smi")
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout if smi else ""
    assert len(resources.gpus) == len([line for line in listed.splitlines() if line.strip()])

    h = pb["health_pb2"]
    health = pb["health_pb2_grpc"].HealthStub(ch)
    served = await health.Check(h.HealthCheckRequest(service="env_manager.v1.EnvManagerService"))
    assert served.status == h.HealthCheckResponse.SERVING


async def test_stop_start_restart_and_health_stream(pb: dict[str, Any], stack: Any) -> None:
    infra, ch, _ = stack
    e = pb["env_manager_v1_pb2"]
    stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(ch)

    health = stub.StreamHealth(e.StreamHealthRequest(services=["web"]))
    first = await health.read()
    assert (first.service, first.healthy) == ("web", True)

    stopped = await stub.StopServices(e.StopServicesRequest(services=["web"], timeout_seconds=1))
    assert list(stopped.stopped) == ["web"]
    seen = [await health.read(), await health.read()]
    assert names(seen, e) == [("web", "STOPPING"), ("web", "STOPPED")]
    status = {
        s.name: s for s in (await stub.GetServicesStatus(e.GetServicesStatusRequest())).services
    }
    assert status["web"].phase == e.STOPPED and not status["web"].container_id
    assert status["cache"].healthy

    updates = [u async for u in stub.StartServices(e.StartServicesRequest(services=["web"]))]
    # `web` comes back; `cache`, its dependency, is kept as it runs.
    assert names(updates, e)[-1] == ("web", "HEALTHY")
    assert ("cache", "STARTING") in names(updates, e)
    assert any(u.message == "reusing running container" for u in updates if u.service == "cache")
    while (await health.read()).phase != e.HEALTHY:
        pass
    health.cancel()

    before = infra.service("cache").container_id
    restarted = await stub.RestartService(e.RestartServiceRequest(service="cache"))
    assert restarted.healthy and restarted.restart_count == 1
    assert restarted.container_id == before


async def test_a_failed_start_ends_the_stream_with_aborted(pb: dict[str, Any], stack: Any) -> None:
    _, ch, web_port = stack
    e = pb["env_manager_v1_pb2"]
    stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(ch)

    await stub.StopServices(e.StopServicesRequest(services=["once"]))
    call = stub.StartServices(e.StartServicesRequest(services=["once"]))
    updates = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for u in call:
            updates.append(u)
    assert failed.value.code() == grpc.StatusCode.ABORTED
    assert "second start refused" in failed.value.details()
    assert names(updates, e)[-1] == ("once", "FAILED")

    # A host port taken by something else: refused before anything is created.
    await stub.StopServices(e.StopServicesRequest(services=["web"]))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", web_port))
        squatter.listen()
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            async for _ in stub.StartServices(e.StartServicesRequest(services=["web"])):
                pass
    assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(web_port) in taken.value.details()


async def test_logs_exec_and_pull(pb: dict[str, Any], stack: Any) -> None:
    _, ch, _ = stack
    e = pb["env_manager_v1_pb2"]
    stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(ch)

    lines = [x async for x in stub.StreamLogs(e.StreamLogsRequest(service="web"))]
    got = {(e.LogStream.Name(x.stream), x.line) for x in lines}
    assert {("STDOUT", "to-stdout"), ("STDERR", "to-stderr")} <= got
    tail = [x.line async for x in stub.StreamLogs(e.StreamLogsRequest(service="web", tail=1))]
    assert len(tail) <= 2  # the last line of each stream

    follow = stub.StreamLogs(e.StreamLogsRequest(service="web", follow=True, tail=1))
    # Written to the main process's stdout from inside the container, so it is in the log.
    ran = await stub.ExecuteTask(
        e.ExecuteTaskRequest(service="web", command=["sh", "-c", "echo followed > /proc/1/fd/1"])
    )
    assert ran.exit_code == 0

    async def until_followed() -> None:
        while (await follow.read()).line != "followed":
            pass

    await asyncio.wait_for(until_followed(), 10)
    follow.cancel()

    out = await stub.ExecuteTask(
        e.ExecuteTaskRequest(service="web", command=["sh", "-c", "echo out; echo err >&2; exit 3"])
    )
    assert (out.exit_code, out.stdout, out.stderr) == (3, "out\n", "err\n")
    with pytest.raises(grpc.aio.AioRpcError) as slow:
        await stub.ExecuteTask(
            e.ExecuteTaskRequest(service="web", command=["sleep", "5"], timeout_seconds=1)
        )
    assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    pulled = [p async for p in stub.PullImages(e.PullImagesRequest(services=["web"]))]
    assert [(p.image, p.done, p.error) for p in pulled] == [(BUSYBOX, True, "")]
    # Forced, the pull fails (no registry here) and the local image is kept: said, not hidden.
    forced = [p async for p in stub.PullImages(e.PullImagesRequest(services=["web"], force=True))]
    assert forced[-1].done and not forced[-1].error
    assert any("using the local image" in p.status for p in forced)


async def test_bad_requests_get_proper_codes(pb: dict[str, Any], stack: Any) -> None:
    _, ch, _ = stack
    e = pb["env_manager_v1_pb2"]
    stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(ch)

    async def drain(call: Any) -> None:
        async for _ in call:
            pass

    cases: list[tuple[Any, grpc.StatusCode]] = [
        (drain(stub.StreamLogs(e.StreamLogsRequest(service="nope"))), grpc.StatusCode.NOT_FOUND),
        (
            drain(stub.StreamLogs(e.StreamLogsRequest(service="env-manager"))),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            drain(stub.StreamLogs(e.StreamLogsRequest(service="web", since_seconds=-1))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            stub.RestartService(e.RestartServiceRequest(service="")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (stub.RestartService(e.RestartServiceRequest(service="nope")), grpc.StatusCode.NOT_FOUND),
        (stub.StopServices(e.StopServicesRequest(services=["nope"])), grpc.StatusCode.NOT_FOUND),
        (
            stub.ExecuteTask(e.ExecuteTaskRequest(service="web", command=[])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            stub.ExecuteTask(e.ExecuteTaskRequest(service="nope", command=["true"])),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            stub.StreamHealth(e.StreamHealthRequest(services=["nope"])).read(),
            grpc.StatusCode.NOT_FOUND,
        ),
        (drain(stub.PullImages(e.PullImagesRequest(services=["nope"]))), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code, err.value.details()
        assert err.value.details()
