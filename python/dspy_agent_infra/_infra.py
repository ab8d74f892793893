"""``AgentInfra``: the agent's service stack as an async context manager."""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ._native import Core, ServiceInfo
from .errors import InfraError, UnknownServiceError

__all__ = ["AgentInfra"]

_T = TypeVar("_T")


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

    @classmethod
    def start(
        cls,
        *,
        services: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        project: str | None = None,
        docker_host: str | None = None,
        keep_running: bool | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        dspy_agent_cli_path: str | os.PathLike[str] | None = None,
    ) -> AgentInfra:
        """Reads the configuration and returns the (not yet started) stack.

        Layers, lowest first: the built-in catalog, ``dspy-agent.toml`` (or ``config_file``, or
        ``$DSPY_AGENT_CONFIG``), environment variables, then these arguments. ``services``
        chooses which services run (their dependencies come along); ``[]`` runs none and needs
        no Docker Engine. ``config`` is a mapping with the same shape as the TOML file.
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
            keep_running=keep_running,
            state_dir=state_dir,
        )
        return cls(core)

    async def __aenter__(self) -> AgentInfra:
        try:
            await self._core.start()
        except BaseException:
            # Failure, Ctrl-C or cancellation: remove whatever the start created.
            await _finish(self._core.abort())
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _finish(self._core.stop(self._keep_running))

    @property
    def project(self) -> str:
        """The project name every container of this stack is labelled with."""
        return self._core.project

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
        return {s.name: s for s in await self._core.status()}

    async def logs(self, name: str, tail: int = 100) -> str:
        """The last ``tail`` lines of a service's output (stdout and stderr)."""
        if tail < 0:
            raise ValueError("tail must be 0 or more")
        return await self._core.logs(name, tail)

    async def restart(self, name: str) -> ServiceInfo:
        """Restarts a service and waits until it is healthy again."""
        return await self._core.restart(name)

    def __repr__(self) -> str:
        try:
            names = ", ".join(self.services)
        except InfraError:
            names = ", ".join(self._core.planned_services) + " (not running)"
        return f"AgentInfra(project={self.project!r}, services=[{names}])"
