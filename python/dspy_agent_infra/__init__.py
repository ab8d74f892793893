"""dspy_agent_infra: the service stack of a DSPy agent, from one line of Python.

async with AgentInfra.start() as infra:
    ...
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._native import ReplicaInfo, ServiceInfo, SubmitResponse, Task, TaskInfo, __version__
from .errors import (
    ConfigError,
    DockerUnavailableError,
    InfraError,
    InvalidTaskError,
    OrchestratorUnavailableError,
    PortInUseError,
    ServiceStartError,
    StackInUseError,
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
    "ReplicaInfo",
    "ServiceInfo",
    "ServiceStartError",
    "StackInUseError",
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

# A library's records go where the application's logging config sends them; without one,
# nothing is printed (errors reach the caller as exceptions).
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from ._infra import AgentInfra
    from ._tasks import OrchestratorClient, Payload, TaskStatus

# Imported on first use: they pull in asyncio, which the `dspy-agent` command and its daemon
# (both in this package) do not need, and which would cost every command tens of milliseconds.
_LAZY = {
    "AgentInfra": "._infra",
    "OrchestratorClient": "._tasks",
    "Payload": "._tasks",
    "TaskStatus": "._tasks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
