"""The service stack against a real Docker Engine: order, parallelism, health, rollback, reuse."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dspy_agent_infra import (
    AgentInfra,
    ConfigError,
    PortInUseError,
    ServiceStartError,
    UnknownServiceError,
)
from helpers import BUSYBOX, containers, docker, http_service, inspect, redis_service


def started_at(container_id: str) -> datetime:
    # The Engine reports nanoseconds; datetime takes microseconds.
    text = inspect(container_id)["State"]["StartedAt"]
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}")


def start(project: str, services: dict[str, dict[str, Any]], **kw: Any) -> AgentInfra:
    return AgentInfra.start(
        project=project, services=list(services), config={"services": services}, **kw
    )


async def test_dependent_starts_after_its_dependency_is_healthy(project: str) -> None:
    services = {
        "slow": http_service(env={"START_DELAY": "2"}),
        "app": http_service(depends_on=["slow"]),
    }
    async with start(project, services) as infra:
        assert {s.status for s in infra.services.values()} == {"healthy"}
        slow = infra.service("slow").container_id
        app = infra.service("app").container_id
        assert slow and app
        # `slow` listens 2 s after it starts, so a dependent that waited for its health check
        # cannot have started earlier.
        assert (started_at(app) - started_at(slow)).total_seconds() >= 2.0
    assert containers(project) == []


def gated(me: str, other: str, **extra: Any) -> dict[str, Any]:
    """An HTTP service that serves (and so becomes healthy) only once `other` has started: both
    mount one volume, where each marks its own start and waits for the other's mark."""
    wait = f"touch /gate/{me}; until [ -e /gate/{other} ]; do sleep 0.05; done; exec /serve"
    return http_service(volumes=["gate:/gate"], command=["sh", "-c", wait], **extra)


async def test_independent_services_start_in_parallel(project: str) -> None:
    # Were a's start to wait for b to be healthy, or b's for a, neither would ever be: the stack
    # comes up only if both start before either is healthy.
    services = {
        "a": gated("a", "b"),
        "b": gated("b", "a"),
        "c": http_service(depends_on=["a", "b"]),
    }
    async with start(project, services) as infra:
        assert {s.status for s in infra.services.values()} == {"healthy"}
        a, b, c = (started_at(infra.service(n).container_id or "") for n in ("a", "b", "c"))
        # c waited for both.
        assert c > a and c > b


async def test_completed_condition_waits_for_a_job_to_finish(project: str) -> None:
    services = {
        "migrate": {
            "image": BUSYBOX,
            "pull": "never",
            "command": ["sh", "-c", "sleep 1; echo migrated"],
            "healthcheck": {"type": "none"},
        },
        "app": http_service(depends_on={"migrate": "completed"}),
    }
    async with start(project, services) as infra:
        assert infra.service("migrate").status == "completed"
        job = inspect(infra.service("migrate").container_id or "")
        assert job["State"]["ExitCode"] == 0
        finished = job["State"]["FinishedAt"]
        assert started_at(infra.service("app").container_id or "").isoformat() > finished[:19]
        assert "migrated" in await infra.logs("migrate")


