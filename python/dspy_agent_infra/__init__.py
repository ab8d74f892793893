"""dspy_agent_infra: the service stack of a DSPy agent, from one line of Python.

async with AgentInfra.start() as infra:
    ...
"""

from ._infra import AgentInfra
from ._native import ServiceInfo, SubmitResponse, Task, TaskInfo, __version__
from ._tasks import OrchestratorClient, Payload, TaskStatus
from .errors import (
    ConfigError,
    DockerUnavailableError,
    InfraError,
    InvalidTaskError,
    OrchestratorUnavailableError,
    PortInUseError,
    ServiceStartError,
    TaskConflictError,
    TaskError,
    TaskNotFoundError,
    UnknownServiceError,
    UnknownTaskTypeError,
)

__all__ = [
    "AgentInfra",
    "ConfigError",
    "DockerUnavailableError",
    "InfraError",
    "InvalidTaskError",
    "OrchestratorClient",
    "OrchestratorUnavailableError",
    "Payload",
    "PortInUseError",
    "ServiceInfo",
    "ServiceStartError",
    "SubmitResponse",
    "Task",
    "TaskConflictError",
    "TaskError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskStatus",
    "UnknownServiceError",
    "UnknownTaskTypeError",
    "__version__",
]
