"""`/metrics` and `/healthz` on the HTTP port: the Prometheus text format checked by Debian's
`promtool`, the values a running stack should show, the token, and a real Prometheus server
scraping a stack and answering queries about it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import grpc
from dspy_agent_infra import AgentInfra, InfraError, OrchestratorClient, Task
from dspy_agent_infra.errors import TaskNotFoundError
from helpers import ROOT, EngineProxy, free_port, http_service, redis_service

PROMETHEUS = Path(os.environ.get("DSPY_AGENT_PROMETHEUS", "/opt/dspy-agent-prometheus/usr/bin"))


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_metrics_of_a_running_stack(project: str) -> None:
    assert (PROMETHEUS / "promtool").exists(), "promtool is needed (scripts/test.sh unpacks it)"
    services = {"cache": redis_service(), "web": http_service(depends_on=["cache"])}
    config = {
        "services": services,
        "tasks": {"types": {"later": {}}},
    }
    async with AgentInfra.start(project=project, services=list(services), config=config) as infra:
        assert infra.http_addr is not None and infra.token is not None
        base = f"http://{infra.http_addr}"

        @infra.task_handler("flaky")
        async def flaky(task: Task) -> str:
            if task.attempt == 1:
                raise RuntimeError("first attempt fails")
            return "ok"

        @infra.task_handler("broken")
        async def broken(task: Task) -> str:
            raise RuntimeError("always")

        for i in range(3):
            await infra.submit_task(f"p{i}", "ping", {})
        await infra.submit_task("f", "flaky", {}, max_retries=1)
        await infra.submit_task("b", "broken", {})
        await infra.submit_task("w1", "later", {})
        await infra.submit_task("w2", "later", {})
        for task_id in ("p0", "p1", "p2", "f", "b"):
            await infra.wait_for_task(task_id, timeout=30)
        # gRPC calls, counted by method and code: two found, one not, one refused.
        client = infra.orchestrator_client
        for task_id in ("p0", "p1"):
            await client.get_task_status(task_id)
        with pytest.raises(TaskNotFoundError):
            await client.get_task_status("missing")
        port = int((infra.orchestrator_addr or "").rpartition(":")[2])
        with pytest.raises(InfraError):
            await OrchestratorClient(port=port, token="wrong-token-0123456789").get_task_status(
                "p0"
            )
        # A path no port serves is counted, but never named.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/made.Up/Path1")(b"")

        # Open: the health check. Behind the token: the metrics.
        assert get(f"{base}/healthz") == (200, "ok\n")
        status, body = get(f"{base}/metrics")
        assert status == 401 and "dspy_agent" not in body
        assert get(f"{base}/metrics", "wrong-token-0123456789")[0] == 401
        assert get(f"{base}/nothing", infra.token)[0] == 404
        status, text = get(f"{base}/metrics", infra.token)
        assert status == 200

        checked = subprocess.run(
            [str(PROMETHEUS / "promtool"), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr

        s = samples(text)
        assert s['dspy_agent_tasks_submitted_total{task_type="ping"}'] == 3
        assert s['dspy_agent_tasks_completed_total{task_type="ping"}'] == 3
        assert s['dspy_agent_tasks_retried_total{task_type="flaky"}'] == 1
        assert s['dspy_agent_tasks_completed_total{task_type="flaky"}'] == 1
        assert s['dspy_agent_tasks_started_total{task_type="flaky"}'] == 2
        assert s['dspy_agent_tasks_failed_total{task_type="broken"}'] == 1
        assert s['dspy_agent_task_run_seconds_count{task_type="ping"}'] == 3
        assert s['dspy_agent_task_queue_wait_seconds_count{task_type="ping"}'] == 3
        # A declared type nobody serves: its tasks wait, and the depth says so.
        assert s['dspy_agent_queue_depth{state="pending",task_type="later"}'] == 2
        assert s['dspy_agent_service_up{service="cache"}'] == 1
        assert s['dspy_agent_service_healthy{service="web"}'] == 1
        assert s['dspy_agent_service_restarts_total{service="web"}'] == 0
        assert s["dspy_agent_engine_up"] == 1
        for family in ("tasks_submitted_total", "task_run_seconds", "queue_depth", "service_up"):
            assert f"# HELP dspy_agent_{family} " in text
            assert f"# TYPE dspy_agent_{family} " in text
        assert any(k.startswith("dspy_agent_build_info{version=") for k in s)
        status_call = 'method="/orchestrator.v1.OrchestratorService/GetTaskStatus"'
        assert s[f'dspy_agent_grpc_requests_total{{code="OK",{status_call}}}'] == 2
        assert s[f'dspy_agent_grpc_requests_total{{code="NOT_FOUND",{status_call}}}'] == 1
        assert s[f'dspy_agent_grpc_requests_total{{code="UNAUTHENTICATED",{status_call}}}'] == 1
        assert s[f"dspy_agent_grpc_request_seconds_count{{{status_call}}}"] == 4
        assert not any("made.Up" in k for k in s)
        assert any('method="unknown"' in k for k in s)
        assert s['dspy_agent_service_probe_seconds_count{outcome="pass",service="cache"}'] >= 1
        # CPU and memory are sampled in the background: they show up within seconds.
        deadline = time.monotonic() + 30
        memory = 'dspy_agent_service_memory_bytes{service="cache"}'
        cpu = 'dspy_agent_service_cpu_percent{service="web"}'
        while memory not in s or cpu not in s:
            assert time.monotonic() < deadline, "no memory sample of cache"
            await asyncio.sleep(0.5)
            s = samples(get(f"{base}/metrics", infra.token)[1])
        assert s[memory] > 0
        assert s[cpu] >= 0


async def test_a_prometheus_server_scrapes_the_stack(project: str, tmp_path: Path) -> None:
    assert (PROMETHEUS / "prometheus").exists(), "prometheus is needed (scripts/test.sh unpacks it)"
    services = {"cache": redis_service()}
    config = {"services": services, "tasks": {"types": {"queued": {}}}}
    async with AgentInfra.start(project=project, services=list(services), config=config) as infra:
        for i in range(4):
            await infra.submit_task(f"q{i}", "queued", {})
        token_file = tmp_path / "token"
        token_file.write_text(infra.token or "")
        token_file.chmod(0o600)
        (tmp_path / "prometheus.yml").write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "dspy-agent",
                            "authorization": {"credentials_file": str(token_file)},
                            "static_configs": [{"targets": [infra.http_addr]}],
                        }
                    ],
                }
            )
        )
        port = free_port()
        server = subprocess.Popen(
            [
                str(PROMETHEUS / "prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def query(expr: str) -> list[dict[str, object]]:
                url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": expr}
                )
                try:
                    status, body = get(url)
                except urllib.error.URLError:
                    return []  # not listening yet
                if status != 200:
                    return []
                result: list[dict[str, object]] = json.loads(body)["data"]["result"]
                return result

            deadline = time.monotonic() + 60
            depth: list[dict[str, object]] = []
            up: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                depth = query('dspy_agent_queue_depth{task_type="queued",state="pending"}')
                up = query('dspy_agent_service_up{service="cache"}')
                if depth and up:
                    break
                await asyncio.sleep(0.5)
            assert depth and up, "Prometheus never scraped the stack"
            assert depth[0]["value"][1] == "4"  # type: ignore[index]
            assert up[0]["value"][1] == "1"  # type: ignore[index]
            # The scrape itself succeeded with the token.
            assert query('up{job="dspy-agent"}')[0]["value"][1] == "1"  # type: ignore[index]
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.mark.parametrize("addr", ["not an address", "127.0.0.1:99999"])
def test_a_bad_http_address_names_the_setting(addr: str) -> None:
    from dspy_agent_infra import ConfigError

    with pytest.raises(ConfigError, match="http_addr"):
        AgentInfra.start(services=[], config={"http_addr": addr})


def test_the_grafana_dashboard_queries_documented_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "dspy-agent.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    # Every expression is valid PromQL: promtool checks them as recording rules.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dspy_agent_dashboard:expr_{i}", "expr": e}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    checked = subprocess.run(
        [str(PROMETHEUS / "promtool"), "check", "rules", str(tmp_path / "rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # And names only metrics the stack serves, as docs/OBSERVABILITY.md lists them.
    documented = (ROOT / "docs" / "OBSERVABILITY.md").read_text()
    for name in set(re.findall(r"dspy_agent_[a-z_]+", " ".join(exprs))):
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{family}`" in documented, name


async def test_metrics_during_an_engine_outage(project: str, tmp_path: Path) -> None:
    relay = EngineProxy(tmp_path / "engine.sock")
    relay.up()
    try:
        async with AgentInfra.start(
            project=project,
            services=["web"],
            config={"services": {"web": http_service()}},
            docker_host=f"unix://{relay.path}",
        ) as infra:
            url = f"http://{infra.http_addr}/metrics"
            code, text = await asyncio.to_thread(get, url, infra.token)
            assert code == 200 and samples(text)["dspy_agent_engine_up"] == 1
            # The Engine goes away: the endpoint still answers, and says so.
            relay.down()
            began = time.monotonic()
            code, text = await asyncio.to_thread(get, url, infra.token)
            assert code == 200 and time.monotonic() - began < 5
            s = samples(text)
            assert s["dspy_agent_engine_up"] == 0
            # What was last known of the services is still there, for the dashboards.
            assert s['dspy_agent_service_healthy{service="web"}'] == 1
            relay.up()
            code, text = await asyncio.to_thread(get, url, infra.token)
            assert code == 200 and samples(text)["dspy_agent_engine_up"] == 1
    finally:
        with contextlib.suppress(OSError, AssertionError):
            relay.down()