async def test_probe_types(project: str) -> None:
    services = {
        "tcp": http_service(healthcheck={"type": "tcp"}),
        "exec": http_service(
            healthcheck={"type": "exec", "command": ["test", "-f", "/www/health"]}
        ),
        "redis": redis_service(),
        "none": http_service(healthcheck={"type": "none"}),
    }
    async with start(project, services) as infra:
        assert {n: s.status for n, s in infra.services.items()} == dict.fromkeys(
            services, "healthy"
        )
        # The Redis probe spoke the real protocol: so can we, through the published port.
        info = infra.service("redis")
        with socket.create_connection((info.host, info.ports[6379]), timeout=5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(16).startswith(b"+PONG")


async def test_never_healthy_rolls_back_and_reports_logs(project: str) -> None:
    services = {
        "ok": redis_service(),
        # Listens on 9000 while the probe checks 8000: never healthy.
        "stuck": http_service(
            env={"PORTS": "9000"},
            healthcheck={"type": "http", "start_period": "2s"},
            depends_on=["ok"],
        ),
    }
    with pytest.raises(ServiceStartError) as err:
        async with start(project, services):
            pytest.fail("the stack must not come up")
    e = err.value
    assert e.service == "stuck"
    assert "start period" in e.reason and "GET http://" in e.reason
    assert "serve: listening on 9000" in e.logs
    assert containers(project) == []


async def test_crashing_container_fails_fast_with_its_exit_code(project: str) -> None:
    services = {"crash": http_service(env={"EXIT_CODE": "3"})}
    with pytest.raises(ServiceStartError) as err:
        async with start(project, services):
            pytest.fail("the stack must not come up")
    assert err.value.service == "crash"
    assert "exited with code 3" in err.value.reason
    assert "exiting with code 3" in err.value.logs
    assert containers(project) == []


async def test_busy_host_port_is_refused_before_anything_is_created(project: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        services = {"first": redis_service(), "web": http_service(ports=[f"{port}:8000"])}
        with pytest.raises(PortInUseError) as err:
            async with start(project, services):
                pytest.fail("the stack must not come up")
    assert err.value.service == "web" and err.value.port == port
    assert str(port) in str(err.value) and "web" in str(err.value)
    assert containers(project) == []


async def test_missing_image_with_pull_never_names_image_and_service(project: str) -> None:
    services = {"ghost": http_service(image="dspy-agent-test/absent:1")}
    with pytest.raises(ServiceStartError) as err:
        async with start(project, services):
            pytest.fail("the stack must not come up")
    assert err.value.service == "ghost"
    assert "dspy-agent-test/absent:1" in str(err.value) and "never" in str(err.value)
    assert containers(project) == []


async def test_unreachable_registry_names_image_and_service(project: str) -> None:
    services = {"remote": http_service(image="registry.invalid/dspy/absent:1", pull="missing")}
    with pytest.raises(ServiceStartError) as err:
        async with start(project, services):
            pytest.fail("the stack must not come up")
    assert err.value.service == "remote"
    assert "registry.invalid/dspy/absent:1" in str(err.value) and "pull" in str(err.value)


async def test_warm_start_reuses_running_containers(project: str) -> None:
    services = {"cache": redis_service(), "web": http_service(depends_on=["cache"])}
    async with start(project, services, keep_running=True) as infra:
        first = {n: s.container_id or "" for n, s in infra.services.items()}
        assert not any(s.reused for s in infra.services.values())
    assert sorted(containers(project)) == sorted(first.values())

    async with start(project, services) as infra:
        assert {n: s.container_id or "" for n, s in infra.services.items()} == first
        assert all(s.reused for s in infra.services.values())
        assert infra.service("web").status == "healthy"
    assert containers(project) == []


async def test_changed_config_recreates_only_changed_services_and_dependents(
    project: str,
) -> None:
    services = {
        "base": redis_service(),
        "mid": http_service(depends_on=["base"]),
        "top": http_service(depends_on=["mid"]),
        "side": http_service(),
    }
    async with start(project, services, keep_running=True) as infra:
        before = {n: s.container_id or "" for n, s in infra.services.items()}

    services["mid"] = http_service(depends_on=["base"], env={"CHANGED": "1"})
    async with start(project, services, keep_running=True) as infra:
        after = {n: s.container_id or "" for n, s in infra.services.items()}
    assert after["base"] == before["base"] and after["side"] == before["side"]
    assert after["mid"] != before["mid"] and after["top"] != before["top"]
    assert sorted(containers(project)) == sorted(after.values())

    # A service the config no longer names is removed.
    del services["side"]
    async with start(project, services) as infra:
        assert "side" not in infra.services
        assert after["side"] not in containers(project)
    assert containers(project) == []


async def test_logs_status_restart_and_env(project: str) -> None:
    services = {"cache": redis_service(), "web": http_service()}
    async with start(project, services) as infra:
        assert "Ready to accept connections" in await infra.logs("cache", tail=20)
        status = await infra.status()
        assert status["web"].status == "healthy"

        cid = infra.service("web").container_id or ""
        before = started_at(cid)
        info = await infra.restart("web")
        assert info.status == "healthy" and info.container_id == cid
        assert started_at(cid) > before

        env = infra.env
        port = infra.service("cache").ports[6379]
        assert env["CACHE_URL"] == f"redis://127.0.0.1:{port}"
        assert env["CACHE_PORT"] == str(port)
        assert env["WEB_URL"] == f"http://127.0.0.1:{infra.service('web').ports[8000]}"

        with pytest.raises(UnknownServiceError):
            infra.service("nope")
        with pytest.raises(UnknownServiceError):
            await infra.logs("nope")


async def test_container_that_dies_shows_in_status(project: str) -> None:
    async with start(project, {"web": http_service()}) as infra:
        cid = infra.service("web").container_id or ""
        await asyncio.create_subprocess_exec("docker", "kill", cid)
        for _ in range(100):
            if (await infra.status())["web"].status == "failed":
                break
            await asyncio.sleep(0.05)
        assert (await infra.status())["web"].status == "failed"
    assert containers(project) == []


async def test_cancelling_a_start_removes_what_it_created(project: str) -> None:
    services = {
        "cache": redis_service(),
        "slow": http_service(env={"START_DELAY": "60"}, depends_on=["cache"]),
    }

    async def enter() -> None:
        async with start(project, services):
            pytest.fail("the stack must not come up")

    task = asyncio.ensure_future(enter())
    for _ in range(200):
        if len(containers(project)) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(containers(project)) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert containers(project) == []


async def test_rust_logs_reach_python_logging(
    project: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_agent_infra")
    async with start(project, {"web": http_service()}):
        pass
    names = {r.name for r in caplog.records}
    assert any(n.startswith("dspy_agent_infra.") for n in names), names
    assert any("probe passed" in r.getMessage() for r in caplog.records)


def test_config_errors_name_what_is_wrong(project: str) -> None:
    cycle = {
        "ingest": http_service(depends_on=["embed"]),
        "embed": http_service(depends_on=["rank"]),
        "rank": http_service(depends_on=["ingest"]),
    }
    with pytest.raises(ConfigError) as err:
        start(project, cycle)
    # The whole cycle, closed: "dependency cycle: embed -> rank -> ingest -> embed".
    found = re.search(r"dependency cycle: (\w+) -> (\w+) -> (\w+) -> (\w+)", str(err.value))
    assert found, str(err.value)
    assert found.group(1) == found.group(4)
    assert set(found.groups()) == set(cycle)

    with pytest.raises(ConfigError, match='"ghost"'):
        start(project, {"a": http_service(depends_on=["ghost"])})
    with pytest.raises(ConfigError, match="13000"):
        start(
            project,
            {"a": http_service(ports=["13000:8000"]), "b": http_service(ports=["13000:8000"])},
        )
    with pytest.raises(ConfigError, match=r"services\.a\.resources\.memory"):
        start(project, {"a": http_service(resources={"memory": "lots"})})
    with pytest.raises(ConfigError, match=r"services\.a\.resources\.cpus"):
        start(project, {"a": http_service(resources={"cpus": "0"})})
    with pytest.raises(ConfigError, match="not a valid name"):
        start(project, {"bad name!": http_service()})
    with pytest.raises(ConfigError, match="unknown field"):
        start(project, {"a": http_service(colour="blue")})
    with pytest.raises(ConfigError, match="nosuch"):
        AgentInfra.start(project=project, services=["nosuch"])
    with pytest.raises(TypeError):
        AgentInfra.start(services="redis")  # type: ignore[arg-type]
    assert containers(project) == []


async def test_container_settings_reach_the_engine(project: str, tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("from the host")
    services = {
        "web": http_service(
            command=["sh", "-c", "date >> /data/runs; exec /serve"],
            volumes=["data:/data", f"{tmp_path}:/mnt/host:ro"],
            healthcheck={
                "type": "exec",
                "command": ["grep", "-q", "from the host", "/mnt/host/marker"],
            },
            resources={"cpus": "0.5", "memory": "64m"},
            restart="on-failure:2",
            labels={"team": "agents"},
        )
    }
    for _ in range(2):
        async with start(project, services) as infra:
            c = inspect(infra.service("web").container_id or "")
            host = c["HostConfig"]
            assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 64 * 1024 * 1024
            assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
            assert host["Privileged"] is False
            assert host["PortBindings"]["8000/tcp"][0]["HostIp"] == "127.0.0.1"
            labels = c["Config"]["Labels"]
            assert labels["team"] == "agents" and labels["dspy-agent.service"] == "web"
            assert labels["dspy-agent.project"] == project
            assert f"{project}_default" in c["NetworkSettings"]["Networks"]
    # The named volume outlived both stacks and kept what each run wrote.
    out = docker(
        "run", "--rm", "-v", f"{project}_data:/data", BUSYBOX, "sh", "-c", "cat /data/runs"
    )
    assert len(out.splitlines()) == 2
    assert containers(project) == []


async def test_process_and_confinement_settings_reach_the_engine(project: str) -> None:
    # What a compose file sets beside the image: user, folder, entry point, a read-only root
    # with an in-memory /tmp, capabilities, no-new-privileges and an init process.
    services = {
        "web": http_service(
            entrypoint=["/bin/sh", "-c"],
            command=["touch /tmp/ok && ! touch /not-writable 2>/dev/null && exec /serve"],
            user="65534:65534",
            working_dir="/www",
            read_only=True,
            tmpfs=["/tmp:size=16m"],
            cap_drop=["ALL"],
            cap_add=["NET_BIND_SERVICE"],
            no_new_privileges=True,
            init=True,
            resources={"memory": "64m", "memory_reservation": "32m"},
        )
    }
    async with start(project, services) as infra:
        web = infra.service("web")
        assert web.status == "healthy"
        c = inspect(web.container_id or "")
        config, host = c["Config"], c["HostConfig"]
        assert config["User"] == "65534:65534" and config["WorkingDir"] == "/www"
        assert config["Entrypoint"] == ["/bin/sh", "-c"]
        assert host["ReadonlyRootfs"] is True and host["Tmpfs"] == {"/tmp": "size=16m"}
        assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_BIND_SERVICE"]
        assert host["SecurityOpt"] == ["no-new-privileges:true"] and host["Init"] is True
        assert host["MemoryReservation"] == 32 * 1024 * 1024
        # The process runs as that user.
        out = docker("exec", web.container_id or "", "id", "-u")
        assert out.strip() == "65534"
    assert containers(project) == []


def engine_has_gpus() -> bool:
    runtimes = docker("info", "--format", "{{json .Runtimes}}")
    return "nvidia" in json.loads(runtimes)


async def test_gpu_requests_follow_the_engine(project: str) -> None:
    gpus = engine_has_gpus()
    # "auto" asks for GPUs exactly when the Engine offers the NVIDIA runtime.
    async with start(project, {"llm": http_service(resources={"gpus": "auto"})}) as infra:
        c = inspect(infra.service("llm").container_id or "")
        assert bool(c["HostConfig"].get("DeviceRequests")) == gpus
    if gpus:
        async with start(project, {"llm": http_service(resources={"gpus": "all"})}) as infra:
            assert infra.service("llm").status == "healthy"
    else:
        # An explicit request the Engine cannot meet fails with the service named.
        with pytest.raises(ServiceStartError) as err:
            async with start(project, {"llm": http_service(resources={"gpus": "all"})}):
                pytest.fail("this Engine has no GPU runtime")
        assert err.value.service == "llm"
    assert containers(project) == []
