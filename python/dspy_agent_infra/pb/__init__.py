"""grpcio stubs of the two gRPC services, importable as the hand-off's code expects::

    from dspy_agent_infra.pb.orchestrator import orchestrator_pb2, orchestrator_pb2_grpc
    from dspy_agent_infra.pb.env_manager import env_manager_pb2, env_manager_pb2_grpc

They are built when imported, from the descriptors compiled into the core (the same ones its
server reflection serves), so they always match the running server. They need ``grpcio`` and
``protobuf``: ``pip install grpcio protobuf`` (the package's ``grpc`` extra: ``pip install
'.[grpc]'`` in a checkout).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__: list[str] = []

_MISSING = (
    "dspy_agent_infra.pb needs grpcio and protobuf, which are not installed: "
    "pip install grpcio protobuf (the package's grpc extra: pip install '.[grpc]' in a checkout)"
)


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(_MISSING) from e


_pools: dict[str, Any] = {}


def _file(proto: str) -> Any:
    """The descriptor of ``proto`` in a pool of this package's own, so that stubs generated
    elsewhere from the same files (into the default pool) never clash with these."""
    if proto not in _pools:
        _require("grpc")
        descriptor_pb2 = _require("google.protobuf.descriptor_pb2")
        descriptor_pool = _require("google.protobuf.descriptor_pool")
        from .._native import file_descriptor_set

        files = descriptor_pb2.FileDescriptorSet.FromString(file_descriptor_set())
        pool = descriptor_pool.DescriptorPool()
        for f in files.file:
            pool.Add(f)
        for f in files.file:
            _pools[f.name] = pool.FindFileByName(f.name)
    return _pools[proto]


def build_messages(proto: str, namespace: dict[str, Any]) -> None:
    """Fills a ``*_pb2`` module: ``DESCRIPTOR``, a class per message and the enums' values."""
    message_factory = _require("google.protobuf.message_factory")
    enum_type_wrapper = _require("google.protobuf.internal.enum_type_wrapper")
    file = _file(proto)
    namespace["DESCRIPTOR"] = file
    for name, message in file.message_types_by_name.items():
        namespace[name] = message_factory.GetMessageClass(message)
    for name, enum in file.enum_types_by_name.items():
        namespace[name] = enum_type_wrapper.EnumTypeWrapper(enum)
        for value in enum.values:
            namespace[value.name] = value.number


def build_services(proto: str, messages: ModuleType, namespace: dict[str, Any]) -> None:
    """Fills a ``*_pb2_grpc`` module as grpcio-tools would: per service ``NAMEStub``,
    ``NAMEServicer`` and ``add_NAMEServicer_to_server``."""
    grpc = _require("grpc")
    file = _file(proto)
    for service in file.services_by_name.values():
        namespace[f"{service.name}Stub"] = _stub(service, messages)
        namespace[f"{service.name}Servicer"] = _servicer(grpc, service)
        namespace[f"add_{service.name}Servicer_to_server"] = _adder(grpc, service, messages)


def _kind(method: Any) -> str:
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(method.client_streaming, method.server_streaming)]


def _stub(service: Any, messages: ModuleType) -> type:
    def __init__(self: Any, channel: Any) -> None:
        for method in service.methods:
            request = getattr(messages, method.input_type.name)
            response = getattr(messages, method.output_type.name)
            call = getattr(channel, _kind(method))(
                f"/{service.full_name}/{method.name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            setattr(self, method.name, call)

    return type(f"{service.name}Stub", (), {"__init__": __init__})


def _servicer(grpc: ModuleType, service: Any) -> type:
    def unimplemented(name: str) -> Callable[..., Any]:
        def method(self: Any, request: Any, context: Any) -> Any:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details("Method not implemented!")
            raise NotImplementedError("Method not implemented!")

        method.__name__ = name
        return method

    body = {m.name: unimplemented(m.name) for m in service.methods}
    return type(f"{service.name}Servicer", (), body)


def _adder(grpc: ModuleType, service: Any, messages: ModuleType) -> Callable[[Any, Any], None]:
    def add(servicer: Any, server: Any) -> None:
        handlers = {}
        for method in service.methods:
            request = getattr(messages, method.input_type.name)
            response = getattr(messages, method.output_type.name)
            make = getattr(grpc, f"{_kind(method)}_rpc_method_handler")
            handlers[method.name] = make(
                getattr(servicer, method.name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )

    return add
