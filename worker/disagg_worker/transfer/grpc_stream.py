"""The default ("grpc") KV transport: KvChunk messages on the ``Prefill`` response stream.

Sender side: ``encode_chunk`` turns one planned rectangle of K/V into a checksummed message. Receiver
side: ``decode_chunk`` verifies request id, checksum, dtype and shape and returns tensor views, and
``Coverage`` checks that every block x layer arrived exactly once before the KV is committed.
gRPC's flow control is the backpressure: the sender exports the next chunk only when the previous
one was taken, so each side holds a bounded number of chunks.
"""

from __future__ import annotations

import torch

from disagg_worker.engine.kv_cache import KVLayout
from disagg_worker.rpc import pb
from disagg_worker.transfer.chunks import (
    ChunkSpec,
    TransferError,
    chunk_checksum,
    dtype_from_name,
    tensor_bytes,
    tensor_from_bytes,
)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_chunk(request_id: str, spec: ChunkSpec, k: torch.Tensor, v: torch.Tensor) -> pb.KvChunk:
    kb, vb = bytes(tensor_bytes(k)), bytes(tensor_bytes(v))
    return pb.KvChunk(request_id=request_id, seq=spec.seq, first_block=spec.first_block,
                      num_blocks=spec.num_blocks, layer_start=spec.layer_start, num_layers=spec.num_layers,
                      dtype=dtype_name(k.dtype), shape=list(k.shape), k=kb, v=vb,
                      checksum=chunk_checksum(spec, [kb], [vb]))


def decode_chunk(chunk: pb.KvChunk, layout: KVLayout, request_id: str, verify: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    if chunk.request_id != request_id:
        raise TransferError(f"chunk for {chunk.request_id!r} arrived on the transfer of {request_id!r}")
    spec = ChunkSpec(chunk.seq, chunk.first_block, chunk.num_blocks, chunk.layer_start, chunk.num_layers)
    if verify and chunk_checksum(spec, [chunk.k], [chunk.v]) != chunk.checksum:
        raise TransferError(f"checksum mismatch on chunk {chunk.seq}")
    dtype = dtype_from_name(chunk.dtype)
    if dtype != layout.dtype:
        raise TransferError(f"chunk dtype {chunk.dtype} but the pool holds {layout.dtype}")
    shape = (chunk.num_layers, chunk.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    if tuple(chunk.shape) != shape:
        raise TransferError(f"chunk shape {tuple(chunk.shape)}, expected {shape}")
    if chunk.layer_start + chunk.num_layers > layout.num_layers:
        raise TransferError(f"chunk layers {chunk.layer_start}+{chunk.num_layers} out of range")
    return tensor_from_bytes(chunk.k, dtype, shape), tensor_from_bytes(chunk.v, dtype, shape)


class Coverage:
    """Which (block, layer) cells of a transfer have arrived; each exactly once."""

    def __init__(self, first_block: int, num_blocks: int, num_layers: int) -> None:
        self.first_block, self.num_blocks, self.num_layers = first_block, num_blocks, num_layers
        self._cells = bytearray(num_blocks * num_layers)
        self.received = 0

    def add(self, first_block: int, num_blocks: int, layer_start: int, num_layers: int) -> None:
        lo = first_block - self.first_block
        if lo < 0 or lo + num_blocks > self.num_blocks or layer_start < 0 or layer_start + num_layers > self.num_layers:
            raise TransferError(f"chunk blocks {first_block}+{num_blocks} layers {layer_start}+{num_layers} "
                                "are outside this transfer")
        for b in range(lo, lo + num_blocks):
            for layer in range(layer_start, layer_start + num_layers):
                i = b * self.num_layers + layer
                if self._cells[i]:
                    raise TransferError(f"block {b + self.first_block} layer {layer} arrived twice")
                self._cells[i] = 1
                self.received += 1

    @property
    def complete(self) -> bool:
        return self.received == len(self._cells)
