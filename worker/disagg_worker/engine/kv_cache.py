"""The preallocated paged KV pool: one K and one V tensor of fixed-size blocks for every layer.

Shape ``[layers, blocks, block_size, kv_heads, head_dim]``; a token's slot is
``block_id * block_size + offset``. Export/import move whole blocks, which is what KV transfer ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def kv_bytes(self, num_blocks: int, num_layers: int) -> int:
        """Bytes of K (or of V, the same) for ``num_blocks`` blocks x ``num_layers`` layers."""
        return num_layers * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def chunk_shape(self, num_blocks: int, num_layers: int) -> tuple[int, int, int, int, int]:
        """The shape of K (or of V) for ``num_blocks`` blocks x ``num_layers`` layers, as a pool lays it out."""
        return num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim

    def blocks_for_bytes(self, num_bytes: int) -> int:
        return num_bytes // self.bytes_per_block


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        shape = layout.chunk_shape(num_blocks, layout.num_layers)
        self.k = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.v = torch.zeros(shape, dtype=layout.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``[slots, kv_heads, head_dim]`` views of one layer (writes go through to the pool)."""
        kvh, hd = self.layout.num_kv_heads, self.layout.head_dim
        return self.k[layer].view(-1, kvh, hd), self.v[layer].view(-1, kvh, hd)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k_flat, v_flat = self.layer_slots(layer)
        k_flat.index_copy_(0, slots, k)
        v_flat.index_copy_(0, slots, v)

    def export_blocks(self, block_ids: list[int], layers: range | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V for ``block_ids``: ``[layers, len(block_ids), block_size, kv_heads, head_dim]``.

        ``out`` (two staging buffers at least that large) avoids a fresh allocation per chunk; the
        returned tensors are views into it.
        """
        layers = layers or range(self.layout.num_layers)
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        sl = slice(layers.start, layers.stop)
        if out is None:
            return self.k[sl].index_select(1, idx), self.v[sl].index_select(1, idx)
        shape = (len(layers), len(block_ids), *self.k.shape[2:])
        n = 1
        for d in shape:
            n *= d
        k_out, v_out = out[0].view(-1)[:n].view(shape), out[1].view(-1)[:n].view(shape)
        torch.index_select(self.k[sl], 1, idx, out=k_out)
        torch.index_select(self.v[sl], 1, idx, out=v_out)
        return k_out, v_out

    @cached_property
    def _pool_bytes(self) -> tuple[memoryview, memoryview]:
        """Flat writable byte views of the K and V pools (CPU pools only)."""
        if not (self.k.is_contiguous() and self.v.is_contiguous()):
            raise ValueError("byte views need a contiguous KV pool")
        return tuple(memoryview(t.view(torch.uint8).numpy().reshape(-1)) for t in (self.k, self.v))  # type: ignore[return-value]

    def block_views(self, block_ids: Sequence[int], layers: range) -> tuple[list[memoryview], list[memoryview]]:
        """Byte views of K and of V for ``block_ids`` x ``layers``, in the order ``export_blocks`` lays them out.

        Layer-major, then block; a run of consecutive block ids is one view. Nothing is copied: a
        transport sends straight from the pool or receives straight into it. CPU pools only.
        """
        if self.k.device.type != "cpu":
            raise ValueError("byte views need a CPU pool; export_blocks/import_blocks copy for other devices")
        if layers.step != 1 or layers.start < 0 or layers.stop > self.layout.num_layers:
            raise ValueError(f"layers {layers} out of range")
        runs: list[tuple[int, int]] = []  # (first block id, count)
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block {b} is outside the pool")
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        row = self.layout.kv_bytes(1, 1)
        out: tuple[list[memoryview], list[memoryview]] = ([], [])
        for pool, views in zip(self._pool_bytes, out, strict=True):
            for layer in layers:
                base = layer * self.num_blocks
                views.extend(pool[(base + b) * row:(base + b + n) * row] for b, n in runs)
        return out

    def import_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor, layer_start: int = 0) -> None:
        """Write K/V ``[layers, len(block_ids), block_size, kv_heads, head_dim]`` into ``block_ids``."""
        expected = (len(block_ids), self.layout.block_size, self.layout.num_kv_heads, self.layout.head_dim)
        if tuple(k.shape[1:]) != expected or k.shape != v.shape:
            raise ValueError(f"KV chunk shape {tuple(k.shape)} does not fit blocks of shape {expected}")
        if layer_start < 0 or layer_start + k.shape[0] > self.layout.num_layers:
            raise ValueError(f"layers {layer_start}..{layer_start + k.shape[0]} out of range")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        sl = slice(layer_start, layer_start + k.shape[0])
        self.k[sl].index_copy_(1, idx, k.to(device=self.k.device, dtype=self.k.dtype))
        self.v[sl].index_copy_(1, idx, v.to(device=self.v.device, dtype=self.v.dtype))
