"""``AgentInfra``: the agent's service stack as an async context manager."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from ._bridge import Bridge
from ._native import Core, ServiceInfo, SubmitResponse, Task, TaskInfo, TaskWatch
from ._tasks import (
    OrchestratorClient,
    Payload,
    check_metadata,
    encode_payload,
    iterate,
)
from .errors import InfraError, UnknownServiceError

__all__ = ["AgentInfra"]

_log = logging.getLogger("dspy_agent_infra")
_T = TypeVar("_T")
_H = TypeVar("_H", bound=Callable[[Task], Any])
# Plain (not async) handlers run at once up to this many, as many as the queue's default
# concurrency per type.
_SYNC_HANDLER_THREADS = 64


async def _finish(awaitable: Awaitable[_T]) -> _T:
    """Awaits cleanup to the end even if the caller is cancelled meanwhile, then re-raises
    the cancellation: containers are never left behind half-stopped."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class AgentInfra:
    """The services a DSPy agent needs, brought up in dependency order with real health checks.

    ``AgentInfra.start()`` is synchronous and only reads the configuration; entering the context
    brings the stack up and leaving it stops and removes the containers (named volumes are kept)
    unless ``keep_running`` is set::

        async with AgentInfra.start() as infra:
            print(infra.env["REDIS_URL"])
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self._keep_running = core.keep_running
        self._client: OrchestratorClient | None = None
        self._handlers: dict[str, tuple[Callable[[Task], Any], bool]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._runs: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bridge = Bridge(core, self._start_run, self._cancel_run)

    @classmethod
    def start(
        cls,
        *,
        services: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        project: str | None = None,
        docker_host: str | None = None,
        backend: str | None = None,
        keep_running: bool | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        dspy_agent_cli_path: str | os.PathLike[str] | None = None,
    ) -> AgentInfra:
        """Reads the configuration and returns the (not yet started) stack.

        Layers, lowest first: the built-in catalog, ``dspy-agent.toml`` (or ``config_file``, or
        ``$DSPY_AGENT_CONFIG``), environment variables, then these arguments. ``services``
        chooses which services run (their dependencies come along); ``[]`` runs none and needs
        no Docker Engine. ``config`` is a mapping with the same shape as the TOML file.
        ``backend`` is ``"docker"`` (the default: containers on one Engine) or ``"swarm"``
        (Swarm services on the swarm whose manager ``docker_host`` is).
        ``dspy_agent_cli_path`` is accepted for code written against the earlier design and
        ignored: the core is built into this package.

        Raises :class:`~dspy_agent_infra.errors.ConfigError` naming the field at fault.
        """
        if dspy_agent_cli_path is not None:
            warnings.warn(
                "dspy_agent_cli_path is ignored: the core is built into dspy_agent_infra",
                DeprecationWarning,
                stacklevel=2,
            )
        if services is not None and (
            isinstance(services, str) or not all(isinstance(s, str) for s in services)
        ):
            raise TypeError("services must be a list of service names, for example ['redis']")
        core = Core(
            services=list(services) if services is not None else None,
            config=config,
            config_file=config_file,
            project=project,
            docker_host=docker_host,
            backend=backend,
            keep_running=keep_running,
            state_dir=state_dir,
        )
        return cls(core)

    async def __aenter__(self) -> AgentInfra:
        self._loop = asyncio.get_running_loop()
        self._bridge.attach(self._loop)
        try:
            await self._bridge.reply(self._core.start_nowait())
            if self._core.attached:
                _log.info(
                    "attached to the running stack of project %r at %s",
                    self.project,
                    self.orchestrator_addr,
                )
        except BaseException:
            # Failure, Ctrl-C or cancellation: remove whatever the start created.
            try:
                await _finish(self._bridge.reply(self._core.abort_nowait()))
            finally:
                self._bridge.detach("the stack did not start")
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await _finish(self._bridge.reply(self._core.stop_nowait(self._keep_running)))
        finally:
            self._bridge.detach("the stack stopped before the call was answered")
            for run in list(self._runs.values()):
                run.cancel()
            if self._executor is not None:
                # Handlers still running finish on their own; the interpreter waits for them.
                self._executor.shutdown(wait=False)
                self._executor = None

    def __enter__(self) -> None:
        raise TypeError(
            "AgentInfra is an async context manager: use `async with AgentInfra.start() as infra:`"
        )

    def __exit__(self, *exc: object) -> None:
        """Never reached: ``__enter__`` refuses."""

    def __await__(self) -> Any:
        raise TypeError(
            "AgentInfra.start() is not awaited: use `async with AgentInfra.start() as infra:`"
        )

    def _start_run(self, token: int, task: Task) -> None:
        assert self._loop is not None
        # The run starts on the loop's next turn, after it is registered here.
        self._runs[token] = self._loop.create_task(self._run(token, task))

    def _cancel_run(self, token: int) -> None:
        running = self._runs.get(token)
        if running is not None:
            running.cancel()

    async def _run(self, token: int, task: Task) -> None:
        handler, is_async = self._handlers[task.task_type]
        try:
            if is_async:
                value = await handler(task)
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        _SYNC_HANDLER_THREADS, thread_name_prefix="dspy-agent-handler"
                    )
                assert self._loop is not None
                value = await self._loop.run_in_executor(self._executor, handler, task)
        except asyncio.CancelledError:
            self._core.complete(token, None, "the handler was cancelled")
            raise
        except Exception as e:
            self._core.complete(
                token, None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            )
        else:
            self._core.complete(token, value)
        finally:
            self._runs.pop(token, None)

    @property
    def project(self) -> str:
        """The project name every container of this stack is labelled with."""
        return self._core.project

    @property
    def attached(self) -> bool:
        """Whether this stack is one another process runs (a ``dspy-agent start`` daemon, another
        agent), found at the configured orchestrator address when entering the context. An
        attached stack is used over gRPC and keeps running when the context is left; task
        handlers registered here serve its tasks from this process."""
        return self._core.attached

    @property
    def keep_running(self) -> bool:
        """Whether leaving the context leaves the containers running (for a warm next start)."""
        return self._keep_running

    @keep_running.setter
    def keep_running(self, value: bool) -> None:
        self._keep_running = value

    @property
    def services(self) -> dict[str, ServiceInfo]:
        """Each service by name, as last seen (``await status()`` asks the Engine again)."""
        return {s.name: s for s in self._core.services()}

    def service(self, name: str) -> ServiceInfo:
        """One service by name; raises :class:`UnknownServiceError` for a name the stack lacks."""
        services = self.services
        if name not in services:
            known = ", ".join(services) or "none"
            raise UnknownServiceError(
                f"unknown service {name!r}; this stack runs: {known}", service=name
            )
        return services[name]

    @property
    def env(self) -> dict[str, str]:
        """Addresses of the services as environment variables for the agent: for each service
        ``NAME_HOST``, ``NAME_PORT`` and ``NAME_URL`` (e.g. ``REDIS_URL``)."""
        return self._core.env()

    async def status(self) -> dict[str, ServiceInfo]:
        """Each service with its state checked against the Docker Engine now."""
        services: list[ServiceInfo] = await self._bridge.reply(self._core.status_services_nowait())
        return {s.name: s for s in services}

    async def logs(self, name: str, tail: int = 100) -> str:
        """The last ``tail`` lines of a service's output (stdout and stderr)."""
        if tail < 0:
            raise ValueError("tail must be 0 or more")
        text: str = await self._bridge.reply(self._core.logs_nowait(name, tail))
        return text

    async def restart(self, name: str) -> ServiceInfo:
        """Restarts a service and waits until it is healthy again."""
        info: ServiceInfo = await self._bridge.reply(self._core.restart_nowait(name))
        return info

    @property
    def orchestrator_addr(self) -> str:
        """``host:port`` of the orchestrator gRPC service (the real port when 0 was asked for)."""
        return self._core.orchestrator_addr

    @property
    def env_manager_addr(self) -> str:
        """``host:port`` of the env-manager gRPC service (the real port when 0 was asked for)."""
        return self._core.env_manager_addr

    @property
    def http_addr(self) -> str | None:
        """``host:port`` of the HTTP port: ``/metrics`` (Prometheus text format, behind the token
        as ``Authorization: Bearer TOKEN``) and ``/healthz``. ``None`` when another process runs
        the stack."""
        return self._core.http_addr

    @property
    def token(self) -> str | None:
        """The token both gRPC ports require, sent as the metadata ``authorization: Bearer
        TOKEN`` (``None`` when ``allow_remote_without_token`` opened them). Clients of the same
        user on this machine find it by themselves; give it to the others."""
        return self._core.token

    @property
    def orchestrator_client(self) -> OrchestratorClient:
        """A gRPC client of this stack's orchestrator, as other processes would use it."""
        if self._client is None:
            host, _, port = self.orchestrator_addr.rpartition(":")
            trust = self._core.tls_trust
            self._client = OrchestratorClient(
                host=host.strip("[]"),
                port=int(port),
                token=self._core.token,
                tls_ca=trust[0] if trust else None,
                server_name=trust[1] if trust else None,
            )
        return self._client

    def task_handler(self, task_type: str) -> Callable[[_H], _H]:
        """Serves ``task_type`` with the decorated function, which receives a
        :class:`~dspy_agent_infra.Task` and returns bytes, str or a JSON-able value (the result
        payload); an exception fails the attempt with its message. Coroutine functions run on
        the event loop that entered the stack, plain functions in a worker thread::

            @infra.task_handler("rl_training")
            async def train(task: Task) -> dict[str, float]:
                config = task.json()
                ...
        """

        def register(handler: _H) -> _H:
            self._core.register_handler(task_type)
            self._handlers[task_type] = (handler, inspect.iscoroutinefunction(handler))
            return handler

        return register

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
        """Queues a task durably; returns once it is on disk. The payload is sent as bytes
        (bytes as they are, str as UTF-8, anything else as JSON). Resubmitting the same id with
        the same content is harmless (``duplicate`` is True); with other content it raises
        :class:`~dspy_agent_infra.errors.TaskConflictError`."""
        token = self._core.submit_nowait(
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
        """The task's status, result payload, error and attempts."""
        info: TaskInfo = await self._bridge.reply(self._core.status_nowait(task_id))
        return info

    async def wait_for_task(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Waits until the task is COMPLETED, FAILED or CANCELLED; ``TimeoutError`` after
        ``timeout`` seconds."""
        info: TaskInfo | None = await self._bridge.reply(self._core.wait_nowait(task_id, timeout))
        if info is None:
            raise TimeoutError(f"task {task_id!r} did not finish within {timeout} s")
        return info

    async def cancel_task(self, task_id: str) -> bool:
        """Cancels a PENDING task at once and a RUNNING one by cancelling its handler; False
        when the task had already finished."""
        answer: tuple[bool, TaskInfo | None] = await self._bridge.reply(
            self._core.cancel_nowait(task_id)
        )
        return answer[0]

    async def watch_tasks(
        self, task_ids: list[str] | None = None, *, include_current: bool = True
    ) -> AsyncIterator[TaskInfo]:
        """Every state change of the given tasks (of all tasks when None), as it happens."""
        watch: TaskWatch = await self._bridge.reply(
            self._core.watch_nowait(list(task_ids or []), include_current)
        )
        async for info in iterate(self._bridge, watch):
            yield info

    def __repr__(self) -> str:
        try:
            names = ", ".join(self.services)
        except InfraError:
            names = ", ".join(self._core.planned_services) + " (not running)"
        return f"AgentInfra(project={self.project!r}, services=[{names}])"
