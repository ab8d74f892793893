"""Shared fixtures: a real Docker Engine, local images built from host binaries, and a unique
project per test so that leaks are counted exactly."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Generator, Iterator
from types import ModuleType
from typing import Any

import pytest

from helpers import (
    BUSYBOX,
    HEALTH_PROTO,
    REDIS,
    REFLECTION_PROTO,
    ROOT,
    containers,
    docker,
    generate_stubs,
    postgres_schema,
)


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    """grpcio stubs generated from proto/ (and the standard health and reflection services)
    at test time: a client nobody here wrote. Generated once; module names are global."""
    return generate_stubs(
        tmp_path_factory.mktemp("stubs"),
        {
            "orchestrator_v1": (ROOT / "proto" / "orchestrator.v1.proto").read_text(),
            "env_manager_v1": (ROOT / "proto" / "env_manager.v1.proto").read_text(),
            "health": HEALTH_PROTO,
            "reflection": REFLECTION_PROTO,
        },
    )


@pytest.fixture(scope="session", autouse=True)
def images() -> None:
    try:
        docker("info")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.exit(f"no Docker Engine: run scripts/provision.sh first ({e})", returncode=2)
    missing = [i for i in (BUSYBOX, REDIS) if not docker("images", "-q", i).strip()]
    if missing:
        subprocess.run(["bash", str(ROOT / "tests/images/build.sh")], check=True)


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test keeps its task store and other state in a folder of its own, and its
    env-manager and HTTP ports on any free port."""
    monkeypatch.setenv("DSPY_AGENT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.setenv("ENV_MANAGER_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.setenv("DSPY_AGENT_HTTP_ADDR", "127.0.0.1:0")


@pytest.fixture(params=["sqlite", "postgresql"])
def task_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once on each task store: the SQLite file of the test's state folder, and a
    schema of its own on the test PostgreSQL server (through DSPY_AGENT_TASK_STORE)."""
    if request.param == "postgresql":
        monkeypatch.setenv("DSPY_AGENT_TASK_STORE", postgres_schema())
    return str(request.param)


@pytest.fixture
def project(request: pytest.FixtureRequest) -> Iterator[str]:
    """A project name of the test's own. Whatever it leaves running fails the test (after the
    cleanup, so one leak does not spill into the next test); a test that keeps a stack on
    purpose removes it itself."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    leaked = containers(name)
    for cid in leaked:
        subprocess.run(["docker", "rm", "-f", "-v", cid], capture_output=True)
    subprocess.run(["docker", "network", "rm", f"{name}_default"], capture_output=True)
    volumes = docker("volume", "ls", "-q", "--filter", f"name={name}_").split()
    if volumes:
        subprocess.run(["docker", "volume", "rm", *volumes], capture_output=True)
    failed = getattr(request.node, "failed_already", False)
    if leaked and not failed:
        pytest.fail(f"{len(leaked)} container(s) of project {name} left behind: {leaked}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    # Tells the `project` fixture that the test failed already: its leaks are that failure's.
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed_already = True  # type: ignore[attr-defined]
