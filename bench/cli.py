"""Command-line benchmark: `dspy-agent start`, `status`, attach and `stop`, against
docker-compose and the floor, in one run.

The stack is bench/startup.py's: five services with a three-deep dependency chain on the local
test images. Measured, each as the median of --runs runs, contenders interleaved:
  start     `dspy-agent start` until it exits 0 (every service healthy), from no containers
  compose   `docker-compose up -d` with 100 ms in-container health checks (its best), until all
            are healthy
  floor     `docker run -d` per service as its dependencies answer, probes every 10 ms, timed
            inside this process (no interpreter start), and as a command (`python floor.py`)
  status    `dspy-agent status` (a subprocess, as typed) against `docker-compose ps`
  attach    `AgentInfra.start()` entered in a new event loop while the daemon runs: attached
  stop      `dspy-agent stop` until the daemon is gone and no container is left, against
            `docker-compose down`

Usage: python bench/cli.py [--runs 5] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from floor import STACK, floor_run, sh
from report import write_section
from startup import compose_file, compose_up, median_ms

from dspy_agent_infra import AgentInfra

DSPY_AGENT = str(Path(sys.executable).parent / "dspy-agent")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_toml() -> str:
    parts = []
    for name, (image, port, probe, deps) in STACK.items():
        parts.append(
            textwrap.dedent(
                f"""\
                [services.{name}]
                enabled = true
                image = "{image}"
                pull = "never"
                ports = ["0:{port}"]
                env = {{ PORTS = "{port}" }}
                depends_on = {deps!r}
                healthcheck = {{ type = "{probe}", start_period = "60s" }}
                stop_timeout = "5s"
                """
            ).replace("'", '"')
        )
    return "\n".join(parts)


def timed(*args: str, env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=env)
    return time.perf_counter() - began


def project_containers(label: str) -> list[str]:
    return sh("docker", "ps", "-aq", "--filter", f"label={label}").split()


class Ours:
    """One `dspy-agent` project in its own folder, state folder and ports."""

    def __init__(self, workdir: Path, project: str) -> None:
        self.dir = workdir / project
        self.dir.mkdir()
        (self.dir / "dspy-agent.toml").write_text(config_toml())
        self.project = project
        self.env = {
            **os.environ,
            "DSPY_AGENT_PROJECT": project,
            "DSPY_AGENT_STATE_DIR": str(self.dir / "state"),
            "ORCHESTRATOR_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "ENV_MANAGER_GRPC_ADDR": "127.0.0.1:0",
            "DSPY_AGENT_SERVICES": ",".join(STACK),
        }

    def run(self, *args: str) -> float:
        began = time.perf_counter()
        subprocess.run(
            [DSPY_AGENT, *args], check=True, capture_output=True, env=self.env, cwd=self.dir
        )
        return time.perf_counter() - began

    def attach(self) -> float:
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:

            async def enter() -> float:
                began = time.perf_counter()
                async with AgentInfra.start() as infra:
                    elapsed = time.perf_counter() - began
                    assert infra.attached, "did not attach"
                return elapsed

            return asyncio.run(enter())
        finally:
            os.environ.clear()
            os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    r: dict[str, list[float]] = {
        k: []
        for k in (
            "start",
            "floor",
            "floor_cmd",
            "compose",
            "status",
            "compose_ps",
            "attach",
            "stop",
            "compose_down",
        )
    }
    have_compose = shutil.which("docker-compose") is not None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "docker-compose.yml").write_text(compose_file("100ms"))
        for i in range(args.runs):

            def ours_round(i: int = i) -> None:
                ours = Ours(workdir, f"bench-{tag}-d{i}")
                r["start"].append(ours.run("start"))
                r["status"] += [ours.run("status") for _ in range(5)]
                r["attach"].append(ours.attach())
                r["stop"].append(ours.run("stop"))
                left = project_containers(f"dspy-agent.project={ours.project}")
                assert not left, f"dspy-agent stop left {left}"

            def floor_round(i: int = i) -> None:
                r["floor"].append(floor_run(f"bench-{tag}-f{i}"))
                script = str(Path(__file__).with_name("floor.py"))
                r["floor_cmd"].append(timed(sys.executable, script, f"bench-{tag}-g{i}"))

            def compose_round(i: int = i) -> None:
                up, base = compose_up(f"bench{tag}k{i}", workdir)
                r["compose"].append(up)
                r["compose_ps"] += [timed(*base, "ps") for _ in range(5)]
                r["compose_down"].append(timed(*base, "down", "-v", "-t", "5"))

            rounds = [ours_round, floor_round] + ([compose_round] if have_compose else [])
            # Each contender goes first as often as the others: the Engine may still be busy
            # cleaning up after whoever ran before.
            shift = i % len(rounds)
            for run_round in rounds[shift:] + rounds[:shift]:
                run_round()
            print(
                f"run {i + 1}/{args.runs}: start {r['start'][-1]:.3f}s floor {r['floor'][-1]:.3f}s"
                f" floor command {r['floor_cmd'][-1]:.3f}s"
                + (f" compose {r['compose'][-1]:.3f}s" if have_compose else ""),
                file=sys.stderr,
            )

    start = median_ms(r["start"])
    rows = [
        ("`dspy-agent start`, cold, to all healthy", start, 1.0),
        (
            "floor as a command: `python bench/floor.py`",
            median_ms(r["floor_cmd"]),
            median_ms(r["floor_cmd"]) / start,
        ),
        (
            "floor inside the benchmark's process",
            median_ms(r["floor"]),
            median_ms(r["floor"]) / start,
        ),
    ]
    if have_compose:
        rows.append(
            (
                "`docker-compose up -d` (health interval 100ms), to all healthy",
                median_ms(r["compose"]),
                median_ms(r["compose"]) / start,
            )
        )
    ops = [
        ("`dspy-agent status`", median_ms(r["status"])),
        ("attach: `AgentInfra.start()` entered, stack running", median_ms(r["attach"])),
        ("`dspy-agent stop`, daemon gone, no container left", median_ms(r["stop"])),
    ]
    if have_compose:
        ops += [
            ("`docker-compose ps`", median_ms(r["compose_ps"])),
            ("`docker-compose down`", median_ms(r["compose_down"])),
        ]
    engine = sh("docker", "version", "--format", "{{.Server.Version}}").strip()
    report = (
        textwrap.dedent(
            f"""\
        ## The command line: start, status, attach, stop

        `python bench/cli.py --runs {args.runs}` on {platform.machine()}, {os.cpu_count()} CPUs,
        Docker Engine {engine}, median of {args.runs} runs each (status and ps: 5 calls per
        run), contenders interleaved with the first one rotating; the stack of the section above.

        """
        )
        + "\n".join(
            [
                "| start to all healthy | median ms | ratio to `dspy-agent start` |",
                "| --- | ---: | ---: |",
            ]
            + [f"| {name} | {ms:.0f} | {ratio:.2f} |" for name, ms, ratio in rows]
        )
        + "\n\n"
        + "\n".join(
            ["| operation | median ms |", "| --- | ---: |"]
            + [f"| {name} | {ms:.0f} |" for name, ms in ops]
        )
        + "\n"
    )
    print(report)
    if args.write:
        write_section(args.write, "cli", report + EXPLANATION)


EXPLANATION = """
`dspy-agent start` includes everything a user waits for: a Python interpreter for the
command, the daemon's own interpreter, both gRPC ports, and the stack; it returns once
every service is healthy. The floor is timed twice: as a command, which pays for its
interpreter as `dspy-agent start` does, and inside the benchmark's own process, which
does not. Single runs vary by several hundred milliseconds on this Engine, so the
figures are medians of interleaved runs. `status` and `docker-compose ps` are whole
commands as typed (interpreter start included). *attach* is what an agent pays in its
own process when a daemon already runs: the health probe, the services' state and the
worker stream. `stop` removes each service after its dependents, with the services' own
graceful shutdown.
"""


if __name__ == "__main__":
    main()
