"""Helpers for tests against the real Docker Engine: the docker CLI, and service specs built
on the local test images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "dspy-agent-test/busybox:latest"
REDIS = "dspy-agent-test/redis:latest"


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def containers(project: str) -> list[str]:
    """Ids of every container (running or not) labelled with the project."""
    out = docker("ps", "-aq", "--no-trunc", "--filter", f"label=dspy-agent.project={project}")
    return out.split()


def inspect(container_id: str) -> dict[str, Any]:
    result: list[dict[str, Any]] = json.loads(docker("inspect", container_id))
    return result[0]


def http_service(**extra: Any) -> dict[str, Any]:
    """A busybox HTTP service on container port 8000, published on any free host port."""
    spec: dict[str, Any] = {
        "image": BUSYBOX,
        "pull": "never",
        "env": {"PORTS": "8000"},
        "ports": ["0:8000"],
        "healthcheck": {"type": "http", "path": "/health", "start_period": "20s"},
        "stop_timeout": "2s",
    }
    env = extra.pop("env", {})
    spec.update(extra)
    spec["env"] = {**spec["env"], **env}
    return spec


def redis_service(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": REDIS,
        "pull": "never",
        "ports": ["0:6379"],
        "healthcheck": {"type": "redis"},
        "stop_timeout": "2s",
    }
    spec.update(extra)
    return spec
