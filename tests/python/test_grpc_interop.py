"""The orchestrator port driven by grpcio with stubs generated from proto/ at test time: a
client nobody here wrote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import grpc
from dspy_agent_infra import AgentInfra, Task
from helpers import credentials


@pytest.fixture
async def channel() -> AsyncIterator[tuple[AgentInfra, grpc.aio.Channel]]:
    async with AgentInfra.start(services=[], config={"orchestrator_addr": "127.0.0.1:0"}) as infra:

        @infra.task_handler("hang")
        async def hang(task: Task) -> None:
            await asyncio.sleep(3600)

        async with grpc.aio.secure_channel(
            infra.orchestrator_addr,
            credentials(infra.token),
            options=[("grpc.max_send_message_length", 64 << 20)],
        ) as ch:
            yield infra, ch


async def test_submit_status_cancel_and_stream(
    pb: dict[str, Any], channel: tuple[AgentInfra, grpc.aio.Channel]
) -> None:
    _, ch = channel
    o = pb["orchestrator_v1_pb2"]
    stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)

    stream = stub.StreamTaskResults(o.StreamTaskResultsRequest(task_ids=["e1"]))
    # The server answers with headers once it follows the task: only then is every change seen.
    await stream.initial_metadata()
    submitted = await stub.SubmitTask(
        o.SubmitTaskRequest(task_id="e1", task_type="echo", payload=b"hi", metadata={"k": "v"})
    )
    assert submitted.success and not submitted.duplicate
    states = []
    async for info in stream:
        states.append(o.TaskState.Name(info.status))
        if info.status == o.COMPLETED:
            assert info.result_payload == b"hi" and dict(info.metadata) == {"k": "v"}
            break
    stream.cancel()
    assert states == ["PENDING", "RUNNING", "COMPLETED"]

    again = await stub.SubmitTask(
        o.SubmitTaskRequest(task_id="e1", task_type="echo", payload=b"hi", metadata={"k": "v"})
    )
    assert again.duplicate
    status = await stub.GetTaskStatus(o.GetTaskStatusRequest(task_id="e1"))
    assert status.status == o.COMPLETED and status.attempts == 1

    await stub.SubmitTask(o.SubmitTaskRequest(task_id="h1", task_type="hang"))
    current = stub.StreamTaskResults(
        o.StreamTaskResultsRequest(task_ids=["h1"], include_current=True)
    )
    async for info in current:
        if info.status == o.RUNNING:
            break
    cancelled = await stub.CancelTask(o.CancelTaskRequest(task_id="h1"))
    assert cancelled.cancelled and cancelled.task.status == o.CANCELLED
    # The current state and a change made meanwhile may both show RUNNING; then CANCELLED.
    async for info in current:
        assert info.status in (o.RUNNING, o.CANCELLED)
        if info.status == o.CANCELLED:
            break
    current.cancel()

    listed = await stub.ListTasks(o.ListTasksRequest(page_size=1))
    assert [t.task_id for t in listed.tasks] == ["e1"] and listed.next_page_token == "e1"
    rest = await stub.ListTasks(o.ListTasksRequest(page_size=10, page_token=listed.next_page_token))
    assert [t.task_id for t in rest.tasks] == ["h1"] and rest.next_page_token == ""
    metrics = await stub.GetMetrics(o.GetMetricsRequest())
    assert metrics.completed == 1 and metrics.cancelled == 1 and "echo" in metrics.task_types
    assert (await stub.Health(o.HealthRequest())).healthy


async def test_errors_map_to_status_codes(
    pb: dict[str, Any], channel: tuple[AgentInfra, grpc.aio.Channel]
) -> None:
    _, ch = channel
    o = pb["orchestrator_v1_pb2"]
    stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)

    async def code_of(call: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        return err.value.code()

    assert (
        await code_of(stub.GetTaskStatus(o.GetTaskStatusRequest(task_id="nope")))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(stub.SubmitTask(o.SubmitTaskRequest(task_id="", task_type="echo")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(stub.SubmitTask(o.SubmitTaskRequest(task_id="x", task_type="nosuch")))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    await stub.SubmitTask(o.SubmitTaskRequest(task_id="c", task_type="echo", payload=b"1"))
    assert (
        await code_of(
            stub.SubmitTask(o.SubmitTaskRequest(task_id="c", task_type="echo", payload=b"2"))
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        await code_of(stub.ListTasks(o.ListTasksRequest(page_size=5000)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(stub.ListTasks(o.ListTasksRequest(status=99)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    big = o.SubmitTaskRequest(task_id="big", task_type="echo", payload=b"x" * (17 * 1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await stub.SubmitTask(big)
    # tonic reports an over-limit message as OUT_OF_RANGE, with the sizes in the text.
    assert too_big.value.code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    )
    assert "message" in (too_big.value.details() or "")

    # A task_id that is not UTF-8, sent as raw protobuf bytes (field 1 and field 2).
    raw = ch.unary_unary(
        "/orchestrator.v1.OrchestratorService/SubmitTask",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    bad = b"\x0a\x02\xff\xfe" + b"\x12\x04echo"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SubmitTaskRequest" in (refused.value.details() or "")
    assert "task_id" in (refused.value.details() or "")
    # Garbage that is not protobuf at all.
    assert await code_of(raw(b"\xff" * 64)) == grpc.StatusCode.INVALID_ARGUMENT

    # The server survived all of it.
    assert (await stub.Health(o.HealthRequest())).healthy


async def test_standard_health_service(
    pb: dict[str, Any], channel: tuple[AgentInfra, grpc.aio.Channel]
) -> None:
    _, ch = channel
    h = pb["health_pb2"]
    stub = pb["health_pb2_grpc"].HealthStub(ch)
    overall = await stub.Check(h.HealthCheckRequest(service=""))
    assert overall.status == h.HealthCheckResponse.SERVING
    named = await stub.Check(h.HealthCheckRequest(service="orchestrator.v1.OrchestratorService"))
    assert named.status == h.HealthCheckResponse.SERVING


async def test_reflection_lists_and_describes_services(
    pb: dict[str, Any], channel: tuple[AgentInfra, grpc.aio.Channel]
) -> None:
    _, ch = channel
    r = pb["reflection_pb2"]
    stub = pb["reflection_pb2_grpc"].ServerReflectionStub(ch)
    requests = [
        r.ServerReflectionRequest(list_services=""),
        r.ServerReflectionRequest(file_containing_symbol="orchestrator.v1.OrchestratorService"),
    ]
    answers = [answer async for answer in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"orchestrator.v1.OrchestratorService", "grpc.health.v1.Health"} <= names
    descriptor = answers[1].file_descriptor_response.file_descriptor_proto[0]
    assert b"SubmitTask" in descriptor and b"orchestrator.v1" in descriptor


async def test_grpcio_reflections_own_v1alpha_client_describes_both_services() -> None:
    """The official Python reflection client speaks v1alpha only (as grpcurl before 1.8.8)."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    def describe(addr: str, service: str, token: str | None) -> tuple[list[str], list[str]]:
        with grpc.secure_channel(addr, credentials(token)) as ch:
            database = ProtoReflectionDescriptorDatabase(ch)
            listed = list(database.get_services())
            found = DescriptorPool(database).FindServiceByName(service)
            return listed, [m.name for m in found.methods]

    ports = {"orchestrator_addr": "127.0.0.1:0", "env_manager_addr": "127.0.0.1:0"}
    async with AgentInfra.start(services=[], config=ports) as infra:
        for addr, service, method in [
            (infra.orchestrator_addr, "orchestrator.v1.OrchestratorService", "SubmitTask"),
            (infra.env_manager_addr, "env_manager.v1.EnvManagerService", "GetServicesStatus"),
        ]:
            listed, methods = await asyncio.to_thread(describe, addr, service, infra.token)
            assert service in listed and "grpc.health.v1.Health" in listed
            assert method in methods


