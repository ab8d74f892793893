"""dspy_agent_infra: the service stack of a DSPy agent, from one line of Python.

async with AgentInfra.start() as infra:
    ...
"""

from ._infra import AgentInfra
from ._native import ServiceInfo, __version__
from .errors import (
    ConfigError,
    DockerUnavailableError,
    InfraError,
    PortInUseError,
    ServiceStartError,
    UnknownServiceError,
)

__all__ = [
    "AgentInfra",
    "ConfigError",
    "DockerUnavailableError",
    "InfraError",
    "PortInUseError",
    "ServiceInfo",
    "ServiceStartError",
    "UnknownServiceError",
    "__version__",
]
