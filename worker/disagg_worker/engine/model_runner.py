"""One forward pass over a step's flattened batch: the engine's entry point to model tensors.

It drives the Hugging Face model layer by layer (embeddings, rotary embedding, LM head from the
model itself), with paged attention over ``PagedKVCache`` in place of the model's attention, so one
step mixes prefill chunks and decode tokens of many requests without padding. The math around
attention (projections, norms, rotary, MLP) lives in ``LayerOps``: the model's own modules, or
fused CPU kernels that compute the same formulas.
"""

from __future__ import annotations

from typing import Any

import torch

from disagg_worker.engine.attention import AttentionPlan, DecodeGroup, PrefillChunk, group_decodes, paged_attention
from disagg_worker.engine.cpu_kernels import load_cpu_kernels
from disagg_worker.engine.kv_cache import KVLayout, PagedKVCache
from disagg_worker.engine.layer_ops import LayerOps, RotaryTables
from disagg_worker.engine.scheduler import SchedulerOutput

# The architectures whose attention applies ``config.sliding_window`` (transformers' modeling code).
# Llama's ignores the key, which Mistral-derived or merged Llama configs can still carry.
WINDOWED_ARCHITECTURES = ("mistral", "qwen2", "qwen3")


def layer_windows(config: Any) -> list[int | None]:
    """Sliding-window size of each layer (None = full attention), as transformers defines it."""
    n = config.num_hidden_layers
    if getattr(config, "model_type", None) not in WINDOWED_ARCHITECTURES:
        return [None] * n
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types[:n]]
    return [window] * n


def kv_layout(model: Any, block_size: int) -> KVLayout:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVLayout(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads, head_dim, model.dtype)


class ModelRunner:
    def __init__(self, model: Any, num_blocks: int, block_size: int, use_cpu_kernels: bool = True) -> None:
        self.model = model
        self.device = model.device
        self.inner = model.model
        self.layers = list(self.inner.layers)
        cfg = model.config
        self.layout = kv_layout(model, block_size)
        self.num_heads = cfg.num_attention_heads
        self.windows = layer_windows(cfg)
        self.block_size = block_size
        self.kv = PagedKVCache(self.layout, num_blocks, self.device)
        self.kernel = load_cpu_kernels() if self.device.type == "cpu" and use_cpu_kernels else None
        self.ops = [LayerOps(layer, self.kernel) for layer in self.layers]
        # Without the CPU kernel on a GPU, a step's time is mostly kernel launches: fewer, wider decode groups.
        self.wide_decode_groups = self.device.type == "cuda"

    # ---- step inputs -----------------------------------------------------------------------
    def _build_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                           AttentionPlan, torch.Tensor]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        decode_rows: list[int] = []
        decode_ctx: list[int] = []
        decode_tables: list[list[int]] = []
        prefills: list[PrefillChunk] = []
        dev = self.device
        for s in out.scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            row = len(ids)
            ids.extend(req.all_token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx = start + n
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_ctx.append(ctx)
                decode_tables.append(table[: -(-ctx // bs)])
            else:
                blocks = torch.tensor(table[: -(-ctx // bs)], dtype=torch.long, device=dev)
                prefills.append(PrefillChunk(row, n, blocks, start, ctx))
            if s.samples:
                logits_rows.append(row + n - 1)

        groups = []
        for members in group_decodes(decode_ctx, single=self.kernel is not None, wide=self.wide_decode_groups):
            width = max(len(decode_tables[i]) for i in members)
            table = [decode_tables[i] + [0] * (width - len(decode_tables[i])) for i in members]
            groups.append(DecodeGroup(
                token_index=torch.tensor([decode_rows[i] for i in members], dtype=torch.long, device=dev),
                block_table=torch.tensor(table, dtype=torch.long, device=dev),
                context_lens=torch.tensor([decode_ctx[i] for i in members], dtype=torch.long, device=dev),
                max_context=max(decode_ctx[i] for i in members),
            ))
        plan = AttentionPlan(groups, prefills, bs, self.kernel)
        # Every index is copied to the device here, before any layer is queued: a copy made after the
        # layers would wait for all of them before the LM head could be queued.
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev),
                torch.tensor(slots, dtype=torch.long, device=dev), plan,
                torch.tensor(logits_rows, dtype=torch.long, device=dev))

    # ---- the forward pass ------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the step; returns fp32 logits ``[num sampling requests, vocab]`` in scheduled order."""
        ids, positions, slots, plan, logits_rows = self._build_inputs(out)
        t = ids.shape[0]
        kvh, hd = self.layout.num_kv_heads, self.layout.head_dim
        hidden = self.inner.embed_tokens(ids)  # [T, H], the residual stream (updated in place on CPU)
        cos, sin = self.inner.rotary_emb(hidden, positions[None])
        rotary = RotaryTables.build(cos[0], sin[0])  # [T, head_dim]
        x = self.ops[0].input_norm(hidden)
        for li, ops in enumerate(self.ops):
            attn = ops.attn
            q, k, v = ops.q_k_v(x)
            q, k, v = q.reshape(t, self.num_heads, hd), k.reshape(t, kvh, hd), v.reshape(t, kvh, hd)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q/k per head before rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = ops.rotary(q, rotary), ops.rotary(k, rotary)
            self.kv.write(li, slots, k, v)
            k_slots, v_slots = self.kv.layer_slots(li)
            o = paged_attention(q, k_slots, v_slots, plan, attn.scaling, self.windows[li])
            hidden, x = ops.post_norm.add_then_norm(hidden, attn.o_proj(o.reshape(t, self.num_heads * hd)))
            mlp_out = ops.mlp_forward(x)
            if li + 1 < len(self.ops):
                hidden, x = self.ops[li + 1].input_norm.add_then_norm(hidden, mlp_out)
            else:
                hidden = hidden + mlp_out
        if not logits_rows.numel():
            return torch.empty(0, self.model.config.vocab_size)
        last = self.inner.norm(hidden[logits_rows])
        return self.model.lm_head(last).float()
