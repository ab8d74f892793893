"""Type stubs for the compiled core (``dspy_agent_infra._native``)."""

from collections.abc import Awaitable, Mapping
from os import PathLike
from typing import Any, final

__version__: str

@final
class ServiceInfo:
    """One service of a running stack."""

    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str:
        """pending, pulling, creating, waiting, starting, healthy, completed, failed,
        stopping or stopped."""
    @property
    def image(self) -> str: ...
    @property
    def container_id(self) -> str | None: ...
    @property
    def host(self) -> str: ...
    @property
    def ports(self) -> dict[int, int]:
        """Published TCP ports: container port -> host port."""
    @property
    def url(self) -> str | None:
        """``scheme://host:port`` of the first published port."""
    @property
    def reused(self) -> bool:
        """True when a running container with the same config was attached to (warm start)."""
    @property
    def message(self) -> str: ...

@final
class Core:
    def __new__(
        cls,
        *,
        services: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
        config_file: str | PathLike[str] | None = None,
        project: str | None = None,
        docker_host: str | None = None,
        keep_running: bool | None = None,
        state_dir: str | PathLike[str] | None = None,
    ) -> Core: ...
    @property
    def project(self) -> str: ...
    @property
    def keep_running(self) -> bool: ...
    @property
    def planned_services(self) -> list[str]: ...
    def start(self) -> Awaitable[None]: ...
    def abort(self) -> Awaitable[None]: ...
    def stop(self, keep_running: bool) -> Awaitable[None]: ...
    def services(self) -> list[ServiceInfo]: ...
    def env(self) -> dict[str, str]: ...
    def status(self) -> Awaitable[list[ServiceInfo]]: ...
    def logs(self, service: str, tail: int) -> Awaitable[str]: ...
    def restart(self, service: str) -> Awaitable[ServiceInfo]: ...
