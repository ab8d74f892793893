"""No Engine, the zero-config catalog, config layers, and Ctrl-C in a real process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dspy_agent_infra import AgentInfra, ConfigError, DockerUnavailableError, InfraError
from helpers import containers, stacks


@pytest.mark.parametrize(
    "host",
    [
        "unix:///nonexistent/docker.sock",
        # Nothing answers on this port: the client must give up instead of hanging.
        "tcp://127.0.0.1:1",
        "ftp://example",
    ],
)
async def test_unreachable_engine_is_a_clear_error(project: str, host: str) -> None:
    with pytest.raises(DockerUnavailableError) as err:
        async with AgentInfra.start(project=project, services=["redis"], docker_host=host):
            pytest.fail("no Engine, no stack")
    assert host in str(err.value) and "DOCKER_HOST" in str(err.value)
    assert err.value.host == host


async def test_no_services_needs_no_engine() -> None:
    async with AgentInfra.start(services=[], docker_host="unix:///nonexistent.sock") as infra:
        assert infra.services == {}
        assert infra.env == {
            "ORCHESTRATOR_GRPC_ADDR": infra.orchestrator_addr,
            "ENV_MANAGER_GRPC_ADDR": infra.env_manager_addr,
        }
        assert await infra.status() == {}


async def test_the_default_catalog_comes_up_with_zero_config(project: str) -> None:
    async with AgentInfra.start(project=project) as infra:
        assert list(infra.services) == ["redis", "infermesh", "reddb"]
        assert {s.status for s in infra.services.values()} == {"healthy"}
        assert infra.env["REDIS_URL"] == "redis://127.0.0.1:6379"
        assert infra.env["REDDB_URL"] == "http://127.0.0.1:6380"
        assert infra.env["INFERMESH_URL"] == "http://127.0.0.1:8000"
    assert containers(project) == []


def test_config_file_environment_and_arguments_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dspy-agent.toml").write_text(
        textwrap.dedent(
            """
            project = "from-file"
            [services.redis]
            ports = ["16379:6379"]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    infra = AgentInfra.start()
    assert infra.project == "from-file"
    monkeypatch.setenv("DSPY_AGENT_PROJECT", "from-env")
    assert AgentInfra.start().project == "from-env"
    assert AgentInfra.start(project="from-arg").project == "from-arg"

    other = tmp_path / "other.toml"
    other.write_text('project = "named-by-env"\n')
    monkeypatch.delenv("DSPY_AGENT_PROJECT")
    monkeypatch.setenv("DSPY_AGENT_CONFIG", str(other))
    assert AgentInfra.start().project == "named-by-env"

    other.write_text("[services.redis]\nports = [\n")
    with pytest.raises(ConfigError, match=r"other\.toml"):
        AgentInfra.start()


def test_not_started_infra_says_so() -> None:
    infra = AgentInfra.start(services=[])
    with pytest.raises(InfraError, match="not running"):
        _ = infra.services
    assert "not running" in repr(infra)


def test_ctrl_c_while_starting_removes_everything(project: str, tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from dspy_agent_infra import AgentInfra

            async def main():
                services = {{
                    "cache": {{"image": "dspy-agent-test/redis:latest", "pull": "never",
                               "ports": ["0:6379"], "healthcheck": {{"type": "redis"}}}},
                    "slow": {{"image": "dspy-agent-test/busybox:latest", "pull": "never",
                              "env": {{"PORTS": "8000", "START_DELAY": "60"}}, "ports": ["0:8000"],
                              "healthcheck": {{"type": "http", "start_period": "90s"}},
                              "depends_on": ["cache"]}},
                }}
                async with AgentInfra.start(project={project!r}, services=list(services),
                                            config={{"services": services}}):
                    pass

            try:
                asyncio.run(main())
            except KeyboardInterrupt:
                print("interrupted")
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(containers(project)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(containers(project)) == 2
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        dump = stacks(proc.pid)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no exit within 60 s of SIGINT; its stacks:\n{dump}\n{err}") from None
    assert "interrupted" in out, err
    assert containers(project) == []


def test_every_exception_class_the_core_raises_exists() -> None:
    """The core names the classes of `dspy_agent_infra.errors` as Rust types
    (`import_exception!`); each must exist there and be an InfraError."""
    import re

    import dspy_agent_infra.errors as errors

    source = (Path(__file__).resolve().parents[2] / "src/python/errors.rs").read_text()
    names = re.findall(r"import_exception!\(dspy_agent_infra\.errors, (\w+)\)", source)
    assert len(names) >= 10, names
    for name in names:
        cls = getattr(errors, name, None)
        assert isinstance(cls, type) and issubclass(cls, InfraError), name
