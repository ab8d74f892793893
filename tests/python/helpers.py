"""Helpers for tests against the real Docker Engine: the docker CLI, and service specs built
on the local test images."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "dspy-agent-test/busybox:latest"
REDIS = "dspy-agent-test/redis:latest"

# The standard health service's definition (grpc/health/v1/health.proto), for a generated
# client of it.
HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
}
"""

# The part of grpc/reflection/v1/reflection.proto a `list` and a `describe` need (same field
# numbers), for a generated reflection client: what grpcurl does without the proto file.
REFLECTION_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_containing_symbol = 4;
    string list_services = 7;
  }
}
message ServerReflectionResponse {
  string valid_host = 1;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ListServiceResponse list_services_response = 6;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
"""


class EngineProxy:
    """A Unix-socket relay to the real Docker Engine that can be cut and restored (the Engine
    going away and coming back, as the core sees it, without disturbing other tests), and that
    can hold back the Engine's event stream while everything else flows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener: socket.socket | None = None
        self.links: list[socket.socket] = []
        self.events_flowing = threading.Event()
        self.events_flowing.set()

    def up(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.path))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        assert self.listener is not None
        self.listener.close()
        for s in self.links:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.links.clear()
        self.path.unlink()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            engine.connect("/var/run/docker.sock")
            self.links += [client, engine]
            # Once a connection asked for the event stream, all it carries back is events.
            streaming = threading.Event()
            threading.Thread(
                target=self._pump, args=(client, engine, streaming, None), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(engine, client, None, streaming), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        saw_events: threading.Event | None,
        streaming: threading.Event | None,
    ) -> None:
        try:
            while data := src.recv(65536):
                if saw_events is not None and b"/events?" in data:
                    saw_events.set()
                if streaming is not None and streaming.is_set():
                    self.events_flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def generate_stubs(out: Path, protos: dict[str, str]) -> dict[str, ModuleType]:
    """Generates grpcio stubs with grpcio-tools for each ``name -> proto text`` and imports
    them: ``NAME_pb2`` and ``NAME_pb2_grpc``. The name must be a Python identifier (protoc
    names the modules after the file)."""
    from grpc_tools import protoc

    for name, text in protos.items():
        (out / f"{name}.proto").write_text(text)
        code = protoc.main(
            [
                "protoc",
                f"-I{out}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"{name}.proto",
            ]
        )
        assert code == 0, f"protoc failed on {name}.proto"
    sys.path.insert(0, str(out))
    try:
        return {
            module: importlib.import_module(module)
            for name in protos
            for module in (f"{name}_pb2", f"{name}_pb2_grpc")
        }
    finally:
        sys.path.remove(str(out))


def credentials(token: str | None) -> grpc.ChannelCredentials:
    """What a client on this machine needs for a stack's port: its token, sent by gRPC's own
    access-token call credentials (`authorization: Bearer TOKEN`) over a local connection, as a
    client in any language would."""
    local = grpc.local_channel_credentials()
    if token is None:
        return local
    return grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(token))


def postgres_url() -> str:
    """The test PostgreSQL server's URL. scripts/test.sh starts one (scripts/postgres.sh) and
    sets DSPY_AGENT_TEST_POSTGRES; without it the PostgreSQL tests fail, never skip."""
    url = os.environ.get("DSPY_AGENT_TEST_POSTGRES")
    if not url:
        raise RuntimeError(
            "DSPY_AGENT_TEST_POSTGRES is not set: run the tests with scripts/test.sh, or "
            "`export DSPY_AGENT_TEST_POSTGRES=$(bash scripts/postgres.sh start /tmp/dspy-pg)`"
        )
    return url


def psql(url: str, sql: str) -> list[list[str]]:
    """Rows of `sql` run by Debian's psql on `url`, as text."""
    out = subprocess.run(
        ["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--csv", "-t", "-c", sql],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return list(csv.reader(io.StringIO(out)))


def postgres_schema() -> str:
    """A schema of its own in the test database, for one test's queue: the URL that uses it."""
    url = postgres_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    psql(url, f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def stacks(pid: int) -> str:
    """The Python and native stacks of every thread of a live process (py-spy), for the
    failure output of a test whose process hung."""
    spy = Path(sys.executable).parent / "py-spy"
    try:
        dump = subprocess.run(
            [str(spy), "dump", "--native", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(no stacks of {pid}: {e})"
    return dump.stdout + dump.stderr


@contextlib.asynccontextmanager
async def port_stubs(
    pb: dict[str, ModuleType], orchestrator_addr: str, env_manager_addr: str
) -> AsyncIterator[tuple[Any, Any]]:
    """grpcio stubs of both ports (orchestrator, env-manager), reached on 127.0.0.1."""
    port = orchestrator_addr.rpartition(":")[2]
    env_port = env_manager_addr.rpartition(":")[2]
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        grpc.aio.insecure_channel(f"127.0.0.1:{env_port}") as env_ch,
    ):
        yield (
            pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch),
            pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(env_ch),
        )


def cli_ping(dspy_agent: str, orchestrator_addr: str) -> None:
    """`dspy-agent tasks submit ping --wait` against `orchestrator_addr`: it must answer pong."""
    cli = subprocess.run(
        [dspy_agent, "tasks", "submit", "ping", "--wait"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ORCHESTRATOR_GRPC_ADDR": orchestrator_addr},
    )
    assert cli.returncode == 0 and "pong" in cli.stdout, cli.stderr
