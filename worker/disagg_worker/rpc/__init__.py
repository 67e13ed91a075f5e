"""gRPC stubs for the contracts in ``proto/disagg/v1/disagg.proto`` (generated, refreshed on import)."""

from disagg_worker.rpc.codegen import ensure_fresh

ensure_fresh()

from disagg_worker.rpc._gen import disagg_pb2 as pb  # noqa: E402
from disagg_worker.rpc._gen import disagg_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
