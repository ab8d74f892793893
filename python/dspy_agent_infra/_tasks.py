"""Tasks: ``TaskStatus``, payload encoding and ``OrchestratorClient``."""

from __future__ import annotations

import asyncio
import enum
import json
import os
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Union

from ._bridge import Bridge
from ._native import GrpcClient, SubmitResponse, TaskInfo, TaskWatch
from .errors import InvalidTaskError

__all__ = ["OrchestratorClient", "Payload", "TaskStatus"]

#: What a task payload may be: bytes as they are, str as UTF-8, anything else as JSON.
Payload = Union[
    bytes, bytearray, memoryview, str, Mapping[str, Any], list[Any], int, float, bool, None
]


class TaskStatus(str, enum.Enum):
    """The state of a task."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        """COMPLETED, FAILED and CANCELLED do not change any more."""
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def encode_payload(payload: Payload) -> bytes:
    """Bytes as they are, str as UTF-8, None as empty, anything else as JSON."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    if payload is None:
        return b""
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise InvalidTaskError(f"payload: {e}; pass bytes, str or a JSON-serialisable value") from e


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidTaskError("metadata: keys and values must be strings")
    return dict(metadata)


async def iterate(bridge: Bridge, watch: TaskWatch) -> AsyncIterator[TaskInfo]:
    """The watch's changes, each delivered through ``bridge`` (the one that made the watch)."""
    while True:
        info: TaskInfo | None = await bridge.reply(watch.next_nowait())
        if info is None:
            return
        yield info


async def wait_final(
    bridge: Bridge, watch: TaskWatch, task_id: str, timeout: float | None
) -> TaskInfo:
    async def first_final() -> TaskInfo:
        async for info in iterate(bridge, watch):
            if info.task_id == task_id and info.status.is_final:
                return info
        raise InvalidTaskError(f"the watch on task {task_id!r} ended before it finished")

    try:
        return await asyncio.wait_for(first_final(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"task {task_id!r} did not finish within {timeout} s") from None


class OrchestratorClient:
    """An async client of any running orchestrator (``AgentInfra.start()`` or the
    ``dspy-agent`` daemon), from any Python process, over gRPC::

        client = OrchestratorClient(host="localhost", port=50052)
        await client.submit_task("task-1", "inference", {"prompt": "hello"})
        status = await client.get_task_status("task-1")

    Connecting is lazy: an unreachable orchestrator raises
    :class:`~dspy_agent_infra.errors.OrchestratorUnavailableError` on the first call. An
    orchestrator that requires a token gets ``token`` (default: ``$DSPY_AGENT_TOKEN``, else the
    token of this user's stack serving that port on this machine, found by itself); one that
    speaks TLS is verified against ``tls_ca``, a PEM file or its bytes (default:
    ``$DSPY_AGENT_TLS_CA``), expecting ``server_name`` (default ``localhost``) in its certificate.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 50052,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | bytes | None = None,
        server_name: str | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not from 1 to 65535")
        if token is None:
            token = os.environ.get("DSPY_AGENT_TOKEN") or None
        if tls_ca is None:
            tls_ca = os.environ.get("DSPY_AGENT_TLS_CA") or None
        if tls_ca is not None and not isinstance(tls_ca, bytes):
            with open(tls_ca, "rb") as f:
                tls_ca = f.read()
        self._grpc = GrpcClient(host, port, token, tls_ca, server_name)
        self._bridge = Bridge(self._grpc)

    def _attach(self) -> None:
        self._bridge.attach(asyncio.get_running_loop())

    @property
    def target(self) -> str:
        return self._grpc.target

    async def submit_task(
        self,
        task_id: str,
        task_type: str,
        payload: Payload = None,
        metadata: Mapping[str, str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        max_retries: int = 0,
    ) -> SubmitResponse:
        """Queues a task; resubmitting the same id with the same content is harmless."""
        self._attach()
        token = self._grpc.submit_nowait(
            task_id,
            task_type,
            encode_payload(payload),
            check_metadata(metadata),
            priority,
            timeout,
            max_retries,
        )
        response: SubmitResponse = await self._bridge.reply(token)
        return response

    async def get_task_status(self, task_id: str) -> TaskInfo:
        self._attach()
        info: TaskInfo = await self._bridge.reply(self._grpc.status_nowait(task_id))
        return info

    async def wait_for_task(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Waits until the task is COMPLETED, FAILED or CANCELLED; ``TimeoutError`` after
        ``timeout`` seconds."""
        watch = await self._watch([task_id], True)
        return await wait_final(self._bridge, watch, task_id, timeout)

    async def cancel_task(self, task_id: str) -> bool:
        """Cancels the task; False when it had already finished."""
        self._attach()
        answer: tuple[bool, TaskInfo | None] = await self._bridge.reply(
            self._grpc.cancel_nowait(task_id)
        )
        return answer[0]

    async def list_tasks(
        self,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """Tasks in submission order, at most ``limit``."""
        self._attach()
        found: list[TaskInfo] = []
        token: str | None = None
        while len(found) < limit:
            page: list[TaskInfo]
            page, token = await self._bridge.reply(
                self._grpc.list_nowait(
                    status.value if status else None,
                    task_type,
                    min(1000, limit - len(found)),
                    token,
                )
            )
            found.extend(page)
            if token is None:
                break
        return found

    async def watch_tasks(
        self, task_ids: list[str] | None = None, *, include_current: bool = True
    ) -> AsyncIterator[TaskInfo]:
        """Every state change of the given tasks (of all tasks when None), as it happens."""
        watch = await self._watch(list(task_ids or []), include_current)
        async for info in iterate(self._bridge, watch):
            yield info

    async def _watch(self, task_ids: list[str], include_current: bool) -> TaskWatch:
        self._attach()
        watch: TaskWatch = await self._bridge.reply(
            self._grpc.watch_nowait(task_ids, include_current)
        )
        return watch

    async def metrics(self) -> dict[str, Any]:
        """Task counts: ``by_status`` (stored tasks per state), and since the orchestrator
        started ``submitted``, ``completed``, ``failed``, ``cancelled``; ``running`` now; the
        served ``task_types``."""
        self._attach()
        (
            by_status,
            submitted,
            completed,
            failed,
            cancelled,
            running,
            types,
        ) = await self._bridge.reply(self._grpc.metrics_nowait())
        return {
            "by_status": by_status,
            "submitted": submitted,
            "completed": completed,
            "failed": failed,
            "cancelled": cancelled,
            "running": running,
            "task_types": types,
        }

    async def health(self) -> bool:
        """Whether an orchestrator answers at this address and says it is healthy; False when
        nothing answers (other errors, such as a refused token, are raised)."""
        self._attach()
        answer: tuple[bool, str, str] = await self._bridge.reply(self._grpc.health_nowait())
        return answer[0]

    async def close(self) -> None:
        """Stops delivering answers on the current event loop (calls still waiting fail); the
        channel itself closes with the client."""
        self._bridge.detach("the client was closed before the call was answered")

    async def __aenter__(self) -> OrchestratorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"OrchestratorClient({self.target!r})"
