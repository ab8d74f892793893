"""``OrchestratorClient`` under the module path of the hand-off's examples
(``dspy_agent.infra.grpc_client``)."""

from ._tasks import OrchestratorClient

__all__ = ["OrchestratorClient"]
