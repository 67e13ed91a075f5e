"""Attention over the paged KV pool for one step's flattened batch of tokens.

Per step the runner builds an ``AttentionPlan`` once; every layer then reuses it, masks included
(each is built on the first layer that needs it). Decode tokens (one query each) run through the
compiled CPU kernel when it is loaded (reading blocks in place), or else are grouped by context
length and run as a batched SDPA over gathered blocks. Each prefill chunk runs as its own SDPA with a
causal (and, for sliding-window layers, windowed) mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Decode groups on a CPU: sort by context length and cut a new group when padding would exceed this ratio.
_MAX_PAD_RATIO = 1.5
_MAX_GROUP = 64
# On a GPU every op of a group is a kernel launch and some Python, per layer, while gathered padding costs
# little bandwidth: a group grows while its padded tokens stay within twice its real ones plus this slack,
# and within a fixed total, since the group's K and V are gathered at once (and SDPA's math fallback for
# masked GQA copies them once more per query head).
_WIDE_PAD_SLACK_TOKENS = 65536
_MAX_WIDE_PADDED_TOKENS = 131072
_MAX_WIDE_GROUP = 512


@dataclass
class DecodeGroup:
    token_index: torch.Tensor  # [B] rows of the flat batch
    block_table: torch.Tensor  # [B, max_blocks]
    context_lens: torch.Tensor  # [B]
    max_context: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window, built once


@dataclass
class PrefillChunk:
    q_start: int
    q_len: int
    block_table: torch.Tensor  # [blocks covering the context]
    start: int  # position of the first query token
    context_len: int  # start + q_len
    # by sliding window, built once; a chunk after a cached prefix keeps its q_len x context bool mask
    # for the whole step (2048 x 128k: 256 MiB)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


@dataclass
class AttentionPlan:
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    block_size: int
    kernel: Any = None  # compiled decode kernel module, or None for the torch path


def _starts_new_group(size: int, real: int, shortest: int, ctx: int, wide: bool) -> bool:
    if wide:
        padded = (size + 1) * ctx
        return (size >= _MAX_WIDE_GROUP or padded > _MAX_WIDE_PADDED_TOKENS
                or padded > 2 * (real + ctx) + _WIDE_PAD_SLACK_TOKENS)
    return size >= _MAX_GROUP or ctx > _MAX_PAD_RATIO * shortest + 64


def group_decodes(context_lens: list[int], single: bool = False, wide: bool = False) -> list[list[int]]:
    """Partition decode rows (by index) into groups of similar context length to bound padding.

    ``single`` puts every row in one group (the compiled kernel does not pad); ``wide`` bounds the
    padding of a group as a whole instead of row by row (for devices where launches cost more than
    padding).
    """
    if single:
        return [list(range(len(context_lens)))] if context_lens else []
    order = sorted(range(len(context_lens)), key=lambda i: context_lens[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0  # the current group's context tokens
    for i in order:
        ctx = context_lens[i]  # the longest so far: rows come in ascending order
        if current and _starts_new_group(len(current), real, context_lens[current[0]], ctx, wide):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += ctx
    if current:
        groups.append(current)
    return groups


def _window_mask(q_pos: torch.Tensor, context: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[..., context]`` mask: key j is visible to a query at position p iff p-window < j <= p."""
    kv = torch.arange(context, device=device)
    mask = kv <= q_pos[..., None]
    if window is not None:
        mask &= kv > (q_pos[..., None] - window)
    return mask


def paged_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, plan: AttentionPlan,
                    scale: float, window: int | None) -> torch.Tensor:
    """Attention of every query row over its request's blocks.

    ``q`` is ``[T, heads, head_dim]``; ``k_slots``/``v_slots`` are ``[slots, kv_heads, head_dim]``.
    Returns ``[T, heads, head_dim]``.
    """
    out = torch.empty_like(q)
    bs = plan.block_size
    num_kv_heads, head_dim = k_slots.shape[1], k_slots.shape[2]
    k_blocks = k_slots.view(-1, bs, num_kv_heads, head_dim)
    v_blocks = v_slots.view(-1, bs, num_kv_heads, head_dim)

    for g in plan.decode_groups:
        if plan.kernel is not None:
            out[g.token_index] = plan.kernel.paged_decode_attention(
                q[g.token_index], k_blocks, v_blocks, g.block_table, g.context_lens, scale, window or 0)
            continue
        b = g.token_index.shape[0]
        s = g.block_table.shape[1] * bs
        k = k_blocks[g.block_table].view(b, s, num_kv_heads, head_dim).transpose(1, 2)
        v = v_blocks[g.block_table].view(b, s, num_kv_heads, head_dim).transpose(1, 2)
        mask = g.masks.get(window)
        if mask is None:
            mask = g.masks[window] = _window_mask(g.context_lens - 1, s, window, q.device)[:, None, None, :]
        qb = q[g.token_index].unsqueeze(2)  # [B, heads, 1, head_dim]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[g.token_index] = o.squeeze(2)

    for p in plan.prefills:
        k = k_blocks[p.block_table].view(-1, num_kv_heads, head_dim)[:p.context_len].transpose(0, 1)[None]
        v = v_blocks[p.block_table].view(-1, num_kv_heads, head_dim)[:p.context_len].transpose(0, 1)[None]
        qp = q[p.q_start:p.q_start + p.q_len].transpose(0, 1)[None]
        if p.start == 0 and (window is None or window >= p.context_len):
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = p.masks.get(window)
            if mask is None:
                q_pos = torch.arange(p.start, p.context_len, device=q.device)
                mask = p.masks[window] = _window_mask(q_pos, p.context_len, window, q.device)[None, None]
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[p.q_start:p.q_start + p.q_len] = o[0].transpose(0, 1)
    return out
