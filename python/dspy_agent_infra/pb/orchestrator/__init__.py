"""The orchestrator gRPC service (`proto/orchestrator.v1.proto`): `orchestrator_pb2` and
`orchestrator_pb2_grpc`."""
