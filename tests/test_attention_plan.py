"""The step plan's pure parts: how decode rows are grouped for batched attention, and the rotary tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from disagg_worker.engine.attention import _MAX_WIDE_PADDED_TOKENS, _WIDE_PAD_SLACK_TOKENS, group_decodes
from disagg_worker.engine.layer_ops import LayerOps, RotaryTables

contexts = st.lists(st.integers(1, 40_000), max_size=300)


@given(contexts, st.booleans(), st.booleans())
def test_every_decode_row_is_in_exactly_one_group(lens: list[int], single: bool, wide: bool) -> None:
    groups = group_decodes(lens, single=single, wide=wide)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert all(groups)


@given(contexts)
def test_a_wide_group_pads_at_most_twice_its_tokens_plus_the_slack_and_a_fixed_total(lens: list[int]) -> None:
    for g in group_decodes(lens, wide=True):
        padded, real = len(g) * max(lens[i] for i in g), sum(lens[i] for i in g)
        assert len(g) == 1 or padded <= min(2 * real + _WIDE_PAD_SLACK_TOKENS, _MAX_WIDE_PADDED_TOKENS)


def test_wide_groups_batch_a_mixed_load_in_one_launch_and_keep_an_outlier_apart() -> None:
    mixed = [16 + 20 * i for i in range(64)]  # 16..1276 tokens of context
    assert len(group_decodes(mixed)) > 3  # the CPU's per-row padding bound
    assert group_decodes(mixed, wide=True) == [list(range(64))]
    with_outlier = [*mixed, 200_000]
    assert group_decodes(with_outlier, wide=True) == [list(range(64)), [64]]
    long = [32_000] * 16  # 512k tokens: gathered at once, too much for one group
    assert [len(g) for g in group_decodes(long, wide=True)] == [4, 4, 4, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_the_torch_rotary_path_equals_transformers_bit_for_bit(dtype: torch.dtype, head_dim: int) -> None:
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(7, 4, head_dim, generator=g).to(dtype)
    k = torch.randn(7, 2, head_dim, generator=g).to(dtype)
    cos, sin = torch.randn(7, head_dim, generator=g).to(dtype), torch.randn(7, head_dim, generator=g).to(dtype)
    tables = RotaryTables.build(cos, sin)
    ops = LayerOps.__new__(LayerOps)
    ops.kernels = None  # the torch path, as on a GPU
    # transformers' layout: [batch, heads, tokens, head_dim] and cos/sin [batch, tokens, head_dim]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(ops.rotary(q, tables), want_q[0].transpose(0, 1))
    assert torch.equal(ops.rotary(k, tables), want_k[0].transpose(0, 1))


def test_only_architectures_whose_attention_is_windowed_get_a_window() -> None:
    """A Llama config can carry ``sliding_window`` (Mistral-derived or merged checkpoints); Llama's
    attention never applies it, and the engine used to window every layer of such a model."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from disagg_worker.engine.model_runner import layer_windows

    assert layer_windows(LlamaConfig(num_hidden_layers=3, sliding_window=8)) == [None] * 3
    assert layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=8)) == [8] * 3
    qwen = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert layer_windows(qwen) == [None if t == "full_attention" else 8 for t in qwen.layer_types]
    assert None in layer_windows(qwen) and 8 in layer_windows(qwen)
