"""Type stubs for the compiled core (``dspy_agent_infra._native``)."""

from collections.abc import Mapping
from os import PathLike
from typing import Any, final

from ._tasks import TaskStatus

__version__: str

def cli(argv: list[str], python: str, package_root: str) -> int: ...

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
    @property
    def stand_in(self) -> bool:
        """The image is a local stand-in (tagged by ``scripts/provision.sh`` on a machine that
        cannot pull), not the real service."""
    @property
    def replicas(self) -> list[ReplicaInfo]:
        """On the swarm backend, each copy of the service with its node; empty otherwise."""

@final
class ReplicaInfo:
    """One copy of a service on the swarm backend."""

    @property
    def slot(self) -> int: ...
    @property
    def node(self) -> str: ...
    @property
    def node_addr(self) -> str: ...
    @property
    def state(self) -> str:
        """The swarm's state of it: running, starting, pending, failed, node-down..."""
    @property
    def ports(self) -> dict[int, int]:
        """Published TCP ports of this copy: container port -> port on its node."""
    @property
    def error(self) -> str | None: ...

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
        backend: str | None = None,
        keep_running: bool | None = None,
        state_dir: str | PathLike[str] | None = None,
    ) -> Core: ...
    @property
    def project(self) -> str: ...
    @property
    def keep_running(self) -> bool: ...
    @property
    def planned_services(self) -> list[str]: ...
    # Each `*_nowait` call returns a token; its answer comes through `take_messages`.
    def start_nowait(self) -> int: ...
    def abort_nowait(self) -> int: ...
    def stop_nowait(self, keep_running: bool) -> int: ...
    def services(self) -> list[ServiceInfo]: ...
    def env(self) -> dict[str, str]: ...
    def status_services_nowait(self) -> int: ...
    def logs_nowait(self, service: str, tail: int) -> int: ...
    def restart_nowait(self, service: str) -> int: ...
    @property
    def orchestrator_addr(self) -> str: ...
    @property
    def env_manager_addr(self) -> str: ...
    @property
    def http_addr(self) -> str | None: ...
    @property
    def attached(self) -> bool: ...
    @property
    def token(self) -> str | None: ...
    @property
    def tls_trust(self) -> tuple[bytes, str] | None: ...
    def register_handler(self, task_type: str) -> None: ...
    def submit_nowait(
        self,
        task_id: str,
        task_type: str,
        payload: bytes,
        metadata: dict[str, str] | None,
        priority: int,
        timeout: float | None,
        max_retries: int,
    ) -> int: ...
    def wait_nowait(self, task_id: str, timeout: float | None = None) -> int: ...
    def status_nowait(self, task_id: str) -> int: ...
    def cancel_nowait(self, task_id: str) -> int: ...
    @property
    def wake_fd(self) -> int: ...
    def take_messages(self) -> tuple[str, list[int], list[Any]]: ...
    def complete(self, token: int, value: Any, error: str | None = None) -> None: ...
    def watch_nowait(self, task_ids: list[str], include_current: bool) -> int: ...

@final
class TaskInfo:
    """A task's state, result and timing."""

    @property
    def task_id(self) -> str: ...
    @property
    def task_type(self) -> str: ...
    @property
    def status(self) -> TaskStatus: ...
    @property
    def status_name(self) -> str: ...
    @property
    def result_payload(self) -> bytes:
        """The handler's result (empty until COMPLETED)."""
    @property
    def error(self) -> str:
        """Why the last attempt failed (empty when none did)."""
    @property
    def attempts(self) -> int: ...
    @property
    def created_at(self) -> float | None:
        """Seconds since the Unix epoch."""
    @property
    def started_at(self) -> float | None: ...
    @property
    def finished_at(self) -> float | None: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    @property
    def priority(self) -> int: ...

@final
class SubmitResponse:
    @property
    def success(self) -> bool: ...
    @property
    def task_id(self) -> str: ...
    @property
    def error(self) -> str: ...
    @property
    def duplicate(self) -> bool:
        """The id was already queued with the same content; nothing new was queued."""

@final
class Task:
    """A task as a handler receives it."""

    @property
    def task_id(self) -> str: ...
    @property
    def task_type(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    @property
    def priority(self) -> int: ...
    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry, ..."""
    def json(self) -> Any:
        """The payload decoded as JSON."""

@final
class TaskWatch:
    def next_nowait(self) -> int: ...

@final
class GrpcClient:
    def __new__(
        cls,
        host: str,
        port: int,
        token: str | None = None,
        tls_ca: bytes | None = None,
        server_name: str | None = None,
    ) -> GrpcClient: ...
    @property
    def target(self) -> str: ...
    def submit_nowait(
        self,
        task_id: str,
        task_type: str,
        payload: bytes,
        metadata: dict[str, str] | None,
        priority: int,
        timeout: float | None,
        max_retries: int,
    ) -> int: ...
    def status_nowait(self, task_id: str) -> int: ...
    def cancel_nowait(self, task_id: str) -> int: ...
    @property
    def wake_fd(self) -> int: ...
    def take_messages(self) -> tuple[str, list[int], list[Any]]: ...
    def list_nowait(
        self,
        status: str | None = None,
        task_type: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> int: ...
    def watch_nowait(self, task_ids: list[str], include_current: bool) -> int: ...
    def health_nowait(self) -> int: ...
    def metrics_nowait(self) -> int: ...

def file_descriptor_set() -> bytes:
    """The encoded ``FileDescriptorSet`` of proto/ (both services)."""

def quiesce() -> None:
    """Run at exit: no runtime thread enters Python any more."""
