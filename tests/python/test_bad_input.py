"""Both gRPC ports against hostile input: random bytes on the socket, garbage and truncated
protobuf on every method, fields at their extremes, and floods of streams opened and dropped.
Afterwards both ports still answer, and nothing was lost."""

from __future__ import annotations

import asyncio
import random
import socket
from contextlib import suppress
from typing import Any

import grpc
from dspy_agent_infra import AgentInfra
from helpers import credentials


def methods(module: Any, service: str) -> list[tuple[str, bool, Any]]:
    """(full method path, server-streaming, request class) for every method of `service`."""
    desc = module.DESCRIPTOR.services_by_name[service]
    package = module.DESCRIPTOR.package
    return [
        (f"/{package}.{service}/{m.name}", m.server_streaming, getattr(module, m.input_type.name))
        for m in desc.methods
    ]


def decodes(request_class: Any, body: bytes) -> bool:
    try:
        request_class.FromString(body)
    except Exception:
        return False
    return True


def check_refusal(e: grpc.aio.AioRpcError, path: str, request_class: Any, body: bytes) -> None:
    """A body that is not a valid request is INVALID_ARGUMENT naming the message; a valid one
    may be refused for what it says, never with an internal failure or a dropped port."""
    where = f"{path} with {body[:16]!r}: {e.code()} {e.details()}"
    if decodes(request_class, body):
        assert e.code() not in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.UNAVAILABLE,
        ), where
        assert e.details(), where
    else:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, where
        assert f"not a valid {request_class.DESCRIPTOR.name}" in (e.details() or ""), where


def raw_garbage(addr: str, rng: random.Random) -> None:
    host, _, port = addr.rpartition(":")
    for size in (0, 1, 9, 24, 1000, 65536):
        # The server may reset the connection at once: that is the right answer.
        with socket.create_connection((host, int(port)), timeout=5) as s, suppress(OSError):
            s.sendall(bytes(rng.getrandbits(8) for _ in range(size)))
            # A truncated HTTP/2 preface, then nothing.
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n")


async def test_hostile_input_is_refused_and_the_ports_survive(pb: dict[str, Any]) -> None:
    rng = random.Random(7)
    async with AgentInfra.start(services=[], config={"orchestrator_addr": "127.0.0.1:0"}) as infra:
        targets = [
            (infra.orchestrator_addr, methods(pb["orchestrator_v1_pb2"], "OrchestratorService")),
            (infra.env_manager_addr, methods(pb["env_manager_v1_pb2"], "EnvManagerService")),
        ]
        for addr, _ in targets:
            await asyncio.to_thread(raw_garbage, addr, rng)

        o = pb["orchestrator_v1_pb2"]
        payloads = [
            b"",
            b"\xff" * 64,
            b"\x0a\xff\xff\xff\xff\x0f",  # a length far beyond the message
            o.SubmitTaskRequest(task_id="t", task_type="ping").SerializeToString()[:-1],
            bytes(rng.getrandbits(8) for _ in range(4096)),
        ]
        calls = 0
        for addr, all_methods in targets:
            async with grpc.aio.secure_channel(addr, credentials(infra.token)) as ch:
                for path, streaming, request_class in all_methods:
                    if path.endswith("/Work"):
                        continue  # a bidirectional stream; covered by the worker tests
                    for body in payloads:
                        calls += 1
                        if streaming:
                            call = ch.unary_stream(path)(body)
                            try:
                                await asyncio.wait_for(call.read(), 2)
                            except grpc.aio.AioRpcError as e:
                                check_refusal(e, path, request_class, body)
                            except TimeoutError:
                                # Still open: only a valid request is followed.
                                assert decodes(request_class, body), (path, body[:16])
                            call.cancel()
                        else:
                            try:
                                await asyncio.wait_for(ch.unary_unary(path)(body), 5)
                            except grpc.aio.AioRpcError as e:
                                check_refusal(e, path, request_class, body)
                            else:
                                assert decodes(request_class, body), (path, body[:16])
        assert calls > 50

        # Extremes in otherwise well-formed requests.
        async with grpc.aio.secure_channel(infra.orchestrator_addr, credentials(infra.token)) as ch:
            stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
            for request in (
                o.SubmitTaskRequest(task_id="x" * 100_000, task_type="ping"),
                o.SubmitTaskRequest(task_id="e0", task_type="p" * 5000),
                o.SubmitTaskRequest(task_id="e1\u0000", task_type="ping"),
                o.SubmitTaskRequest(task_id="e2", task_type="ping", priority=-(2**31)),
                o.SubmitTaskRequest(task_id="e3", task_type="ping", timeout_ms=2**64 - 1),
                o.SubmitTaskRequest(task_id="e4", task_type="ping", metadata={"": "x" * 70_000}),
                o.ListTasksRequest(page_size=2**32 - 1, page_token="\u00ff" * 300),
            ):
                try:
                    if isinstance(request, o.SubmitTaskRequest):
                        await stub.SubmitTask(request)
                    else:
                        await stub.ListTasks(request)
                except grpc.aio.AioRpcError as e:
                    assert e.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.OUT_OF_RANGE,
                    ), e.details()
                    assert e.details()

            # A flood of streams, opened and dropped.
            for _ in range(300):
                call = stub.StreamTaskResults(o.StreamTaskResultsRequest())
                call.cancel()
            env = pb["env_manager_v1_pb2"]
            async with grpc.aio.secure_channel(
                infra.env_manager_addr, credentials(infra.token)
            ) as env_ch:
                env_stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(env_ch)
                for _ in range(300):
                    env_stub.StreamHealth(env.StreamHealthRequest()).cancel()

            # Both ports still answer, and the queue still works.
            ok = await stub.SubmitTask(o.SubmitTaskRequest(task_id="after", task_type="ping"))
            assert ok.success
        done = await infra.wait_for_task("after", timeout=10)
        assert done.result_payload == b"pong"
        async with grpc.aio.secure_channel(
            infra.env_manager_addr, credentials(infra.token)
        ) as env_ch:
            env_stub = pb["env_manager_v1_pb2_grpc"].EnvManagerServiceStub(env_ch)
            assert (
                await env_stub.GetResourceAvailability(env.GetResourceAvailabilityRequest())
            ).cpu_cores > 0
