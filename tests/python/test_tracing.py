"""One trace from a gRPC submit to the handler's span, across processes: a stack in a process of
its own exports its spans over OTLP to a receiver this test runs (OpenTelemetry's own protocol
stubs, `opentelemetry-proto`), and its Python handler continues the trace with the OpenTelemetry
SDK (an in-memory exporter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import grpc
from dspy_agent_infra.pb.orchestrator import orchestrator_pb2, orchestrator_pb2_grpc
from helpers import credentials

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"

STACK = textwrap.dedent(
    """
    import asyncio, json, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from dspy_agent_infra import AgentInfra

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("handler")

    async def main():
        done = asyncio.Event()
        config = {"orchestrator_addr": "127.0.0.1:0"}
        async with AgentInfra.start(services=[], config=config) as infra:
            @infra.task_handler("traced")
            async def traced(task):
                parent = TraceContextTextMapPropagator().extract(dict(task.metadata))
                with tracer.start_as_current_span("handler", context=parent):
                    pass
                done.set()
                return "ok"

            print(json.dumps({"addr": infra.orchestrator_addr, "token": infra.token}), flush=True)
            await asyncio.wait_for(done.wait(), 60)
            await infra.wait_for_task("t", timeout=30)
        (span,) = memory.get_finished_spans()
        print(json.dumps({
            "trace_id": format(span.context.trace_id, "032x"),
            "parent": format(span.parent.span_id, "016x"),
        }), flush=True)

    asyncio.run(main())
    """
)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict[str, str]] = []

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        {
                            "service": service,
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                        }
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


def test_one_trace_from_the_grpc_submit_to_the_handlers_span(tmp_path: Path) -> None:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = tmp_path / "stack.py"
    script.write_text(STACK)
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "agent-under-test",
        "DSPY_AGENT_STATE_DIR": str(tmp_path / "state"),
    }
    stack = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert stack.stdout is not None
        ports = json.loads(stack.stdout.readline())
        with grpc.secure_channel(ports["addr"], credentials(ports["token"])) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            reply = stub.SubmitTask(
                orchestrator_pb2.SubmitTaskRequest(task_id="t", task_type="traced"),
                metadata=[("traceparent", f"00-{TRACE}-{CALLER_SPAN}-01")],
            )
            assert reply.success
        handler = json.loads(stack.stdout.readline())
        assert stack.wait(timeout=60) == 0
    finally:
        stack.kill()
        stack.wait()
    # The stack's spans are sent when it stops.
    deadline = time.monotonic() + 10
    while len(receiver.spans) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(None)
    by_name = {s["name"]: s for s in receiver.spans}
    submit, run = by_name["submit traced"], by_name["run traced"]
    assert submit["service"] == run["service"] == "agent-under-test"
    # One trace: the caller's span -> submit -> run -> the handler's span.
    assert submit["trace_id"] == run["trace_id"] == handler["trace_id"] == TRACE
    assert submit["parent"] == CALLER_SPAN
    assert run["parent"] == submit["span_id"]
    assert handler["parent"] == run["span_id"]
