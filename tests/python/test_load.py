"""Load, scaled for CI: 50 concurrent gRPC clients submit to a daemon while one of its services
restarts; every call succeeds, every task completes with its own result, and the daemon's memory
settles (a second identical round does not grow it). `python bench/load.py` runs the full size."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_cli import catalog_on_free_ports, run

from loadgen import DSPY_AGENT, daemon_pid, one_round, orchestrator_port


async def test_fifty_clients_while_a_service_restarts(
    tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-agent.toml").write_text(catalog_on_free_ports())
    assert run("start", "--services", "redis").returncode == 0
    try:
        pid, port = daemon_pid(), orchestrator_port()
        rounds = [
            await one_round(port, pid, clients=50, per_client=40, tag=f"r{n}", restart="redis")
            for n in range(3)
        ]
        for r in rounds:
            assert r.failed_calls == []
            # The restart happened under load, not before or after it.
            assert r.during_restart > 0
        # The first round grows the process to its working size; later rounds stay within 15%
        # of it (docs/RELIABILITY.md).
        assert rounds[2].rss_after <= rounds[1].rss_after * 1.15, [r.rss_after for r in rounds]
        assert run("status").returncode == 0
    finally:
        subprocess.run([DSPY_AGENT, "stop"], capture_output=True, timeout=60)
