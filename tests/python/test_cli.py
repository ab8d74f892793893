"""The `dspy-agent` command as a user types it: real subprocesses, a real daemon, the real
Docker Engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib

from helpers import EngineProxy, containers

# The console script `pip install` puts next to the interpreter.
DSPY_AGENT = str(Path(sys.executable).parent / "dspy-agent")


# `status --json`, in every mode (docs/CLI.md).
STATUS_KEYS = {
    "project", "running", "healthy", "engine_reachable", "engine_error", "owner", "daemon",
    "services", "message",
}  # fmt: skip
SERVICE_KEYS = {
    "name", "image", "phase", "state", "healthy", "container_id", "ports", "url",
    "uptime_seconds", "restart_count", "message", "stand_in", "kept", "replicas",
}  # fmt: skip


def catalog_on_free_ports() -> str:
    """The built-in stack (local stand-in images), published on free host ports."""
    return "\n".join(
        f'[services.{name}]\nports = ["0:{port}"]\npull = "never"\n'
        for name, port in (("redis", 6379), ("reddb", 6380), ("infermesh", 8000))
    )


@pytest.fixture
def workdir(tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.setenv("ENV_MANAGER_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-agent.toml").write_text(catalog_on_free_ports())
    yield tmp_path
    # Safety net: a failing test must not leave its daemon running.
    subprocess.run([DSPY_AGENT, "stop", "--timeout", "1"], capture_output=True, timeout=60)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DSPY_AGENT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of nobody may linger as a zombie until it is reaped.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def daemon_pids(project: str) -> list[int]:
    """Live daemon processes of the project, found by their command line and environment."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"daemon" in cmdline and f"DSPY_AGENT_PROJECT={project}".encode() in environ:
            if pid_alive(int(proc.name)):
                found.append(int(proc.name))
    return found


def state_dir() -> Path:
    return Path(os.environ["DSPY_AGENT_STATE_DIR"])