async def test_a_worker_in_grpcio_serves_and_a_silent_one_loses_its_lease(
    pb: dict[str, Any], channel: tuple[AgentInfra, grpc.aio.Channel]
) -> None:
    infra, ch = channel
    o = pb["orchestrator_v1_pb2"]
    stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
    outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def sent() -> AsyncIterator[Any]:
        while True:
            yield await outbox.get()

    work = stub.Work(sent())
    hello = o.WorkerHello(task_types=["remote"], concurrency=1, name="grpcio", generation=7)
    await outbox.put(o.WorkerMessage(hello=hello))
    assert (await work.read()).registered.generation == 7

    await infra.submit_task("r1", "remote", b"in")
    lease = (await work.read()).task
    assert (lease.task_id, lease.payload, lease.attempt) == ("r1", b"in", 1)
    result = o.WorkResult(task_id="r1", attempt=1, success=True, result_payload=b"out")
    await outbox.put(o.WorkerMessage(result=result))
    done = await infra.wait_for_task("r1", timeout=10)
    assert done.result_payload == b"out"

    # Leased, then silence: no result and no heartbeat. When the lease runs out the worker is
    # dropped and the task is queued again, its attempt not used up.
    await infra.submit_task("r2", "remote", b"")
    assert (await work.read()).task.task_id == "r2"
    ended = await asyncio.wait_for(work.read(), 60)
    assert ended is grpc.aio.EOF
    back = await infra.get_task_status("r2")
    for _ in range(500):
        if back.status_name != "RUNNING":
            break
        await asyncio.sleep(0.01)
        back = await infra.get_task_status("r2")
    assert back.status_name == "PENDING" and back.attempts == 0
    assert "no heartbeat" in back.error
    work.cancel()


async def test_the_callers_trace_context_reaches_the_handler(pb: dict[str, Any]) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with AgentInfra.start(services=[]) as infra:
        seen: dict[str, dict[str, str]] = {}

        @infra.task_handler("traced")
        async def traced(task: Task) -> str:
            seen[task.task_id] = dict(task.metadata)
            return "ok"

        o = pb["orchestrator_v1_pb2"]
        async with grpc.aio.secure_channel(infra.orchestrator_addr, credentials(infra.token)) as ch:
            stub = pb["orchestrator_v1_pb2_grpc"].OrchestratorServiceStub(ch)
            request = o.SubmitTaskRequest(task_id="t", task_type="traced", metadata={"k": "v"})
            first = await stub.SubmitTask(
                request, metadata=[("traceparent", parent), ("tracestate", "vendor=1")]
            )
            assert not first.duplicate
            # A retried submit comes from another span of the caller: still the same task.
            retry = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"
            again = await stub.SubmitTask(request, metadata=[("traceparent", retry)])
            assert again.success and again.duplicate
            # What is not a W3C traceparent is not carried.
            await stub.SubmitTask(
                o.SubmitTaskRequest(task_id="u", task_type="traced"),
                metadata=[("traceparent", "not-a-trace")],
            )
        for task_id in ("t", "u"):
            await infra.wait_for_task(task_id, timeout=10)
        assert seen["t"] == {"k": "v", "traceparent": parent, "tracestate": "vendor=1"}
        assert seen["u"] == {}
