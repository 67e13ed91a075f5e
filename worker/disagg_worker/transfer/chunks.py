"""Plan and encode KV chunks: pure functions over block/layer ranges, with checksums.

A chunk is a rectangle of the KV of one request: ``num_blocks`` consecutive blocks of its block table
times ``num_layers`` consecutive layers, K and V each ``[layers, blocks, block_size, kv_heads,
head_dim]``. Plans keep every chunk under a byte budget so memory stays bounded on both sides.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import xxhash


class TransferError(RuntimeError):
    """A KV transfer failed (corrupt, misshapen, late or cut off); the decode worker falls back."""


@dataclass(frozen=True)
class ChunkSpec:
    seq: int
    first_block: int
    num_blocks: int
    layer_start: int
    num_layers: int


def plan_chunks(first_block: int, num_blocks: int, num_layers: int, bytes_per_block_layer: int,
                chunk_bytes: int) -> list[ChunkSpec]:
    """Cover blocks ``[first_block, first_block + num_blocks)`` x all layers with chunks under ``chunk_bytes``.

    ``bytes_per_block_layer`` is the K+V size of one block in one layer. Whole blocks across all layers
    are preferred; a single block too large for the budget is split by layers.
    """
    if num_blocks <= 0:
        return []
    per_block = bytes_per_block_layer * num_layers
    specs: list[ChunkSpec] = []
    if per_block <= chunk_bytes:
        step = max(1, chunk_bytes // per_block)
        for b in range(first_block, first_block + num_blocks, step):
            n = min(step, first_block + num_blocks - b)
            specs.append(ChunkSpec(len(specs), b, n, 0, num_layers))
        return specs
    layers_per_chunk = max(1, chunk_bytes // bytes_per_block_layer)
    for b in range(first_block, first_block + num_blocks):
        for layer in range(0, num_layers, layers_per_chunk):
            specs.append(ChunkSpec(len(specs), b, 1, layer, min(layers_per_chunk, num_layers - layer)))
    return specs


PLACEMENT = struct.Struct("<IIIII")


def chunk_checksum(spec: ChunkSpec, k: Iterable[bytes | memoryview], v: Iterable[bytes | memoryview]) -> int:
    """xxh3_64 over the chunk's placement (seq, first block, blocks, first layer, layers), then its K
    bytes, then its V bytes (each given as consecutive parts). Covering the placement means bytes that
    arrive intact but with their block or layer range garbled in flight do not verify: they would
    otherwise land in the wrong blocks with a good checksum."""
    h = chunk_hasher(spec)
    for part in (*k, *v):
        h.update(part)
    return h.intdigest()


def chunk_hasher(spec: ChunkSpec) -> xxhash.xxh3_64:
    """``chunk_checksum``'s running hash with the placement already in: feed it K, then V, in parts."""
    return xxhash.xxh3_64(PLACEMENT.pack(spec.seq, spec.first_block, spec.num_blocks, spec.layer_start,
                                         spec.num_layers))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a tensor: zero-copy for a contiguous CPU tensor, else over a contiguous host copy."""
    t = t.contiguous().cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor view over received bytes (no copy); fails with TransferError if sizes disagree."""
    expected = 1
    for s in shape:
        expected *= s
    expected *= torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise TransferError(f"chunk payload has {len(data)} bytes, shape {shape} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only buffer: the tensor is only read (copied into the pool)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)


DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TransferError(f"unsupported KV dtype {name!r}") from None
