"""Where a received KV chunk lands: straight in a request's reserved pool blocks, or via a bounce buffer.

A sink hands a transport writable byte views for one chunk (``views``) and is told when the chunk
is verified (``commit``). ``PoolSink`` gives views into the reserved blocks of a CPU pool, so the
transport's receive is the only copy; ``StagedSink`` gives host buffers and installs verified chunks
through the engine (pools off the CPU). Transports that deliver whole chunks (gRPC) call ``write``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from disagg_worker.engine.kv_cache import KVLayout, PagedKVCache
from disagg_worker.transfer.chunks import ChunkSpec, TransferError, tensor_from_bytes


class KvSink(Protocol):
    """Where a receiver puts one chunk: byte views to receive into, then a commit once verified.

    ``in_place``: the views are the request's own blocks, so writing them must be fenced.
    """

    in_place: bool

    def views(self, spec: ChunkSpec) -> tuple[list[memoryview], list[memoryview]]: ...

    def commit(self, spec: ChunkSpec) -> None: ...


class PoolSink:
    """Receive straight into a request's reserved blocks of a CPU pool: no staging copy.

    Safe because reserved blocks are private to the request until ``commit_import``; a corrupt or
    partial transfer leaves garbage only in blocks that fallback frees and prefill rewrites.
    """

    in_place = True

    def __init__(self, kv: PagedKVCache, block_ids: list[int]) -> None:
        self.kv, self.block_ids = kv, block_ids

    def views(self, spec: ChunkSpec) -> tuple[list[memoryview], list[memoryview]]:
        blocks = self.block_ids[spec.first_block:spec.first_block + spec.num_blocks]
        if len(blocks) != spec.num_blocks:
            raise TransferError(f"chunk blocks {spec.first_block}+{spec.num_blocks} exceed the reservation")
        return self.kv.block_views(blocks, range(spec.layer_start, spec.layer_start + spec.num_layers))

    def commit(self, spec: ChunkSpec) -> None:
        pass

    def write(self, spec: ChunkSpec, k: bytes | memoryview, v: bytes | memoryview) -> None:
        """Copy a whole chunk's K and V bytes into the reserved blocks."""
        pairs = list(zip((memoryview(k), memoryview(v)), self.views(spec), strict=True))
        for src, views in pairs:  # both checked before a byte lands
            if len(src) != sum(len(view) for view in views):
                raise TransferError(f"chunk {spec.seq} has {len(src)} bytes, its blocks hold a different size")
        for src, views in pairs:
            off = 0
            for view in views:
                view[:] = src[off:off + len(view)]
                off += len(view)


class StagedSink:
    """Receive into a host buffer and install each verified chunk through the engine (pools off the CPU)."""

    in_place = False

    def __init__(self, layout: KVLayout, install: Callable[[int, int, torch.Tensor, torch.Tensor], None]) -> None:
        self.layout, self.install = layout, install
        self._buf = bytearray()

    def views(self, spec: ChunkSpec) -> tuple[list[memoryview], list[memoryview]]:
        n = self.layout.kv_bytes(spec.num_blocks, spec.num_layers)
        if len(self._buf) < 2 * n:
            self._buf = bytearray(2 * n)
        view = memoryview(self._buf)
        return [view[:n]], [view[n:2 * n]]

    def commit(self, spec: ChunkSpec) -> None:
        lay = self.layout
        n = lay.kv_bytes(spec.num_blocks, spec.num_layers)
        shape = lay.chunk_shape(spec.num_blocks, spec.num_layers)
        view = memoryview(self._buf)
        self.install(spec.first_block, spec.layer_start, tensor_from_bytes(view[:n], lay.dtype, shape),
                     tensor_from_bytes(view[n:2 * n], lay.dtype, shape))  # copies into the pool
