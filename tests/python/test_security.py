"""Access control of the gRPC ports: a token required on every call but health checks, made
at the first start and kept where only its owner reads it, found by the owner's own clients,
and kept out of logs and output but once."""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_cli import DSPY_AGENT, catalog_on_free_ports

import grpc
from dspy_agent_infra import AgentInfra, ConfigError, InfraError, OrchestratorClient, TaskStatus
from dspy_agent_infra.errors import (
    OrchestratorUnavailableError,
    ServiceStartError,
    TaskNotFoundError,
)
from helpers import (
    BUSYBOX,
    cli_ping,
    containers,
    docker,
    http_service,
    inspect,
    redis_service,
)

TOKEN = "t0ken-for-tests-5f2b9c1e7d"


async def test_the_handoff_address_starts_with_a_token_shown_once(
    caplog: pytest.LogCaptureFixture, pb: dict[str, Any]
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_agent_infra")
    with pytest.raises(ConfigError) as short:
        AgentInfra.start(services=[], config={"token": "hunter2"})
    assert "at least 16" in str(short.value) and "hunter2" not in str(short.value)
    # The hand-off's ORCHESTRATOR_GRPC_ADDR=0.0.0.0:50052, on free ports: it starts, and a token
    # made at the first start is required, kept in the state folder and logged once.
    config = {"orchestrator_addr": "0.0.0.0:0", "env_manager_addr": "0.0.0.0:0"}
    state = Path(os.environ["DSPY_AGENT_STATE_DIR"])
    async with AgentInfra.start(services=[], config=config) as infra:
        token = infra.token
        assert token is not None and len(token) >= 43
        assert (state / "token").read_text().strip() == token
        assert (state / "token").stat().st_mode & 0o777 == 0o600
        assert state.stat().st_mode & 0o777 == 0o700
        assert sum(token in r.getMessage() for r in caplog.records) == 1
        port = infra.orchestrator_addr.rpartition(":")[2]
        o = pb["orchestrator_v1_pb2"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SubmitTask(o.SubmitTaskRequest(task_id="x", task_type="ping"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The refusal says where the token is.
            assert str(state / "token") in (refused.value.details() or "")
            ok = await stub.SubmitTask(
                o.SubmitTaskRequest(task_id="x", task_type="ping"),
                metadata=[("authorization", f"Bearer {token}")],
            )
            assert ok.success
        printed = subprocess.run(
            [DSPY_AGENT, "token"], capture_output=True, text=True, timeout=60, check=True
        )
        assert printed.stdout.strip() == token
    caplog.clear()
    async with AgentInfra.start(services=[], config=config) as again:
        assert again.token == token
    assert not any(token in r.getMessage() for r in caplog.records)
    # Knowingly open: no token at all.
    open_config = {**config, "allow_remote_without_token": True}
    async with AgentInfra.start(services=[], config=open_config) as infra:
        assert infra.token is None
        port = infra.orchestrator_addr.rpartition(":")[2]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
            assert (
                await stub.SubmitTask(o.SubmitTaskRequest(task_id="y", task_type="ping"))
            ).success


INTRUDER = "dspy-intruder"
# Runs as INTRUDER with Debian's grpcio: a plain gRPC client sending request bytes it was handed.
ATTACK = """
import json, os, sys
import grpc
port, env_port, submit, execute, token_file, ports_dir = sys.argv[1:]
def call(port, method, request):
    with grpc.insecure_channel("127.0.0.1:" + port) as channel:
        try:
            channel.unary_unary(method)(bytes.fromhex(request), timeout=20)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name
def read(path):
    try:
        os.listdir(path) if os.path.isdir(path) else open(path).read()
        return "read"
    except PermissionError:
        return "denied"
print(json.dumps({
    "submit": call(port, "/orchestrator.v1.OrchestratorService/SubmitTask", submit),
    "execute": call(env_port, "/env_manager.v1.EnvManagerService/ExecuteTask", execute),
    "token_file": read(token_file),
    "ports": read(ports_dir),
}))
"""


async def test_another_local_user_cannot_call_the_ports(
    pb: dict[str, Any], project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert os.geteuid() == 0, "this test runs as root, to act as a second user"
    subprocess.run(["id", INTRUDER], check=True, capture_output=True)  # scripts/test.sh adds it
    # State in a folder every user can enter, as a shared machine's would be: only the
    # permissions this project sets keep the token private.
    shared = Path(f"/tmp/dspy-shared-{uuid.uuid4().hex[:8]}")
    shared.mkdir(mode=0o755)
    try:
        shared.chmod(0o755)
        state = shared / "state"
        monkeypatch.setenv("DSPY_AGENT_STATE_DIR", str(state))
        monkeypatch.setenv("XDG_STATE_HOME", str(shared / "xdg"))
        monkeypatch.delenv("DSPY_AGENT_TOKEN", raising=False)
        monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")
        async with AgentInfra.start(
            project=project, services=["redis"], config={"services": {"redis": redis_service()}}
        ) as infra:
            o, e = pb["orchestrator_v1_pb2"], pb["env_manager_v1_pb2"]
            steal = ["sh", "-c", "id; env"]
            submit = o.SubmitTaskRequest(
                task_id="attack",
                task_type="exec",
                payload=json.dumps({"service": "redis", "command": steal}).encode(),
            )
            execute = e.ExecuteTaskRequest(service="redis", command=steal)
            port = infra.orchestrator_addr.rpartition(":")[2]
            env_port = infra.env_manager_addr.rpartition(":")[2]
            ports_dir = shared / "xdg" / "dspy-agent" / "ports"
            assert (ports_dir / port).exists()
            attacked = subprocess.run(
                ["runuser", "-u", INTRUDER, "--", "/usr/bin/python3", "-c", ATTACK, port,
                 env_port, submit.SerializeToString().hex(), execute.SerializeToString().hex(),
                 str(state / "token"), str(ports_dir)],
                capture_output=True, text=True, timeout=120, cwd="/",
            )  # fmt: skip
            assert attacked.returncode == 0, attacked.stderr
            assert json.loads(attacked.stdout) == {
                "submit": "UNAUTHENTICATED",
                "execute": "UNAUTHENTICATED",
                "token_file": "denied",
                "ports": "denied",
            }
            # The owner's processes need nothing: a client given only the port, and the CLI.
            client = OrchestratorClient(port=int(port))
            await client.submit_task("own", "exec", {"service": "redis", "command": ["id"]})
            done = await client.wait_for_task("own", timeout=60)
            assert done.status == TaskStatus.COMPLETED and b"uid=" in done.result_payload
            with pytest.raises(TaskNotFoundError):
                await client.get_task_status("attack")
            cli = subprocess.run(
                [DSPY_AGENT, "tasks", "submit", "ping", "--wait"],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "ORCHESTRATOR_GRPC_ADDR": f"127.0.0.1:{port}"},
            )  # fmt: skip
            assert cli.returncode == 0 and "pong" in cli.stdout, cli.stderr
        # Stopped: the port is no longer listed.
        assert not (ports_dir / port).exists()
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=True)


# Runs as INTRUDER with Debian's grpcio: a gRPC server on [::1]:PORT that prints the metadata
# of every call it receives (and answers UNIMPLEMENTED).
LISTEN = """
import json, sys, concurrent.futures
import grpc
class Record(grpc.GenericRpcHandler):
    def service(self, details):
        print(json.dumps([details.method, list(details.invocation_metadata)]), flush=True)
        return None
server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), handlers=[Record()])
server.add_insecure_port("[::1]:" + sys.argv[1])
server.start()
print("listening", flush=True)
server.wait_for_termination(timeout=float(sys.argv[2]))
"""


def free_on_both_loopbacks() -> int:
    """A port free on 127.0.0.1 and on [::1] alike."""
    import socket

    for _ in range(50):
        with socket.socket(socket.AF_INET6) as v6:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::1", 0))
            port = int(v6.getsockname()[1])
            with socket.socket() as v4:
                try:
                    v4.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free on both loopback addresses")


async def test_the_token_goes_only_to_the_listed_address(
    project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert os.geteuid() == 0, "this test runs as root, to swap the hosts file and be a second user"
    subprocess.run(["id", INTRUDER], check=True, capture_output=True)  # scripts/test.sh adds it
    hosts = Path("/etc/hosts")
    original = hosts.read_bytes()
    # The stock Debian hosts file: `localhost` is ::1 first.
    kept = [
        line for line in original.decode().splitlines() if "localhost" not in line.split("#")[0]
    ]
    port = free_on_both_loopbacks()
    intruder = subprocess.Popen(
        ["runuser", "-u", INTRUDER, "--", "/usr/bin/python3", "-c", LISTEN, str(port), "150"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        hosts.write_text(
            "::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\tlocalhost\n"
            + "\n".join(kept)
            + "\n"
        )
        assert intruder.stdout is not None
        assert intruder.stdout.readline().strip() == "listening", intruder.stderr
        monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", f"127.0.0.1:{port}")
        token = ""
        async with AgentInfra.start(project=project, services=[]) as infra:
            assert infra.token is not None
            token = infra.token
            # localhost (the default host) reaches the stack that lists the port, not ::1.
            assert await OrchestratorClient(host="localhost", port=port).health()
            client = OrchestratorClient(port=port)
            await client.submit_task("p", "ping", {})
            assert (await client.wait_for_task("p", timeout=30)).status == TaskStatus.COMPLETED
            cli_ping(DSPY_AGENT, f"localhost:{port}")
            # Named by its own address, the intruder gets a call, and no token with it.
            with pytest.raises(InfraError):
                await OrchestratorClient(host="::1", port=port).health()
    finally:
        hosts.write_bytes(original)
        intruder.terminate()
        received, errors = intruder.communicate(timeout=30)
    assert hosts.read_bytes() == original
    calls = [json.loads(line) for line in received.splitlines() if line.startswith("[")]
    assert calls, f"the intruder saw no call at all, so the test proves nothing: {errors}"
    assert all(k != "authorization" for _, metadata in calls for k, _v in metadata), calls
    assert token and token not in received


async def test_a_state_folder_that_cannot_be_private_is_refused(tmp_path: Path) -> None:
    state = Path(os.environ["DSPY_AGENT_STATE_DIR"])
    async with AgentInfra.start(services=[]) as infra:
        assert infra.token
    (state / "token").chmod(0o644)
    with pytest.raises(ConfigError) as loose:
        async with AgentInfra.start(services=[]):
            pass
    assert f"chmod 600 {state / 'token'}" in str(loose.value)
    (state / "token").chmod(0o600)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    uid = int(subprocess.run(["id", "-u", INTRUDER], capture_output=True, text=True).stdout)
    os.chown(foreign, uid, -1)
    with pytest.raises(ConfigError) as other:
        async with AgentInfra.start(services=[], state_dir=str(foreign)):
            pass
    assert "belongs to user" in str(other.value) and "state_dir" in str(other.value)


async def test_every_call_but_health_needs_the_token(
    pb: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dspy_agent_infra")
    config = {"token": TOKEN, "orchestrator_addr": "0.0.0.0:0", "env_manager_addr": "0.0.0.0:0"}
    async with AgentInfra.start(services=[], config=config) as infra:
        assert TOKEN not in repr(infra)
        o, e, h, r = (
            pb[f"{n}_pb2"] for n in ("orchestrator_v1", "env_manager_v1", "health", "reflection")
        )
        port = infra.orchestrator_addr.rpartition(":")[2]
        env_port = infra.env_manager_addr.rpartition(":")[2]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
            grpc.aio.insecure_channel(f"127.0.0.1:{env_port}") as env_ch,
        ):
            orch = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
            env = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(env_ch)
            good = [("authorization", f"Bearer {TOKEN}")]
            for metadata in (None, [("authorization", "Bearer wrong-token-0123456789")]):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await orch.SubmitTask(
                        o.SubmitTaskRequest(task_id="x", task_type="ping"), metadata=metadata
                    )
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as env_refused:
                    await env.GetResourceAvailability(
                        e.GetResourceAvailabilityRequest(), metadata=metadata
                    )
                assert env_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Refused on its headers: sending no request leaves grpcio no write to lose in a
            # race with the refusal (a lost write is reported as INTERNAL on the client side).
            reflection = pb["reflection_pb2_grpc"].ServerReflectionStub(ch).ServerReflectionInfo()
            assert await reflection.code() == grpc.StatusCode.UNAUTHENTICATED
            good_reflection = pb["reflection_pb2_grpc"].ServerReflectionStub(ch)
            async for answer in good_reflection.ServerReflectionInfo(
                iter([r.ServerReflectionRequest(list_services="")]), metadata=good
            ):
                assert answer.list_services_response.service
                break

            ok = await orch.SubmitTask(
                o.SubmitTaskRequest(task_id="x", task_type="ping"), metadata=good
            )
            assert ok.success
            assert (
                await env.GetResourceAvailability(e.GetResourceAvailabilityRequest(), metadata=good)
            ).cpu_cores > 0
            # Health checks stay open, for load balancers and probes.
            served = await pb["health_pb2_grpc"].HealthStub(ch).Check(h.HealthCheckRequest())
            assert served.status == h.HealthCheckResponse.SERVING

        # The Python client takes the token (the stack's own client knows it).
        assert (await infra.orchestrator_client.get_task_status("x")).task_id == "x"
        with pytest.raises(OrchestratorUnavailableError, match="refused"):
            await OrchestratorClient(
                port=int(port), token="wrong-token-0123456789"
            ).get_task_status("x")
        authed = OrchestratorClient(port=int(port), token=TOKEN)
        assert (await authed.get_task_status("x")).task_id == "x"
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_the_command_line_sends_the_token_and_never_shows_it(
    tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("DSPY_AGENT_TOKEN", TOKEN)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "0.0.0.0:0")
    monkeypatch.setenv("ENV_MANAGER_GRPC_ADDR", "0.0.0.0:0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-agent.toml").write_text(catalog_on_free_ports())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DSPY_AGENT, *args], capture_output=True, text=True, timeout=120)

    try:
        started = run("start", "--services", "redis")
        assert started.returncode == 0, started.stderr
        status = run("status", "--json")
        assert status.returncode == 0
        submitted = run("tasks", "submit", "ping", "--wait")
        assert submitted.returncode == 0 and "pong" in submitted.stdout
        shown = run("config", "show")
        outputs = [started, status, submitted, shown]
        assert all(TOKEN not in p.stdout + p.stderr for p in outputs)
        assert 'token = "(secret; not shown)"' in shown.stdout
        # Without the token, the daemon refuses.
        env = {k: v for k, v in os.environ.items() if k != "DSPY_AGENT_TOKEN"}
        refused = subprocess.run(
            [DSPY_AGENT, "tasks", "list", "--config", str(tmp_path / "dspy-agent.toml")],
            capture_output=True,
            text=True,
            env={
                **env,
                "ORCHESTRATOR_GRPC_ADDR": "127.0.0.1:0",
                "ENV_MANAGER_GRPC_ADDR": "127.0.0.1:0",
            },
        )
        assert refused.returncode == 1 and "token" in refused.stderr
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0
    log = Path(os.environ["DSPY_AGENT_STATE_DIR"]) / "daemon.log.1"
    assert TOKEN not in log.read_text()


def certificates(where: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1: (ca, cert, key)."""
    ca, ca_key = where / "ca.pem", where / "ca.key"
    cert, key, csr = where / "cert.pem", where / "key.pem", where / "cert.csr"
    ext = where / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=test CA"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [
            "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext,
        ],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


async def test_tls_round_trip(pb: dict[str, Any], tmp_path: Path) -> None:
    ca, cert, key = certificates(tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.key"):
        AgentInfra.start(services=[], config={"tls": {"cert": str(cert)}})
    tls = {"cert": str(cert), "key": str(key), "ca": str(ca)}
    config = {"tls": tls, "orchestrator_addr": "127.0.0.1:0"}
    async with AgentInfra.start(services=[], config=config) as infra:
        o, h = pb["orchestrator_v1_pb2"], pb["health_pb2"]
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()),
            grpc.access_token_call_credentials(infra.token or ""),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(infra.orchestrator_addr, credentials, options) as ch:
            served = await pb["health_pb2_grpc"].HealthStub(ch).Check(h.HealthCheckRequest())
            assert served.status == h.HealthCheckResponse.SERVING
            stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
            ok = await stub.SubmitTask(o.SubmitTaskRequest(task_id="tls", task_type="ping"))
            assert ok.success
        # Plain text is not understood.
        async with grpc.aio.insecure_channel(infra.orchestrator_addr) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await (
                    pb["health_pb2_grpc"].HealthStub(plain).Check(h.HealthCheckRequest(), timeout=5)
                )
        assert (
            await infra.orchestrator_client.wait_for_task("tls", timeout=10)
        ).result_payload == b"pong"
        port = int(infra.orchestrator_addr.rpartition(":")[2])
        client = OrchestratorClient(port=port, tls_ca=ca)
        assert (await client.get_task_status("tls")).task_id == "tls"
        # A plain-text client fails (how exactly depends on where the handshake breaks).
        with pytest.raises(InfraError):
            await OrchestratorClient(port=port).get_task_status("tls")
        # A client refuses a server certificate from another CA, and one for another name.
        (tmp_path / "other").mkdir()
        other_ca, _, _ = certificates(tmp_path / "other")
        for wrong in (
            OrchestratorClient(port=port, tls_ca=other_ca),
            OrchestratorClient(port=port, tls_ca=ca, server_name="other.example"),
        ):
            with pytest.raises(OrchestratorUnavailableError):
                await wrong.get_task_status("tls")
            assert await wrong.health() is False
        # The HTTP port speaks HTTPS with the same certificate, and refuses plain HTTP.
        trusted = ssl.create_default_context(cafile=str(ca))
        http_port = (infra.http_addr or "").rpartition(":")[2]
        https = f"https://localhost:{http_port}"
        with urllib.request.urlopen(f"{https}/healthz", context=trusted, timeout=10) as r:
            assert r.read() == b"ok\n"
        scrape = urllib.request.Request(
            f"{https}/metrics", headers={"Authorization": f"Bearer {infra.token}"}
        )
        with urllib.request.urlopen(scrape, context=trusted, timeout=10) as r:
            assert b"dspy_agent_build_info" in r.read()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(
                f"{https}/healthz",
                context=ssl.create_default_context(cafile=str(other_ca)),
                timeout=10,
            )


SECRET_SERVICE = """
catalog = false
[services.web]
image = "{image}"
pull = "never"
ports = ["0:8000"]
env = {{ PORTS = "8000", API_KEY = "{secret}" }}
secret_env = ["API_KEY"]
command = ["sh", "-c", "echo starting with key=$API_KEY; echo $API_KEY >&2; {then}"]
stop_timeout = "2s"
[services.web.healthcheck]
type = "http"
path = "/health"
start_period = "20s"
"""


async def test_a_service_that_prints_its_secret_shows_stars(
    project: str, caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="dspy_agent_infra")
    secret = f"sk-{uuid.uuid4().hex}"

    def printing(then: str) -> dict[str, Any]:
        return http_service(
            env={"API_KEY": secret},
            secret_env=["API_KEY"],
            command=["sh", "-c", f"echo starting with key=$API_KEY; echo $API_KEY >&2; {then}"],
        )

    # A start that fails: its error and its log lines show the line, with stars for the secret.
    with pytest.raises(ServiceStartError) as failed:
        async with AgentInfra.start(
            project=project, services=["web"], config={"services": {"web": printing("exit 1")}}
        ):
            pass
    shown = str(failed.value) + failed.value.reason + failed.value.logs
    assert "starting with key=***" in failed.value.logs and "key=***" in str(failed.value)
    assert secret not in shown
    # A running one: it has the value; its logs, status and the dashboard show stars.
    async with AgentInfra.start(
        project=project, services=["web"], config={"services": {"web": printing("exec /serve")}}
    ) as infra:
        container = infra.service("web").container_id or ""
        assert f"API_KEY={secret}" in inspect(container)["Config"]["Env"]
        assert docker("exec", container, "sh", "-c", "echo $API_KEY").strip() == secret
        assert secret in docker("logs", container), "the container did print it"
        logs = await infra.logs("web", tail=50)
        assert "starting with key=***" in logs and secret not in logs
        status = await infra.status()
        shown = repr(infra.services) + repr(status) + str(infra.env) + repr(infra)
        assert secret not in shown + "".join(s.message for s in status.values())
        bearer = {"Authorization": f"Bearer {infra.token}"}
        base = f"http://{infra.http_addr}/api/services/web"
        with urllib.request.urlopen(
            urllib.request.Request(f"{base}/logs?tail=50", headers=bearer), timeout=10
        ) as r:
            page = r.read().decode()
        assert "starting with key=***" in page and secret not in page
        with urllib.request.urlopen(
            urllib.request.Request(f"{base}/logs/stream", headers=bearer), timeout=10
        ) as r:
            streamed = b""
            while b"key=***" not in streamed:
                streamed += r.read1(4096)
        assert secret.encode() not in streamed
    assert caplog.records and secret not in caplog.text

    # The command line: a failing start, then `logs` of a running one.
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "dspy-agent.toml"
    config.write_text(SECRET_SERVICE.format(image=BUSYBOX, secret=secret, then="exit 1"))
    try:
        refused = subprocess.run([DSPY_AGENT, "start"], capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "key=***" in refused.stderr, refused.stderr
        assert secret not in refused.stdout + refused.stderr
        config.write_text(SECRET_SERVICE.format(image=BUSYBOX, secret=secret, then="exec /serve"))
        started = subprocess.run([DSPY_AGENT, "start"], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        cli_logs = subprocess.run(
            [DSPY_AGENT, "logs", "--service", "web"], capture_output=True, text=True, timeout=60
        )
        assert "starting with key=***" in cli_logs.stdout + cli_logs.stderr, cli_logs
        assert secret not in cli_logs.stdout + cli_logs.stderr
    finally:
        subprocess.run([DSPY_AGENT, "stop"], capture_output=True, text=True, timeout=60)
    daemon_log = "".join(
        p.read_text() for p in Path(os.environ["DSPY_AGENT_STATE_DIR"]).glob("daemon.log*")
    )
    assert secret not in daemon_log


def test_the_daemon_speaks_tls(
    tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = certificates(tmp_path)
    monkeypatch.setenv("DSPY_AGENT_PROJECT", project)
    monkeypatch.setenv("ORCHESTRATOR_GRPC_ADDR", "127.0.0.1:0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-agent.toml").write_text(
        catalog_on_free_ports() + f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n'
    )
    try:
        started = subprocess.run(
            [DSPY_AGENT, "start", "--services", "redis"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr
        done = subprocess.run(
            [DSPY_AGENT, "tasks", "submit", "ping", "--wait"], capture_output=True, text=True
        )
        state = Path(os.environ["DSPY_AGENT_STATE_DIR"])
        logs = "".join(p.read_text() for p in state.glob("daemon.log*"))
        assert done.returncode == 0 and "pong" in done.stdout, (done.stderr, logs)
    finally:
        stopped = subprocess.run([DSPY_AGENT, "stop"], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr


async def test_no_service_mounts_an_engine_socket_or_gets_privilege(
    project: str, tmp_path: Path
) -> None:
    # The Engine's socket, bind-mounted to a folder of its own under a name no list knows: the
    # stack talks to it there, and no service may mount that folder.
    folder = tmp_path / "engsock"
    folder.mkdir()
    socket_path = folder / "engine.socket"
    socket_path.touch()
    subprocess.run(["mount", "--bind", "/var/run/docker.sock", str(socket_path)], check=True)
    try:
        docker_host = f"unix://{socket_path}"

        async def start(web: dict[str, Any]) -> None:
            async with AgentInfra.start(
                project=project,
                services=["web"],
                docker_host=docker_host,
                config={"services": {"web": web}},
            ) as infra:
                assert infra.service("web").status == "healthy"

        hostile = {
            f"{folder}:/eng": str(socket_path),
            "/run/user/0:/xdg": "/run/user",
            "/run/containerd:/containerd": "/run/containerd",
            "/:/host": "docker.sock",
            "/var/run:/host-run": "docker.sock",
        }
        for volume, named in hostile.items():
            with pytest.raises(ConfigError) as refused:
                await start(http_service(volumes=[volume]))
            message = str(refused.value)
            assert "services.web.volumes" in message and named in message, message
            assert "allow_docker_socket" in message
        for caps in (["ALL"], ["SYS_ADMIN"], ["NET_ADMIN", "CAP_SYS_MODULE"]):
            with pytest.raises(ConfigError, match=r"services\.web\.cap_add.*allow_privileged"):
                await start(http_service(cap_add=caps))
        assert containers(project) == []
        # Said on purpose, it runs: the stack reaches its Engine through that socket, and the
        # container sees it (which is why it is refused otherwise).
        async with AgentInfra.start(
            project=project,
            services=["web"],
            docker_host=docker_host,
            config={
                "services": {
                    "web": http_service(volumes=[f"{folder}:/eng"], allow_docker_socket=True)
                }
            },
        ) as infra:
            container = infra.service("web").container_id or ""
            assert "engine.socket" in docker("exec", container, "ls", "/eng")
    finally:
        subprocess.run(["umount", str(socket_path)], check=False)


HOSTILE_COMPOSE = """
services:
  socket-folder:
    image: busybox
    volumes: ["/var/run:/host-run"]
  rootless:
    image: busybox
    volumes: ["/run/user/1000:/xdg"]
  everything:
    image: busybox
    cap_add: [ALL]
  admin:
    image: busybox
    cap_add: [SYS_ADMIN]
  host-root:
    image: busybox
    volumes: ["/:/host"]
  privileged:
    image: busybox
    privileged: true
"""


def test_importing_a_hostile_compose_file_names_each_refusal(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text(HOSTILE_COMPOSE)
    run = subprocess.run(
        [DSPY_AGENT, "import", "compose.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert not (tmp_path / "dspy-agent.toml").exists()
    for refusal in (
        "services.socket-folder.volumes",
        "services.rootless.volumes",
        "services.everything.cap_add",
        "services.admin.cap_add",
        "services.host-root.volumes",
    ):
        assert refusal in run.stderr, (refusal, run.stderr)
    assert "privileged" in run.stderr


async def test_a_port_other_machines_reach_without_tls_is_warned_of_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dspy_agent_infra")
    config = {"orchestrator_addr": "0.0.0.0:0", "env_manager_addr": "127.0.0.1:0"}
    async with AgentInfra.start(services=[], config=config) as infra:
        warned = [r.getMessage() for r in caplog.records if "plain text" in r.getMessage()]
        assert len(warned) == 1, warned
        port = infra.orchestrator_addr.rpartition(":")[2]
        assert f"0.0.0.0:{port}" in warned[0] and "[tls]" in warned[0]
        assert infra.env_manager_addr not in warned[0]
    caplog.clear()
    async with AgentInfra.start(services=[], config={"orchestrator_addr": "127.0.0.1:0"}):
        assert not [r for r in caplog.records if "plain text" in r.getMessage()]
