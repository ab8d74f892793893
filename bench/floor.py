"""The floor of the start benchmarks: plain `docker run -d` per dependency level, in parallel
within a level, with host-side probes between levels. It knows the stack in advance and does
nothing else: the least any tool must spend on this Engine. Standard library only, so that run
as a command (`python bench/floor.py PROJECT`) it starts as fast as a script can.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
LEVELS = [["redis", "ollama"], ["reddb", "infermesh"], ["model_server"]]


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


def wait_until(check: Callable[[], bool], what: str, limit: float = 60) -> None:
    delay, deadline = 0.005, time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {limit} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def floor_run(project: str) -> float:
    network = f"{project}_net"
    began = time.perf_counter()
    sh("docker", "network", "create", network)
    ids: list[str] = []
    try:
        for level in LEVELS:

            def run(name: str) -> tuple[str, str, int]:
                image, port, probe_kind, _ = STACK[name]
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
                host_port = int(sh("docker", "port", cid, f"{port}/tcp").split(":")[-1])
                return cid, probe_kind, host_port

            with ThreadPoolExecutor(len(level)) as pool:
                started = list(pool.map(run, level))
            for cid, probe_kind, host_port in started:
                ids.append(cid)
                wait_until(functools.partial(probe, probe_kind, host_port), cid)
        return time.perf_counter() - began
    finally:
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        subprocess.run(["docker", "network", "rm", network], capture_output=True)


if __name__ == "__main__":
    floor_run(sys.argv[1])
