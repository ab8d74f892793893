"""Messages and enums of `proto/env_manager.v1.proto`, as grpcio-tools would generate them."""

from typing import Any

from .. import build_messages

build_messages("env_manager.v1.proto", globals())


def __getattr__(name: str) -> Any:
    # Tells type checkers that the messages are built at import; at run time only a missing
    # name reaches here.
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
