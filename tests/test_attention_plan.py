"""The step plan's pure parts: how decode rows are grouped for batched attention, and the rotary tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from disagg_worker.engine.attention import _WIDE_PAD_SLACK_TOKENS, group_decodes
from disagg_worker.engine.layer_ops import RotaryTables, rotate_half

contexts = st.lists(st.integers(1, 40_000), max_size=300)


@given(contexts, st.booleans(), st.booleans())
def test_every_decode_row_is_in_exactly_one_group(lens: list[int], single: bool, wide: bool) -> None:
    groups = group_decodes(lens, single=single, wide=wide)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert all(groups)


@given(contexts)
def test_a_wide_group_pads_at_most_twice_its_tokens_plus_the_slack(lens: list[int]) -> None:
    for g in group_decodes(lens, wide=True):
        real = sum(lens[i] for i in g)
        assert len(g) == 1 or len(g) * max(lens[i] for i in g) <= 2 * real + _WIDE_PAD_SLACK_TOKENS


def test_wide_groups_batch_a_mixed_load_in_one_launch_and_keep_an_outlier_apart() -> None:
    mixed = [16 + 20 * i for i in range(64)]  # 16..1276 tokens of context
    assert len(group_decodes(mixed)) > 3  # the CPU's per-row padding bound
    assert group_decodes(mixed, wide=True) == [list(range(64))]
    with_outlier = [*mixed, 200_000]
    assert group_decodes(with_outlier, wide=True) == [list(range(64)), [64]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_tables_give_hf_formula_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 32, generator=g).to(dtype)
    cos, sin = torch.randn(7, 32, generator=g).to(dtype), torch.randn(7, 32, generator=g).to(dtype)
    tables = RotaryTables.build(cos, sin)
    want = x * cos[:, None] + rotate_half(x) * sin[:, None]  # transformers' apply_rotary_pos_emb
    got = x * tables.cos_heads + x.unflatten(-1, (2, -1)).flip(-2).flatten(-2) * tables.sin_signed
    assert torch.equal(got, want)
