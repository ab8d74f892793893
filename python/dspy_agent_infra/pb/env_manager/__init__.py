"""The env-manager gRPC service (`proto/env_manager.v1.proto`): `env_manager_pb2` and
`env_manager_pb2_grpc`."""
