"""`dspy-agent export kubernetes`: the manifests of the built-in stack and of imported
real-world compose files validate against the Kubernetes OpenAPI schemas (offline, with the
`kubernetes-validate` package), and carry what the services say."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from test_cli import DSPY_AGENT
from test_import import COMPOSE

KUBERNETES = "1.33.0"


def export(folder: Path, *args: str) -> tuple[Path, str]:
    out = folder / "k8s"
    run = subprocess.run(
        [DSPY_AGENT, "export", "kubernetes", "-o", str(out), *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return out, run.stderr


def validate(out: Path) -> None:
    files = sorted(str(p) for p in out.glob("*.yaml"))
    assert files
    check = subprocess.run(
        ["kubernetes-validate", "--strict", "-k", KUBERNETES, *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "did not validate" not in check.stdout


def kinds(path: Path) -> list[str]:
    return [
        line.removeprefix("kind: ")
        for line in path.read_text().splitlines()
        if line.startswith("kind: ")
    ]


def test_the_built_in_stack(tmp_path: Path) -> None:
    out, report = export(tmp_path, "--namespace", "agents")
    validate(out)
    assert sorted(p.name for p in out.iterdir()) == ["infermesh.yaml", "reddb.yaml", "redis.yaml"]
    assert kinds(out / "redis.yaml") == ["Service", "Deployment"]
    infermesh = (out / "infermesh.yaml").read_text()
    # It waits for Redis, and is probed as its health check says.
    assert "wait-for-redis" in infermesh and "nc -z redis 6379" in infermesh
    assert "path: /health" in infermesh and "namespace: agents" in infermesh
    assert "port-forward" in report


def test_imported_compose_files_export_and_validate(tmp_path: Path) -> None:
    # Every compose file of the tests, each with what its docs have users write into .env.
    dotenvs = {"airflow": "AIRFLOW_UID=50000\n"}
    names = sorted(p.name for p in COMPOSE.iterdir() if p.is_dir())
    assert {"airflow", "langfuse", "voting-app", "agent-stack"} <= set(names)
    for name in names:
        folder = tmp_path / name
        shutil.copytree(COMPOSE / name, folder)
        if name in dotenvs:
            (folder / ".env").write_text(dotenvs[name])
        compose = next(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))
        imported = subprocess.run(
            [DSPY_AGENT, "import", compose.name],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert imported.returncode == 0, imported.stderr
        out, _ = export(folder)
        validate(out)
    langfuse = tmp_path / "langfuse" / "k8s"
    # Named volumes keep their data: StatefulSets with a claim per volume.
    assert kinds(langfuse / "postgres.yaml") == ["ConfigMap", "Secret", "Service", "StatefulSet"]
    assert "langfuse-postgres-data" in (langfuse / "postgres.yaml").read_text()
    # Secrets are readable by the owner only.
    assert (langfuse / "postgres.yaml").stat().st_mode & 0o777 == 0o600
    web = (langfuse / "langfuse-web.yaml").read_text()
    for dependency in ("postgres", "redis", "clickhouse", "minio"):
        assert f"wait-for-{dependency}" in web
    airflow = tmp_path / "airflow" / "k8s"
    assert "runAsUser: 50000" in (airflow / "airflow-webserver.yaml").read_text()
    # Words YAML 1.1 reads as booleans, octal numbers or dates stay strings (quoted), and a
    # command continued over lines splits as a shell would.
    agent = tmp_path / "agent-stack" / "k8s"
    redis = (agent / "redis.yaml").read_text()
    assert "- --appendonly\n        - 'no'\n" in redis, redis
    assert "- ''\n" in redis
    server = (agent / "agent.yaml").read_text()
    assert "VERBOSE: 'on'" in server and "RETRIES: '0777'" in server, server
    assert "STARTED: '2024-01-02'" in server
    assert "- python\n        - -m\n        - agent.serve\n        - --workspace\n" in server
