"""Start-time benchmark: dspy_agent_infra against docker-compose and the floor, in one run.

The stack has five services and a three-deep dependency chain, on the local test images
(tests/images/build.sh), each with a real protocol check:

    redis, ollama                 (level 1)
    reddb, infermesh  -> redis    (level 2)
    model_server      -> reddb, infermesh (level 3)

Measured, each as the median of --runs runs:
  cold      AgentInfra.start() entered, every service healthy, from no containers
  warm      the same with the containers already running (keep_running=True before): attach
  compose   `docker-compose up -d` (Debian's package) with equivalent in-container health checks
            and `condition: service_healthy`, until every container reports healthy; at a 100 ms
            health interval (its best: the Engine accepts intervals down to milliseconds) and at
            1 s (a common setting)
  floor     `docker run -d` per service the moment its own dependencies answer, host-side probes
            every 10 ms (bench/floor.py); the same steps as Engine API calls from this process,
            without a CLI process per operation; and those calls with every container created
            up front, only its start waiting for its dependencies: the least any tool must spend

Usage: python bench/startup.py [--runs 5] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from floor import STACK, floor_api_run, floor_run, in_container_check, sh, wait_until
from report import write_section

from dspy_agent_infra import AgentInfra

ROOT = Path(__file__).resolve().parents[1]


def ours_config() -> dict[str, Any]:
    services: dict[str, Any] = {}
    for name, (image, port, probe, deps) in STACK.items():
        services[name] = {
            "image": image,
            "pull": "never",
            "ports": [f"0:{port}"],
            "env": {"PORTS": str(port)},
            "depends_on": deps,
            "healthcheck": {"type": probe, "start_period": "60s"},
            "stop_timeout": "5s",
        }
    return {"services": services}


async def ours_cold(project: str) -> float:
    config = ours_config()
    began = time.perf_counter()
    async with AgentInfra.start(project=project, services=list(STACK), config=config):
        elapsed = time.perf_counter() - began
    return elapsed


async def ours_warm(project: str, runs: int) -> list[float]:
    config = ours_config()
    async with AgentInfra.start(
        project=project, services=list(STACK), config=config, keep_running=True
    ):
        pass
    times = []
    for i in range(runs):
        last = i == runs - 1
        began = time.perf_counter()
        async with AgentInfra.start(
            project=project, services=list(STACK), config=config, keep_running=not last
        ) as infra:
            times.append(time.perf_counter() - began)
            assert all(s.reused for s in infra.services.values()), "warm start recreated"
    return times


def compose_file(interval: str) -> str:
    lines = ["version: '2.4'", "services:"]
    for name, (image, port, probe_kind, deps) in STACK.items():
        test = in_container_check(probe_kind, port)
        lines += [
            f"  {name}:",
            f"    image: {image}",
            f"    environment: {{PORTS: '{port}'}}",
            f"    ports: ['127.0.0.1::{port}']",
            "    stop_grace_period: 5s",
            "    healthcheck:",
            f"      test: ['CMD', 'sh', '-c', '{test}']",
            f"      interval: {interval}",
            "      timeout: 1s",
            "      retries: 600",
        ]
        if deps:
            lines.append("    depends_on:")
            for d in deps:
                lines += [f"      {d}:", "        condition: service_healthy"]
    return "\n".join(lines) + "\n"


def compose_up(project: str, workdir: Path) -> tuple[float, list[str]]:
    """`docker-compose up -d` until every container reports healthy: the seconds it took, and
    the docker-compose command line of the project (for `ps`, `down`)."""
    base = ["docker-compose", "-p", project, "-f", str(workdir / "docker-compose.yml")]
    began = time.perf_counter()
    sh(*base, "up", "-d")

    def all_healthy() -> bool:
        label = f"label=com.docker.compose.project={project}"
        ids = sh("docker", "ps", "-q", "--filter", label)
        states = json.loads(sh("docker", "inspect", *ids.split())) if ids.strip() else []
        return len(states) == len(STACK) and all(
            s["State"].get("Health", {}).get("Status") == "healthy" for s in states
        )

    try:
        # Every 50 ms: each check costs two docker processes, which a 2-core Engine feels.
        wait_until(all_healthy, "compose stack", limit=120, every=0.05)
    except BaseException:
        subprocess.run([*base, "down", "-v", "-t", "5"], capture_output=True)
        raise
    return time.perf_counter() - began, base


def compose_run(project: str, workdir: Path) -> float:
    elapsed, base = compose_up(project, workdir)

    subprocess.run([*base, "down", "-v", "-t", "5"], capture_output=True)
    return elapsed


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    intervals = ("100ms", "1s")
    results: dict[str, list[float]] = {
        "cold": [],
        "warm": [],
        "floor": [],
        "floor api": [],
        "floor api, created first": [],
    }
    results.update({f"compose {i}": [] for i in intervals})
    have_compose = shutil.which("docker-compose") is not None
    with tempfile.TemporaryDirectory() as tmp:
        workdirs = {i: Path(tmp) / i for i in intervals}
        for interval, workdir in workdirs.items():
            workdir.mkdir()
            (workdir / "docker-compose.yml").write_text(compose_file(interval))
        # Interleaved, the first contender rotating, so that drift in the Engine's speed and
        # the order within a round fall on every contender alike.
        contenders: list[tuple[str, Any]] = [
            ("cold", lambda i: asyncio.run(ours_cold(f"bench-{tag}-c{i}"))),
            ("floor", lambda i: floor_run(f"bench-{tag}-f{i}")),
            ("floor api", lambda i: floor_api_run(f"bench-{tag}-a{i}")),
            (
                "floor api, created first",
                lambda i: floor_api_run(f"bench-{tag}-p{i}", create_first=True),
            ),
        ]
        if have_compose:
            for interval, workdir in workdirs.items():
                contenders.append(
                    (
                        f"compose {interval}",
                        lambda i, w=workdir, iv=interval: compose_run(
                            f"bench{tag}k{iv.replace('ms', 'm')}{i}", w
                        ),
                    )
                )
        for i in range(args.runs):
            for name, run in contenders[i % len(contenders) :] + contenders[: i % len(contenders)]:
                results[name].append(run(i))
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
        results["warm"] = asyncio.run(ours_warm(f"bench-{tag}-w", args.runs))

    cold = median_ms(results["cold"])
    labels = [
        ("warm", "dspy_agent_infra, warm attach"),
        ("floor", "floor: docker run per service as its dependencies answer, 10 ms probes"),
        ("floor api", "floor: the same as Engine API calls from one process"),
        ("floor api, created first", "floor: Engine API calls, every container created up front"),
    ]
    if have_compose:
        compose_version = sh("docker-compose", "version", "--short").strip()
        labels += [
            (f"compose {i}", f"docker-compose {compose_version} (health interval {i})")
            for i in intervals
        ]
    rows = [("dspy_agent_infra, cold start", cold, "1.00")]
    for key, label in labels:
        ms = median_ms(results[key])
        rows.append((label, ms, f"{ms / cold:.3f}" if key == "warm" else f"{ms / cold:.2f}"))
    engine = sh("docker", "version", "--format", "{{.Server.Version}}").strip()
    table = "\n".join(
        ["| contender | median ms | ratio to our cold start |", "| --- | ---: | ---: |"]
        + [f"| {name} | {ms:.0f} | {ratio} |" for name, ms, ratio in rows]
    )
    report = (
        textwrap.dedent(
            f"""\
        ## Start to all-healthy: 5 services, 3-deep dependency chain

        `python bench/startup.py --runs {args.runs}` on {platform.machine()}, {_cpus()} CPUs,
        Docker Engine {engine}, median of {args.runs} runs each, contenders interleaved.
        Stack: redis and ollama; reddb and infermesh after redis; model_server after both
        (local images from `tests/images/build.sh`; Redis PING and HTTP `/health` checks).

        """
        )
        + table
        + "\n"
    )
    print(report)
    if args.write:
        least = min(
            median_ms(results[k]) for k in ("floor", "floor api", "floor api, created first")
        )
        write_section(args.write, "startup", report + explanation(cold, least))


def _cpus() -> int:
    return os.cpu_count() or 0


def explanation(cold: float, floor: float) -> str:
    """What the contenders do, and what this run says of ours against the floor."""
    if cold <= floor:
        verdict = (
            f"In this run our cold start took {cold / floor:.2f} times the lower floor's time."
        )
    else:
        verdict = (
            f"In this run our cold start took {cold / floor:.2f} times the lower floor's time: "
            f"{cold - floor:.0f} ms above the least work."
        )
    return textwrap.dedent(
        f"""
        What the contenders do: *cold start* is `AgentInfra.start()` from no containers: it
        opens the task store while it connects to the Engine, creates the network while it
        binds both gRPC ports and starts its watchdog, creates every container at once, starts
        each service the moment its own dependencies are healthy, and
        probes from the host with a backoff starting at 5 ms. *Warm attach* finds the running
        containers by label and config hash and probes them once. *floor* is a script that
        knows the stack in advance and does nothing else: one network, a `docker run -d` per
        service as soon as its dependencies answer, probes every 10 ms; its second form makes
        the same calls to the Engine API from one process, and its third creates every
        container at once up front, so that only starts and probes wait for dependencies (what
        the cold start does too). *docker-compose* relies
        on the Engine's in-container HEALTHCHECK, whose interval paces every level of the chain.
        {verdict}
        """
    )


if __name__ == "__main__":
    main()
