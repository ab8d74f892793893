"""The floor of the start benchmarks: the least work any tool must do to bring this stack up on
this Engine. One network, then one `docker run -d` per service, each issued the moment its own
dependencies answer their probe (independent services at once, no level waits for another), and
host-side probes every 10 ms. It knows the stack in advance and does nothing else. Standard
library only, so that run as a command (`python bench/floor.py PROJECT`) it starts as fast as a
script can.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

BUSYBOX = "dspy-agent-test/busybox:latest"
REDIS = "dspy-agent-test/redis:latest"

# name -> (image, container port, probe kind, dependencies)
STACK: dict[str, tuple[str, int, str, list[str]]] = {
    "redis": (REDIS, 6379, "redis", []),
    "ollama": (BUSYBOX, 11434, "http", []),
    "reddb": (BUSYBOX, 6380, "http", ["redis"]),
    "infermesh": (BUSYBOX, 8000, "http", ["redis"]),
    "model_server": (BUSYBOX, 8001, "http", ["reddb", "infermesh"]),
}


def in_container_check(probe: str, port: int) -> str:
    """The stack's health check as a shell line run inside the container (the Engine's
    HEALTHCHECK, for the peers that rely on it)."""
    if probe == "redis":
        return f"echo PING | nc 127.0.0.1 {port} | grep -q PONG"
    return f"wget -q -O /dev/null http://127.0.0.1:{port}/health"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def probe(kind: str, port: int) -> bool:
    try:
        if kind == "redis":
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(16).startswith(b"+PONG")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool], what: str, limit: float = 60, every: float = 0.01
) -> None:
    """Polls `check` every `every` seconds (10 ms: the floor's probe interval)."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {limit} s")
        time.sleep(every)


def in_dependency_order(bring_up: Callable[[str, Callable[[], None]], int]) -> None:
    """Brings every service up at once, each in a thread: `bring_up(name, dependencies_ready)`
    calls `dependencies_ready()` where it must wait for them and returns the published host
    port, which is then probed every 10 ms. A failure releases every waiter and is raised."""
    healthy = {name: threading.Event() for name in STACK}
    failures: list[BaseException] = []

    def one(name: str) -> None:
        _, _, probe_kind, deps = STACK[name]

        def dependencies_ready() -> None:
            for dep in deps:
                if not healthy[dep].wait(60):
                    raise RuntimeError(f"{dep} never became healthy")

        try:
            host_port = bring_up(name, dependencies_ready)
            wait_until(functools.partial(probe, probe_kind, host_port), name)
            healthy[name].set()
        except BaseException as e:
            failures.append(e)
            # Dependents give up at once instead of waiting for a dependency that failed.
            for event in healthy.values():
                event.set()

    threads = [threading.Thread(target=one, args=(name,)) for name in STACK]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def floor_run(project: str) -> float:
    network = f"{project}_net"
    began = time.perf_counter()
    sh("docker", "network", "create", network)
    ids: list[str] = []

    def bring_up(name: str, dependencies_ready: Callable[[], None]) -> int:
        image, port, _, _ = STACK[name]
        dependencies_ready()
        cid = sh(
            "docker",
            "run",
            "-d",
            "--name",
            f"{project}-{name}",
            "--network",
            network,
            "--network-alias",
            name,
            "-e",
            f"PORTS={port}",
            "-p",
            f"127.0.0.1::{port}",
            "--label",
            f"bench={project}",
            image,
        ).strip()
        ids.append(cid)
        return int(sh("docker", "port", cid, f"{port}/tcp").split(":")[-1])

    try:
        in_dependency_order(bring_up)
        return time.perf_counter() - began
    finally:
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        subprocess.run(["docker", "network", "rm", network], capture_output=True)


class _EngineConnection(http.client.HTTPConnection):
    """HTTP to the Docker Engine's Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self.sock = sock


def engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.removeprefix("unix://")


def api(method: str, path: str, body: Any = None) -> Any:
    """One Engine API call on a connection of its own (calls run in parallel threads)."""
    conn = _EngineConnection(engine_socket())
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {text[:200]!r}")
        return json.loads(text) if text else None
    finally:
        conn.close()


def floor_api_run(project: str, create_first: bool = False) -> float:
    """The floor without a CLI process per operation: the same steps as `floor_run`, each one
    Engine API call over the Unix socket, from this process. With `create_first`, every
    container is created at once up front, and only its start waits for its dependencies."""
    network = f"{project}_net"
    began = time.perf_counter()
    api("POST", "/networks/create", {"Name": network})
    ids: list[str] = []

    def bring_up(name: str, dependencies_ready: Callable[[], None]) -> int:
        image, port, _, _ = STACK[name]
        if not create_first:
            dependencies_ready()
        spec = {
            "Image": image,
            "Env": [f"PORTS={port}"],
            "Labels": {"bench": project},
            "ExposedPorts": {f"{port}/tcp": {}},
            "HostConfig": {
                "NetworkMode": network,
                "PortBindings": {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
            },
            "NetworkingConfig": {"EndpointsConfig": {network: {"Aliases": [name]}}},
        }
        cid = api("POST", f"/containers/create?name={project}-{name}", spec)["Id"]
        ids.append(cid)
        if create_first:
            dependencies_ready()
        api("POST", f"/containers/{cid}/start")
        ports = api("GET", f"/containers/{cid}/json")["NetworkSettings"]["Ports"]
        return int(ports[f"{port}/tcp"][0]["HostPort"])

    try:
        in_dependency_order(bring_up)
        return time.perf_counter() - began
    finally:
        for cid in ids:
            with contextlib.suppress(RuntimeError, OSError):
                api("DELETE", f"/containers/{cid}?force=true")
        with contextlib.suppress(RuntimeError, OSError):
            api("DELETE", f"/networks/{network}")


if __name__ == "__main__":
    floor_run(sys.argv[1])
