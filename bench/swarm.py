"""Swarm benchmark: the five-service stack of bench/startup.py on a three-node swarm
(scripts/swarm_lab.sh), dspy_agent_infra's swarm backend against `docker stack deploy`, in one run.

Measured, each the median of --runs runs, contenders interleaved:
  start       from no service to every replica running and healthy: ours with `backend =
              "swarm"` (dependency order, host-side probes of every replica); `docker stack
              deploy` of the equivalent compose file (Swarm ignores `depends_on`; in-container
              health checks at a 100 ms and a 1 s interval), until `docker service ls` shows
              every service at its replicas (a task with a health check runs only once healthy)
  node loss   a two-replica service on the two workers, one worker's Engine SIGKILLed, until
              the service is whole and healthy again on the other: ours (until the core reports
              it healthy again) and the stack's (until Swarm runs both replicas again)

Usage: python bench/swarm.py [--runs 3] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from floor import STACK, in_container_check, wait_until
from report import write_section

from dspy_agent_infra import AgentInfra

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "scripts" / "swarm_lab.sh"


def lab_up() -> str:
    out = subprocess.run(
        ["bash", str(LAB), "up"], check=True, capture_output=True, text=True
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return env["DSPY_AGENT_SWARM_MANAGER"]


def docker(manager: str, *args: str) -> str:
    return subprocess.run(
        ["docker", "-H", manager, *args], check=True, capture_output=True, text=True
    ).stdout


def ours_config(services: dict[str, Any] | None = None) -> dict[str, Any]:
    if services is None:
        services = {}
        for name, (image, port, probe, deps) in STACK.items():
            services[name] = {
                "image": image,
                "pull": "never",
                "ports": [f"0:{port}"],
                "env": {"PORTS": str(port)},
                "depends_on": deps,
                "healthcheck": {"type": probe, "port": port, "start_period": "60s"},
                "stop_timeout": "5s",
                "swarm": {"endpoint_mode": "dnsrr", "publish_mode": "host"},
            }
    return {"services": services, "backend": "swarm"}


async def ours_start(manager: str, project: str, ordered: bool = True) -> float:
    config = ours_config()
    if not ordered:
        for spec in config["services"].values():
            spec["depends_on"] = []
    began = time.perf_counter()
    async with AgentInfra.start(
        project=project, services=list(STACK), config=config, docker_host=manager
    ):
        elapsed = time.perf_counter() - began
    return elapsed


def stack_file(interval: str) -> str:
    lines = ["version: '3.8'", "services:"]
    for name, (image, port, probe, _deps) in STACK.items():
        test = in_container_check(probe, port)
        lines += [
            f"  {name}:",
            f"    image: {image}",
            f"    environment: {{PORTS: '{port}'}}",
            f"    ports: [{{target: {port}, mode: host}}]",
            "    stop_grace_period: 5s",
            "    healthcheck:",
            f"      test: ['CMD', 'sh', '-c', '{test}']",
            f"      interval: {interval}",
            "      timeout: 1s",
            "      retries: 600",
            "    deploy:",
            "      endpoint_mode: dnsrr",
        ]
    return "\n".join(lines) + "\n"


def stack_whole(manager: str, namespace: str, count: int) -> bool:
    out = docker(
        manager,
        "service",
        "ls",
        "--filter",
        f"label=com.docker.stack.namespace={namespace}",
        "--format",
        "{{.Replicas}}",
    ).split()
    return len(out) == count and all(r.split("/")[0] == r.split("/")[1] for r in out)


def stack_down(manager: str, namespace: str) -> None:
    docker(manager, "stack", "rm", namespace)

    def gone() -> bool:
        names = docker(manager, "network", "ls", "--format", "{{.Name}}").split()
        return f"{namespace}_default" not in names

    wait_until(gone, f"removal of stack {namespace}", limit=120, every=0.2)


def stack_start(manager: str, namespace: str, file: Path) -> float:
    began = time.perf_counter()
    docker(manager, "stack", "deploy", "--resolve-image", "never", "-c", str(file), namespace)
    wait_until(
        lambda: stack_whole(manager, namespace, len(STACK)),
        f"stack {namespace}",
        limit=180,
        every=0.05,
    )
    elapsed = time.perf_counter() - began
    stack_down(manager, namespace)
    return elapsed


def kill_node(node: str) -> None:
    subprocess.run(["bash", str(LAB), "kill-node", node], check=True, capture_output=True)


def restore(manager: str, node: str) -> None:
    subprocess.run(["bash", str(LAB), "start-node", node], check=True, capture_output=True)
    wait_until(
        lambda: (
            f"lab-{node} Ready"
            in docker(manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}")
        ),
        f"{node} back in the swarm",
        limit=60,
        every=0.2,
    )


PAIR = {
    "image": STACK["ollama"][0],
    "pull": "never",
    "env": {"PORTS": "8080"},
    "ports": ["0:8080"],
    "healthcheck": {"type": "http", "port": 8080, "start_period": "60s"},
    "stop_timeout": "2s",
    "restart": "always",
    "swarm": {
        "replicas": 2,
        "constraints": ["node.role == worker"],
        "endpoint_mode": "dnsrr",
        "publish_mode": "host",
    },
}


async def ours_node_loss(manager: str, project: str) -> float:
    async with AgentInfra.start(
        project=project,
        services=["web"],
        config=ours_config({"web": PAIR}),
        docker_host=manager,
    ) as infra:
        nodes = sorted(r.node for r in (await infra.status())["web"].replicas)
        assert nodes == ["lab-n2", "lab-n3"], nodes
        began = time.perf_counter()
        kill_node("n3")
        try:
            seen_down = False
            while True:
                s = infra.service("web")
                seen_down = seen_down or s.status != "healthy"
                if seen_down and s.status == "healthy":
                    return time.perf_counter() - began
                assert time.perf_counter() - began < 120, "never healthy again"
                await asyncio.sleep(0.05)
        finally:
            restore(manager, "n3")


def stack_node_loss(manager: str, namespace: str, file: Path) -> float:
    docker(manager, "stack", "deploy", "--resolve-image", "never", "-c", str(file), namespace)
    service = f"{namespace}_web"
    wait_until(lambda: stack_whole(manager, namespace, 1), "pair", limit=120, every=0.1)

    def running_on() -> list[str]:
        ids = docker(manager, "service", "ps", "-q", "--filter", "desired-state=running", service)
        tasks = json.loads(docker(manager, "inspect", *ids.split())) if ids.strip() else []
        return sorted(t["NodeID"] for t in tasks if t["Status"]["State"] == "running")

    nodes = {
        n["ID"]: n["Description"]["Hostname"]
        for n in json.loads(
            docker(manager, "node", "inspect", *docker(manager, "node", "ls", "-q").split())
        )
    }
    assert sorted(nodes[n] for n in running_on()) == ["lab-n2", "lab-n3"]
    began = time.perf_counter()
    kill_node("n3")
    try:
        wait_until(
            lambda: [nodes[n] for n in running_on()] == ["lab-n2", "lab-n2"],
            "rescheduled",
            limit=120,
            every=0.05,
        )
        return time.perf_counter() - began
    finally:
        restore(manager, "n3")
        stack_down(manager, namespace)


def pair_file() -> str:
    return textwrap.dedent(
        f"""\
        version: '3.8'
        services:
          web:
            image: {PAIR["image"]}
            environment: {{PORTS: '8080'}}
            ports: [{{target: 8080, mode: host}}]
            stop_grace_period: 2s
            healthcheck:
              test: ['CMD', 'wget', '-q', '-O', '/dev/null', 'http://127.0.0.1:8080/health']
              interval: 100ms
              timeout: 1s
              retries: 600
            deploy:
              replicas: 2
              endpoint_mode: dnsrr
              placement: {{constraints: ['node.role == worker']}}
        """
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    args = parser.parse_args()
    manager = lab_up()
    tag = uuid.uuid4().hex[:6]
    intervals = ("100ms", "1s")
    results: dict[str, list[float]] = {
        "ours": [],
        "ours unordered": [],
        "ours loss": [],
        "stack loss": [],
    }
    results.update({f"stack {i}": [] for i in intervals})
    with tempfile.TemporaryDirectory() as tmp:
        files = {i: Path(tmp) / f"stack-{i}.yml" for i in intervals}
        for interval, file in files.items():
            file.write_text(stack_file(interval))
        pair = Path(tmp) / "pair.yml"
        pair.write_text(pair_file())
        contenders: list[tuple[str, Any]] = [
            ("ours", lambda i: asyncio.run(ours_start(manager, f"sw{tag}o{i}"))),
            (
                "ours unordered",
                lambda i: asyncio.run(ours_start(manager, f"sw{tag}u{i}", ordered=False)),
            ),
        ] + [
            (f"stack {iv}", lambda i, f=f, iv=iv: stack_start(manager, f"sw{tag}{iv[0]}{i}", f))
            for iv, f in files.items()
        ]
        for i in range(args.runs):
            for name, run in contenders[i % len(contenders) :] + contenders[: i % len(contenders)]:
                results[name].append(run(i))
            results["ours loss"].append(asyncio.run(ours_node_loss(manager, f"sw{tag}l{i}")))
            results["stack loss"].append(stack_node_loss(manager, f"sw{tag}m{i}", pair))
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)

    def ms(key: str) -> float:
        return statistics.median(results[key]) * 1000

    ours = ms("ours")
    engine = docker(manager, "version", "--format", "{{.Server.Version}}").strip()
    rows = [
        ('dspy_agent_infra, backend = "swarm"', ours, "1.00"),
        (
            "dspy_agent_infra, the same without `depends_on` (all at once, as Swarm does)",
            ms("ours unordered"),
            f"{ms('ours unordered') / ours:.2f}",
        ),
    ] + [
        (
            f"`docker stack deploy` (health interval {i})",
            ms(f"stack {i}"),
            f"{ms(f'stack {i}') / ours:.2f}",
        )
        for i in intervals
    ]
    loss = [
        ("dspy_agent_infra: the core reports the service healthy again", ms("ours loss"), "1.00"),
        (
            "`docker stack deploy`: both replicas running again"
            " (a replica runs once its 100 ms in-container check passes)",
            ms("stack loss"),
            f"{ms('stack loss') / ms('ours loss'):.2f}",
        ),
    ]
    table = "\n".join(
        ["| contender | median ms | ratio to ours |", "| --- | ---: | ---: |"]
        + [f"| {name} | {v:.0f} | {r} |" for name, v, r in rows]
    )
    loss_table = "\n".join(
        ["| from a worker's Engine killed | median ms | ratio to ours |", "| --- | ---: | ---: |"]
        + [f"| {name} | {v:.0f} | {r} |" for name, v, r in loss]
    )
    report = (
        textwrap.dedent(
            f"""\
            ## Swarm: the five-service stack on three nodes, and a node lost

            `python bench/swarm.py --runs {args.runs}` on the three-node swarm of
            `scripts/swarm_lab.sh` (three Docker Engines {engine} on this machine, each in its own
            network namespace; one manager, two workers), median of {args.runs} runs each,
            contenders interleaved. The stack of the start-time section (DNS round-robin
            endpoints, ports published on each replica's node), from no service to every replica
            running and healthy. `docker stack deploy` starts every service at once: Swarm does
            not honour `depends_on`; ours starts each service once its dependencies are healthy.

            """
        )
        + table
        + "\n\n"
        + textwrap.dedent(
            """\
            A node lost: a service with two replicas, one on each worker; one worker's Engine
            SIGKILLed. Swarm marks the node down after its heartbeat period (about 12 s here)
            and runs the lost replica on the other worker; ours then probes it healthy.

            """
        )
        + loss_table
        + "\n"
    )
    print(report)
    if args.write:
        write_section(args.write, "swarm", report)


if __name__ == "__main__":
    main()
