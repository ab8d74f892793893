"""Exceptions raised by dspy_agent_infra. Every one derives from :class:`InfraError`."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DockerUnavailableError",
    "InfraError",
    "InvalidTaskError",
    "OrchestratorUnavailableError",
    "PortInUseError",
    "ServiceStartError",
    "StackInUseError",
    "TaskConflictError",
    "TaskError",
    "TaskNotFoundError",
    "UnknownServiceError",
    "UnknownTaskTypeError",
]


class InfraError(Exception):
    """Base class of every error the infrastructure raises."""


class ConfigError(InfraError, ValueError):
    """The configuration (file, environment or arguments) is invalid; the message names the
    field at fault."""


class DockerUnavailableError(InfraError, ConnectionError):
    """The Docker Engine cannot be reached."""

    def __init__(self, message: str, *, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class ServiceStartError(InfraError):
    """A service did not come up; everything the start created has been removed.

    ``service`` names it, ``reason`` says why (the last probe error, the exit code, a missing
    image) and ``logs`` holds the container's last log lines.
    """

    def __init__(
        self, message: str, *, service: str = "", reason: str = "", logs: str = ""
    ) -> None:
        super().__init__(message)
        self.service = service
        self.reason = reason
        self.logs = logs


class PortInUseError(ServiceStartError):
    """A host port a service wants to publish is taken by something else."""

    def __init__(
        self,
        message: str,
        *,
        service: str = "",
        reason: str = "",
        logs: str = "",
        port: int = 0,
        host_ip: str = "",
    ) -> None:
        super().__init__(message, service=service, reason=reason, logs=logs)
        self.port = port
        self.host_ip = host_ip


class StackInUseError(InfraError):
    """The project's stack is run by another live process (a ``dspy-agent start`` daemon or
    another agent) that this start could not attach to; its containers are left alone.

    ``pid`` is that process and ``address`` its orchestrator (empty when unknown). Attach to it
    by address (``ORCHESTRATOR_GRPC_ADDR``), or run a separate stack under another ``project``.
    """

    def __init__(self, message: str, *, pid: int = 0, address: str = "") -> None:
        super().__init__(message)
        self.pid = pid
        self.address = address


class _PlainKeyError(KeyError):
    """A KeyError whose message prints as written (KeyError alone would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownServiceError(InfraError, _PlainKeyError):
    """The stack runs no service of that name."""

    def __init__(self, message: str, *, service: str = "") -> None:
        super().__init__(message)
        self.service = service


class TaskError(InfraError):
    """A task request was refused, or the task store failed."""


class InvalidTaskError(TaskError, ValueError):
    """A task field is invalid (empty or over-long id, bad timeout, payload too large or not
    encodable); the message names the field."""


class TaskConflictError(TaskError):
    """The task id is already taken by a task with different content."""


class UnknownTaskTypeError(TaskError):
    """No handler serves the task type; register one with ``@infra.task_handler(...)``."""


class TaskNotFoundError(TaskError, _PlainKeyError):
    """No task has that id."""


class OrchestratorUnavailableError(TaskError, ConnectionError):
    """The orchestrator's gRPC port does not answer."""