def test_a_whole_session(workdir: Path, project: str) -> None:
    # A type accepted before anything serves it.
    with (workdir / "dspy-agent.toml").open("a") as config:
        config.write("\n[tasks.types.later]\n")
    started = run("start")
    assert started.returncode == 0, started.stderr
    assert "all 3 services healthy" in started.stdout
    for name in ("redis", "reddb", "infermesh"):
        assert f"{name}" in started.stdout

    status = run("status", "--json")
    assert status.returncode == 0, status.stderr
    report: dict[str, Any] = json.loads(status.stdout)
    assert report["running"] and report["healthy"] and report["project"] == project
    assert set(report) == STATUS_KEYS and report["owner"]["kind"] == "daemon"
    assert all(set(s) == SERVICE_KEYS for s in report["services"])
    services = {s["name"]: s for s in report["services"]}
    assert set(services) == {"redis", "reddb", "infermesh"}
    assert all(s["healthy"] and s["state"] == "running" for s in services.values())
    assert all(s["ports"][0]["host_port"] > 0 for s in services.values())
    assert sorted(s["container_id"] for s in services.values()) == sorted(containers(project))
    daemon_pid = report["daemon"]["pid"]
    assert pid_alive(daemon_pid)
    # The daemon's HTTP port, where the command line says.
    http_addr = report["daemon"]["http_addr"]
    with urllib.request.urlopen(f"http://{http_addr}/healthz", timeout=10) as r:
        assert r.read() == b"ok\n"

    table = run("status")
    assert table.returncode == 0
    header, *rows = [line for line in table.stdout.splitlines() if line.strip()][1:]
    assert header.split() == ["SERVICE", "STATE", "HEALTH", "PORTS", "CONTAINER", "UPTIME"]
    assert f"metrics http://{http_addr}/metrics" in table.stdout
    assert {r.split()[0] for r in rows} == {"redis", "reddb", "infermesh"}

    # The dashboard's address; without the token the page asks for it.
    dashboard = run("dashboard", "--no-browser")
    assert dashboard.returncode == 0, dashboard.stderr
    assert dashboard.stdout.splitlines()[0] == f"http://{http_addr}/"
    assert "dspy-agent token" in dashboard.stdout
    with urllib.request.urlopen(f"http://{http_addr}/", timeout=10) as page:
        assert b'name="token"' in page.read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{http_addr}/api/state", timeout=10)
    assert refused.value.code == 401

    logs = run("logs", "--service", "redis", "--tail", "5")
    assert logs.returncode == 0, logs.stderr
    printed = logs.stdout + logs.stderr
    assert "Ready to accept connections" in printed
    assert len(printed.splitlines()) <= 10  # at most 5 of each stream
    every = run("logs", "--tail", "3")
    assert {line.split(" | ")[0].strip() for line in every.stdout.splitlines()} >= {"reddb"}
    own = run("logs", "--service", "env-manager")
    assert "daemon ready" in own.stdout

    submitted = run("tasks", "submit", "echo", '{"x": 1}', "--id", "cli-1")
    assert submitted.returncode == 0 and submitted.stdout.strip() == "cli-1"
    done = run("tasks", "submit", "ping", "--id", "cli-2", "--wait")
    assert done.returncode == 0 and "pong" in done.stdout
    assert "cli-2: completed (1 attempt)" in done.stdout
    task = run("tasks", "status", "cli-1", "--json")
    assert task.returncode == 0
    info = json.loads(task.stdout)
    assert info["status"] == "completed" and info["result"] == {"x": 1}
    listed = run("tasks", "list", "--json", "--state", "completed")
    assert {t["task_id"] for t in json.loads(listed.stdout)} == {"cli-1", "cli-2"}
    again = run("tasks", "submit", "echo", '{"x": 1}', "--id", "cli-1")
    assert again.returncode == 0 and "already submitted with the same content" in again.stderr
    # Nothing serves "later": the wait says so, and gives up when told.
    pending = run("tasks", "submit", "later", "--id", "cli-3", "--wait", "--wait-timeout", "1s")
    assert pending.returncode == 1, pending
    assert 'nothing serves "later" yet' in pending.stderr
    assert "still PENDING after --wait-timeout 1s" in pending.stderr, pending.stderr
    # The service is named as users type it, too.
    positional = run("logs", "redis", "--tail", "2")
    assert positional.returncode == 0 and "Ready to accept connections" in positional.stdout

    restarted = run("restart", "reddb")
    assert restarted.returncode == 0 and "healthy" in restarted.stdout

    again = run("start")
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert sorted(containers(project)) == sorted(s["container_id"] for s in services.values())

    stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert containers(project) == []
    # Listed in the order they stop: redis, which the others depend on, last.
    order = [line.split()[1] for line in stopped.stdout.splitlines() if line.startswith("stopped ")]
    assert sorted(order) == ["infermesh", "reddb", "redis"] and order[-1] == "redis", order
    assert not pid_alive(daemon_pid) and daemon_pids(project) == []
    assert not (state_dir() / "daemon.pid").exists()

    gone = run("status")
    assert gone.returncode == 3 and "not running" in gone.stderr
    gone_json = run("status", "--json")
    assert gone_json.returncode == 3 and set(json.loads(gone_json.stdout)) == STATUS_KEYS
    assert json.loads(run("status", "--json").stdout)["running"] is False
    nothing = run("stop")
    assert nothing.returncode == 3 and "nothing to stop" in nothing.stderr
    # The last run's log stays readable.
    last = run("logs", "--service", "env-manager", "--tail", "1")
    assert last.returncode == 0 and "stopped" in last.stdout


