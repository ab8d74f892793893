"""Load benchmark: 50 concurrent gRPC clients submitting 2,000 tasks each to a `dspy-agent`
daemon while one of its services restarts, round after round; reports throughput, failed calls
and the daemon's memory after each round.

Usage: python bench/load.py [--clients 50] [--per-client 2000] [--rounds 3] [--write FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

from report import write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from loadgen import DSPY_AGENT, daemon_pid, one_round, orchestrator_port


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    # The run happens in a folder of its own; the report goes where it was asked for.
    if args.write:
        args.write = args.write.resolve()

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ.update(
            {
                "DSPY_AGENT_PROJECT": f"load-{uuid.uuid4().hex[:6]}",
                "DSPY_AGENT_STATE_DIR": str(Path(tmp) / "state"),
                "ORCHESTRATOR_GRPC_ADDR": "127.0.0.1:0",
                "ENV_MANAGER_GRPC_ADDR": "127.0.0.1:0",
            }
        )
        Path("dspy-agent.toml").write_text('[services.redis]\nports = ["0:6379"]\n')
        subprocess.run([DSPY_AGENT, "start", "--services", "redis"], check=True)
        try:
            pid, port = daemon_pid(), orchestrator_port()
            rows = []
            for n in range(args.rounds):
                r = await one_round(
                    port, pid, args.clients, args.per_client, tag=f"r{n}", restart="redis"
                )
                rows.append(
                    f"| {n + 1} | {r.submitted} | {len(r.failed_calls)} | "
                    f"{r.during_restart} | {r.submitted / r.seconds:.0f} | "
                    f"{r.rss_after / 2**20:.0f} |"
                )
                print(rows[-1], file=sys.stderr)
        finally:
            subprocess.run([DSPY_AGENT, "stop"], check=False, capture_output=True)
    report = (
        textwrap.dedent(
            f"""\
        ## Load: {args.clients} gRPC clients while a service restarts

        `python bench/load.py --clients {args.clients} --per-client {args.per_client}
        --rounds {args.rounds}`: each round, {args.clients} `OrchestratorClient`s submit
        {args.per_client} `echo` tasks each to a `dspy-agent` daemon (durable store) while
        `dspy-agent restart redis` runs; the round ends when every task has completed with its
        own result.

        """
        )
        + "| round | tasks | failed calls | submits answered during the restart "
        + "| tasks/s, submit to all completed | daemon RSS MiB after |\n"
        + "| ---: | ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join(rows)
        + "\n"
    )
    print(report)
    if args.write:
        write_section(args.write, "load", report)


if __name__ == "__main__":
    asyncio.run(main())
