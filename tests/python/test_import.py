"""`dspy-agent import`: real-world compose files (tests/compose, each in the shape its project
publishes) become configs that validate, name what they cannot carry, and one of them starts
healthy on local images; bad compose files are refused with the key at fault, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomllib
from test_cli import DSPY_AGENT

from dspy_agent_infra import AgentInfra
from helpers import BUSYBOX, REDIS, ROOT, containers

COMPOSE = ROOT / "tests" / "compose"


def dspy_agent(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DSPY_AGENT, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


def imported(tmp_path: Path, name: str, *args: str, dotenv: str = "") -> tuple[dict[str, Any], str]:
    """Copies tests/compose/NAME to a folder of the test's own, imports it there and checks
    the result with `config validate`: (the config, the report on stderr)."""
    folder = tmp_path / name
    shutil.copytree(COMPOSE / name, folder)
    if dotenv:
        (folder / ".env").write_text(dotenv)
    compose = next(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))
    run = dspy_agent(folder, "import", compose.name, *args)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith(f"wrote {folder / 'dspy-agent.toml'}"), run.stderr
    valid = dspy_agent(folder, "config", "validate")
    assert valid.returncode == 0, valid.stdout + valid.stderr
    return tomllib.loads((folder / "dspy-agent.toml").read_text()), run.stderr


def test_airflow(tmp_path: Path) -> None:
    # The Airflow docs have users write AIRFLOW_UID into .env first; without it the file's
    # ${AIRFLOW_UID} has no value, and the import says so.
    folder = tmp_path / "bare"
    shutil.copytree(COMPOSE / "airflow", folder)
    refused = dspy_agent(folder, "import", "docker-compose.yaml")
    assert refused.returncode == 2
    assert "AIRFLOW_UID" in refused.stderr and "services.airflow-init.command" in refused.stderr
    assert not (folder / "dspy-agent.toml").exists()

    config, report = imported(tmp_path, "airflow", dotenv="AIRFLOW_UID=50000\n")
    assert config["project"] == "airflow" and config["catalog"] is False
    services = config["services"]
    assert set(services) == {
        "postgres", "redis", "airflow-webserver", "airflow-scheduler", "airflow-worker",
        "airflow-triggerer", "airflow-init", "airflow-cli", "flower",
    }  # fmt: skip
    web = services["airflow-webserver"]
    # The anchors and merge keys (<<: *airflow-common) are applied.
    assert web["image"] == "apache/airflow:2.9.2" and web["user"] == "50000:0"
    assert web["env"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert web["depends_on"] == {
        "redis": "healthy",
        "postgres": "healthy",
        "airflow-init": "completed",
    }
    # curl of its own published port: the host-side probe.
    assert web["healthcheck"] == {
        "type": "http", "port": 8080, "path": "/health", "interval": "30s",
        "timeout": "10s", "retries": 5, "start_period": "30s",
    }  # fmt: skip
    # curl of a port it does not publish: run inside, as Compose does.
    assert services["airflow-scheduler"]["healthcheck"]["type"] == "exec"
    assert services["airflow-scheduler"]["healthcheck"]["command"][0] == "curl"
    worker = services["airflow-worker"]
    assert worker["command"] == ["celery", "worker"]
    assert worker["env"]["DUMB_INIT_SETSID"] == "0" and "AIRFLOW__CORE__EXECUTOR" in worker["env"]
    # $$ is a literal $, left for the container's shell.
    assert "${HOSTNAME}" in worker["healthcheck"]["command"][2]
    init = services["airflow-init"]
    assert init["entrypoint"] == ["/bin/bash"] and init["user"] == "0:0"
    assert 'chown -R "50000:0"' in init["command"][1]
    assert init["volumes"] == [".:/sources"]
    assert "_AIRFLOW_WWW_USER_PASSWORD" in init["secret_env"]
    assert services["postgres"]["volumes"] == ["postgres-db-volume:/var/lib/postgresql/data"]
    assert services["postgres"]["healthcheck"]["command"] == ["pg_isready", "-U", "airflow"]
    assert services["redis"]["restart"] == "always"
    # Profiles: off unless asked for.
    assert services["flower"]["enabled"] is False and services["airflow-cli"]["enabled"] is False
    assert "services.flower.profiles" in report and "services.redis.expose" in report
    with_flower, _ = imported(
        tmp_path / "flower", "airflow", "--profile", "flower", dotenv="AIRFLOW_UID=1000\n"
    )
    assert "enabled" not in with_flower["services"]["flower"]


def test_langfuse(tmp_path: Path) -> None:
    config, report = imported(tmp_path, "langfuse")
    services = config["services"]
    assert set(services) == {
        "langfuse-worker", "langfuse-web", "clickhouse", "minio", "redis", "postgres",
    }  # fmt: skip
    web = services["langfuse-web"]
    assert web["ports"] == ["3000:3000"]
    # The worker's environment, merged in with <<, and the web's own keys.
    assert web["env"]["CLICKHOUSE_URL"] == "http://clickhouse:8123"
    assert web["env"]["NEXTAUTH_URL"] == "http://localhost:3000"
    assert {"NEXTAUTH_SECRET", "CLICKHOUSE_PASSWORD", "REDIS_AUTH"} <= set(web["secret_env"])
    assert set(web["depends_on"].values()) == {"healthy"}
    clickhouse = services["clickhouse"]
    assert clickhouse["user"] == "101:101"
    assert clickhouse["ports"] == ["127.0.0.1:8123:8123", "127.0.0.1:9000:9000"]
    # `wget --spider http://localhost:8123/ping || exit 1` of a published port.
    assert clickhouse["healthcheck"]["type"] == "http"
    assert (clickhouse["healthcheck"]["port"], clickhouse["healthcheck"]["path"]) == (8123, "/ping")
    minio = services["minio"]
    assert minio["entrypoint"] == ["sh"]
    assert minio["command"][0] == "-c" and "minio server" in minio["command"][1]
    assert minio["healthcheck"]["command"] == ["mc", "ready", "local"]
    # A Redis with a password answers a plain PING with an error: its command stays.
    redis = services["redis"]
    assert redis["command"] == ["--requirepass", "myredissecret"]
    assert redis["healthcheck"]["type"] == "exec"
    assert services["postgres"]["image"] == "docker.io/postgres:latest"
    assert services["postgres"]["healthcheck"]["command"] == ["sh", "-c", "pg_isready -U postgres"]
    # It holds passwords: readable by its owner only.
    assert (tmp_path / "langfuse" / "dspy-agent.toml").stat().st_mode & 0o777 == 0o600
    assert "readable by you only" in report


async def test_the_voting_app_starts_healthy_on_local_images(tmp_path: Path, project: str) -> None:
    config, report = imported(tmp_path, "voting-app", "--services", "vote")
    services = config["services"]
    # The vote service and what it depends on.
    assert set(services) == {"vote", "redis"}
    assert "services.vote.build" in report and "services.vote.networks" in report
    vote, redis = services["vote"], services["redis"]
    assert vote["image"] == "voting-app-vote"
    assert vote["healthcheck"]["type"] == "http" and vote["ports"] == ["8080:80"]
    assert redis["healthcheck"]["command"] == ["sh", "-c", "/healthchecks/redis.sh"]
    # The images are built from source by Compose: local ones take their place. Everything else
    # (ports, probes, the health script in its bind mount, the order) is the import's.
    images = {
        "services": {
            "vote": {"image": BUSYBOX, "env": {"PORTS": "80"}},
            "redis": {"image": REDIS},
        }
    }
    folder = tmp_path / "voting-app"
    async with AgentInfra.start(
        config_file=folder / "dspy-agent.toml", project=project, config=images
    ) as infra:
        assert list(infra.services) == ["redis", "vote"]
        assert {n: s.status for n, s in infra.services.items()} == {
            "redis": "healthy",
            "vote": "healthy",
        }
        assert infra.service("vote").ports == {80: 8080}
    assert containers(project) == []


@pytest.mark.parametrize(
    ("compose", "says"),
    [
        ("services:\n  web: [unclosed\n", "line 2"),
        ("services:\n  web:\n    image: nginx\n    imagee: typo\n", "services.web.imagee"),
        ("servics:\n  web:\n    image: nginx\n", "servics"),
        (
            "services:\n  a:\n    image: x\n    depends_on: [b]\n"
            "  b:\n    image: x\n    depends_on: [a]\n",
            "cycle",
        ),
        ("services:\n  web:\n    image: nginx:${TAG}\n", "${TAG} has no value"),
        (
            "services:\n  web:\n    image: nginx:${TAG:?set TAG to a version}\n",
            "set TAG to a version",
        ),
        ("services:\n  web:\n    image: nginx\n    depends_on: [db]\n", "db"),
        ("services:\n  web:\n    image: nginx\n    ports: ['80:80:80:80']\n", "services.web.ports"),
        ("services:\n  web:\n    image: nginx\n    env_file: missing.env\n", "missing.env"),
    ],
)
def test_a_bad_compose_file_is_refused_and_nothing_is_written(
    tmp_path: Path, compose: str, says: str
) -> None:
    (tmp_path / "compose.yaml").write_text(compose)
    env = {k: v for k, v in os.environ.items() if k != "TAG"}
    run = dspy_agent(tmp_path, "import", "compose.yaml", env=env)
    assert run.returncode == 2, run.stderr
    assert says in run.stderr, run.stderr
    assert not (tmp_path / "dspy-agent.toml").exists()


def test_an_existing_config_is_kept_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text("services:\n  web:\n    image: nginx\n")
    (tmp_path / "dspy-agent.toml").write_text("# mine\n")
    kept = dspy_agent(tmp_path, "import", "compose.yaml")
    assert kept.returncode == 1 and "--force" in kept.stderr
    assert (tmp_path / "dspy-agent.toml").read_text() == "# mine\n"
    printed = dspy_agent(tmp_path, "import", "compose.yaml", "-o", "-")
    assert printed.returncode == 0 and tomllib.loads(printed.stdout)["services"]["web"] == {
        "image": "nginx"
    }
    forced = dspy_agent(tmp_path, "import", "compose.yaml", "--force")
    assert forced.returncode == 0
    assert "nginx" in (tmp_path / "dspy-agent.toml").read_text()
