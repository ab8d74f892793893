"""Client stub, servicer base and server registration of `proto/env_manager.v1.proto`, as
grpcio-tools would generate them."""

from typing import Any

from .. import build_services
from . import env_manager_pb2

build_services("env_manager.v1.proto", env_manager_pb2, globals())


def __getattr__(name: str) -> Any:
    # Tells type checkers that the stubs are built at import; at run time only a missing name
    # reaches here.
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