def test_a_failing_service_fails_start_and_leaves_nothing(workdir: Path, project: str) -> None:
    (workdir / "dspy-agent.toml").write_text(
        catalog_on_free_ports() + '\n[services.reddb.env]\nEXIT_CODE = "7"\n'
    )
    started = run("start")
    assert started.returncode == 1
    assert 'service "reddb" failed to start' in started.stderr
    assert "exiting with code 7" in started.stderr  # its last log lines
    assert containers(project) == []
    assert not (state_dir() / "daemon.pid").exists()
    assert run("status").returncode == 3


def test_a_killed_daemon_is_detected_and_cleaned_up(workdir: Path, project: str) -> None:
    assert run("start", "--services", "redis").returncode == 0
    pid = json.loads(run("status", "--json").stdout)["daemon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)

    status = run("status")
    assert status.returncode == 3
    assert f"pid {pid}, died without cleaning up" in status.stderr
    # Its watchdog removes its containers.
    deadline = time.monotonic() + 15
    while containers(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert containers(project) == []

    restarted = run("start", "--services", "redis")
    assert restarted.returncode == 0, restarted.stderr
    assert "stale pid file" in restarted.stdout
    [new] = containers(project)
    report = json.loads(run("status", "--json").stdout)
    assert report["services"][0]["container_id"] == new
    assert report["daemon"]["pid"] != pid
    assert run("stop").returncode == 0
    assert containers(project) == []


def test_two_starts_at_once_make_one_daemon(workdir: Path, project: str) -> None:
    procs = [
        subprocess.Popen(
            [DSPY_AGENT, "start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = [out for out, _ in outputs]
    assert sum("daemon started" in out for out in said) == 1
    assert sum("already running" in out or "another" in out for out in said) == 1
    assert len(containers(project)) == 3
    pid = json.loads(run("status", "--json").stdout)["daemon"]["pid"]
    assert daemon_pids(project) == [pid]
    assert run("stop").returncode == 0
    assert containers(project) == []


def test_bad_input_gets_clear_errors_and_exit_codes(workdir: Path, project: str) -> None:
    unknown = run("start", "--services", "nope")
    assert unknown.returncode == 2 and 'unknown service "nope"' in unknown.stderr
    assert not (state_dir() / "daemon.pid").exists()

    usage = run("frobnicate")
    assert usage.returncode == 2 and "unrecognized subcommand" in usage.stderr
    assert run("restart", "redis").returncode == 3

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        taken = subprocess.run(
            [DSPY_AGENT, "start"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ENV_MANAGER_GRPC_ADDR": f"127.0.0.1:{busy}"},
        )
    assert taken.returncode == 1
    assert f"cannot serve the env-manager gRPC port on 127.0.0.1:{busy}" in taken.stderr
    assert "ENV_MANAGER_GRPC_ADDR" in taken.stderr
    assert containers(project) == []

    # A service's host port taken by something else: refused before anything is created.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        (workdir / "dspy-agent.toml").write_text(
            catalog_on_free_ports().replace('"0:6379"', f'"{busy}:6379"')
        )
        held = run("start", "--services", "redis")
    assert held.returncode == 1
    assert f'service "redis" cannot publish 127.0.0.1:{busy}' in held.stderr
    assert containers(project) == [] and not (state_dir() / "daemon.pid").exists()
    (workdir / "dspy-agent.toml").write_text(catalog_on_free_ports())

    assert run("start", "--services", "redis").returncode == 0
    assert run("logs", "--service", "nope").returncode == 2
    assert 'unknown service "nope"' in run("restart", "nope").stderr
    no_type = run("tasks", "submit", "no-such-type")
    assert no_type.returncode == 1 and "no-such-type" in no_type.stderr
    assert run("tasks", "status", "missing").returncode == 2
    assert run("tasks", "list", "--state", "sideways").returncode == 2
    assert run("logs", "--since", "soon").returncode == 2


def test_config_commands(workdir: Path) -> None:
    (workdir / "dspy-agent.toml").unlink()
    assert "no config file" in run("config", "path").stdout
    init = run("config", "init")
    assert init.returncode == 0
    assert (workdir / "dspy-agent.toml").read_text().startswith("# dspy-agent.toml")
    assert run("config", "init").returncode == 1  # never overwrites without --force
    assert run("config", "validate").returncode == 0
    assert run("config", "path").stdout.strip() == str(workdir / "dspy-agent.toml")
    # The configuration in effect, as a dspy-agent.toml is written: every service (disabled
    # ones too), the defaults, the task settings; it loads again as it is printed.
    shown = run("config", "show")
    assert shown.returncode == 0, shown.stderr
    effective = tomllib.loads(shown.stdout)
    assert {"redis", "reddb", "infermesh", "ollama", "model_server"} <= set(effective["services"])
    assert effective["services"]["ollama"]["enabled"] is False
    assert effective["http_addr"] and effective["tasks"]["retention"] == "7d"
    assert effective["tasks"]["lease"] == "30s"
    (workdir / "again.toml").write_text(shown.stdout)
    assert run("--config", "again.toml", "config", "validate").returncode == 0
    # Where each setting came from, on request.
    (workdir / "dspy-agent.toml").write_text("[tasks]\nconcurrency = 8\n")
    # (The tests run with DSPY_AGENT_HTTP_ADDR set: conftest.py.)
    origins = run("config", "show", "--origin").stdout
    assert f"concurrency = 8  # {workdir / 'dspy-agent.toml'}" in origins, origins
    assert 'http_addr = "127.0.0.1:0"  # environment' in origins
    assert 'lease = "30s"  # default' in origins
    assert 'image = "redis:7-alpine"  # catalog' in origins

    # Values marked secret are never shown; a secret that env does not set is a mistake.
    (workdir / "dspy-agent.toml").write_text(
        '[services.redis]\nenv = { API_KEY = "sk-very-secret-value" }\nsecret_env = ["API_KEY"]\n'
    )
    secret = run("config", "show")
    assert secret.returncode == 0 and "sk-very-secret-value" not in secret.stdout
    shown_env = tomllib.loads(secret.stdout)["services"]["redis"]["env"]
    assert shown_env["API_KEY"].startswith("(secret")
    (workdir / "dspy-agent.toml").write_text('[services.redis]\nsecret_env = ["NOPE"]\n')
    unknown = run("config", "validate")
    assert unknown.returncode == 2 and "services.redis.secret_env" in unknown.stderr

    (workdir / "dspy-agent.toml").write_text(
        'publish_host_ip = "nowhere"\n'
        "\n"
        "[services.redis]\n"
        'ports = ["lots"]\n'
        "\n"
        "[services.reddb.resources]\n"
        'memory = "plenty"\n'
        "\n"
        "[services.infermesh]\n"
        'depends_on = ["ghost"]\n'
    )
    checked = run("config", "validate")
    assert checked.returncode == 2
    problems = [line for line in checked.stderr.splitlines() if "dspy-agent.toml:" in line]
    where = {line.split(": ")[0].rsplit(":", 1)[1] for line in problems}
    assert len(problems) == 4, checked.stderr
    assert where == {"1", "4", "7", "10"}
    assert "4 problems found" in checked.stderr

    # Unknown keys and bad values together: every one in one run, each at its line.
    (workdir / "dspy-agent.toml").write_text(
        'projekt = "p"\n'
        "[tasks]\n"
        "max_retries = 2\n"
        'retention = "soon"\n'
        "[services.redis]\n"
        'imag = "redis:7"\n'
        'ports = ["lots"]\n'
        "[services.reddb.resources]\n"
        'memroy = "1g"\n'
    )
    several = run("config", "validate")
    assert several.returncode == 2
    assert "6 problems found" in several.stderr, several.stderr
    for key, line in (("projekt", 1), ("max_retries", 3), ("imag", 6), ("memroy", 9)):
        assert f"line {line}" in several.stderr and key in several.stderr, (key, several.stderr)
    assert "tasks.retention" in several.stderr and "services.redis.ports" in several.stderr

    (workdir / "dspy-agent.toml").write_text("[services.redis\n")
    broken = run("config", "validate")
    assert broken.returncode == 2 and "dspy-agent.toml:1:" in broken.stderr


def test_module_entry_point_and_version() -> None:
    via_module = subprocess.run(
        [sys.executable, "-m", "dspy_agent_infra", "version"], capture_output=True, text=True
    )
    import dspy_agent_infra

    assert via_module.returncode == 0
    assert via_module.stdout.strip() == f"dspy-agent {dspy_agent_infra.__version__}"
    assert run("--help").stdout.startswith("Runs a DSPy agent's service stack")


def test_the_engine_going_away_and_coming_back(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = EngineProxy(workdir / "engine.sock")
    proxy.up()
    monkeypatch.setenv("ENV_MANAGER_DOCKER_HOST", f"unix://{proxy.path}")
    assert run("start", "--services", "redis").returncode == 0

    proxy.down()
    away = run("status")
    assert away.returncode == 1
    assert "cannot reach the Docker Engine" in away.stdout
    report = json.loads(run("status", "--json").stdout)
    assert report["engine_reachable"] is False and report["engine_error"]
    # The last known state is still shown.
    assert [s["name"] for s in report["services"]] == ["redis"]

    proxy.up()
    back = run("status", "--json")
    assert back.returncode == 0, back.stdout
    assert json.loads(back.stdout)["services"][0]["healthy"]
    assert run("stop").returncode == 0


async def test_every_command_works_on_an_agents_own_stack(
    project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stack per project: the command line uses the stack a Python agent runs in its own
    process as it uses a daemon's, and says who owns it where only the owner may act."""
    import asyncio

    from dspy_agent_infra import AgentInfra
    from helpers import http_service

    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-agent.toml").write_text(catalog_on_free_ports())

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # The agent's event loop goes on while the command runs.
        return await asyncio.to_thread(run, *args)

    config = {"services": {"web": http_service()}}
    async with AgentInfra.start(project=project, services=["web"], config=config) as infra:
        pid = os.getpid()
        status = await cli("status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["owner"]["kind"] == "agent" and report["owner"]["pid"] == pid
        assert report["owner"]["orchestrator_addr"] == infra.orchestrator_addr
        assert report["daemon"] is None and set(report) == STATUS_KEYS
        assert [s["name"] for s in report["services"]] == ["web"]
        assert set(report["services"][0]) == SERVICE_KEYS
        table = await cli("status")
        assert f"run by process {pid}" in table.stdout, table.stdout

        logs = await cli("logs", "web", "--tail", "5")
        assert logs.returncode == 0 and "serve: listening" in logs.stdout, logs
        restarted = await cli("restart", "web")
        assert restarted.returncode == 0 and "restarted web" in restarted.stdout, restarted
        dashboard = await cli("dashboard", "--no-browser")
        assert dashboard.stdout.splitlines()[0] == f"http://{infra.http_addr}/", dashboard
        ping = await cli("tasks", "submit", "ping", "--wait")
        assert ping.returncode == 0 and "pong" in ping.stdout, ping

        # `start` uses it as it is, and names what it asked for and the stack lacks.
        started = await cli("start", "--services", "redis")
        assert started.returncode == 0, started.stderr
        assert f"runs in process {pid}" in started.stdout
        assert "the running stack has no redis (it runs web)" in started.stderr, started.stderr
        assert not (state_dir() / "daemon.pid").exists(), "no daemon was started beside it"
        # Stopping it is the agent's.
        stop = await cli("stop")
        assert stop.returncode == 1 and f"run by process {pid}" in stop.stderr, stop
        assert infra.service("web").status == "healthy"
    gone = await cli("status")
    assert gone.returncode == 3, gone
